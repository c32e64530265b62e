"""Environment and command helpers for tests that run real worker processes."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
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
    """Start the workers of ``slots`` (pool processes per stage from ``concurrency``, else the default), as a
    deployment runs them (each runs the dispatcher's loop), and wait until one of them dispatches."""
    group = WorkerGroup(env, logs, cwd=outside_repository())
    for slot in slots:
        group.start(slot, concurrency=(concurrency or {}).get(slot.stage))
    try:
        group.wait_ready()
        wait_for_dispatcher(group)
    except Exception:
        group.stop()
        raise
    return group


def wait_for_dispatcher(group: WorkerGroup, timeout: float = 120) -> str:
    """Until one worker's log says its dispatcher holds the lock; that worker's name in the group."""
    from producer.dispatch import READY_MESSAGE

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in group.procs:
            if READY_MESSAGE in group.log(name):
                return name
        time.sleep(0.5)
    raise TimeoutError("no worker's dispatcher took the lock:\n" + "\n".join(group.log(n)[-1500:] for n in group.procs))


def outside_repository() -> Path:
    """A working directory outside the repository, as a user's would be."""
    folder = Path(tempfile.gettempdir()) / "amodal-user-cwd"
    folder.mkdir(exist_ok=True)
    return folder


def amodal(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed ``amodal`` command, run from outside the repository."""
    return subprocess.run([*AMODAL, *args], env=env, cwd=outside_repository(), capture_output=True, text=True,
                          timeout=timeout)
