"""Environment and command helpers for tests that run real worker processes."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from workers.launch import AMODAL, WorkerGroup
from workers.placement import Slot

ROOT = Path(__file__).resolve().parents[1]
ONE_GPU = [Slot(s, 0) for s in ("ground", "segment", "occlusion", "inpaint")] + [Slot("finalize", None)]


def cluster_env(redis_url: str, storage_url: str, models: Path, settings: dict) -> dict:
    """This process's environment (S3 credentials included) plus the cluster's settings; nothing points
    Python at the repository: the commands run as installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({
        "AMODAL_BROKER_URL": redis_url, "AMODAL_STORAGE_URL": storage_url, "AMODAL_MODEL_DIR": str(models),
        "AMODAL_SETTINGS": json.dumps(settings), "PYTHONUNBUFFERED": "1", "AMODAL_INPAINT_FLUSH": "0.3",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "AMODAL_DISPATCH_INTERVAL": "0.5",
        "AMODAL_DISPATCH_SCAN_INTERVAL": "2",
    })
    return env


def start_workers(env: dict, logs: Path, slots=ONE_GPU, concurrency: dict[str, int] | None = None) -> WorkerGroup:
    """Start the workers of ``slots`` (pool processes per stage from ``concurrency``, else the default) and
    the dispatcher (``amodal dispatch``), as a deployment runs them."""
    group = WorkerGroup(env, logs, cwd=outside_repository())
    for slot in slots:
        group.start(slot, concurrency=(concurrency or {}).get(slot.stage))
    group.start_dispatcher()
    try:
        group.wait_ready()
    except Exception:
        group.stop()
        raise
    return group


def outside_repository() -> Path:
    """A working directory outside the repository, as a user's would be."""
    folder = Path(tempfile.gettempdir()) / "amodal-user-cwd"
    folder.mkdir(exist_ok=True)
    return folder


def amodal(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed ``amodal`` command, run from outside the repository."""
    return subprocess.run([*AMODAL, *args], env=env, cwd=outside_repository(), capture_output=True, text=True,
                          timeout=timeout)
