"""Real stage worker processes for tests: started with `amodal worker`, stopped with SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from celeryconfig import STAGES

ROOT = Path(__file__).resolve().parents[1]
AMODAL = [sys.executable, "-m", "amodal.cli"]


def cluster_env(redis_url: str, storage_url: str, models: Path, settings: dict) -> dict:
    """This process's environment (S3 credentials included) plus the cluster's settings."""
    env = dict(os.environ)
    env.update({
        "AMODAL_BROKER_URL": redis_url, "AMODAL_STORAGE_URL": storage_url, "AMODAL_MODEL_DIR": str(models),
        "AMODAL_SETTINGS": json.dumps(settings), "PYTHONUNBUFFERED": "1", "AMODAL_INPAINT_FLUSH": "0.3",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
    })
    return env


@dataclass
class Cluster:
    env: dict
    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, stage: str, *extra: str) -> subprocess.Popen:
        log = open(self.logs / f"{stage}.log", "ab")
        proc = subprocess.Popen([*AMODAL, "worker", "--stage", stage, "--gpu", "0", "--loglevel", "info", *extra],
                                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[stage] = proc
        return proc

    def start_all(self) -> None:
        for stage in STAGES:
            self.start(stage)

    def wait_ready(self, stages=STAGES, timeout: float = 300) -> None:
        """Until each worker's log says it is ready (models warmed, consuming)."""
        deadline = time.monotonic() + timeout
        for stage in stages:
            while "ready." not in self.log(stage):
                if self.procs[stage].poll() is not None:
                    raise RuntimeError(f"{stage} worker exited:\n{self.log(stage)[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{stage} worker not ready:\n{self.log(stage)[-3000:]}")
                time.sleep(0.5)

    def log(self, stage: str) -> str:
        path = self.logs / f"{stage}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, stage: str, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group of a worker (the parent and its pool children)."""
        os.killpg(self.procs[stage].pid, sig)
        self.procs[stage].wait(timeout=60)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def amodal(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*AMODAL, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
