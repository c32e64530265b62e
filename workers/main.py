"""``amodal worker``: one Celery worker for one stage, pinned to one GPU.

The parent process never touches CUDA: ``CUDA_VISIBLE_DEVICES`` is set before anything imports
torch, and each prefork child loads and warms its models after the fork (``workers.warmup``), so
Celery's time limits and process replacement keep working and no CUDA context is ever forked.
"""
from __future__ import annotations

import os
import socket
import sys

from amodal.state import WORK_STAGES as STAGES

GPU_STAGES = ("ground", "segment", "occlusion", "inpaint")


def node_name(stage: str, gpu: int | None) -> str:
    return f"{stage}-gpu{gpu}@{socket.gethostname()}" if gpu is not None else f"{stage}@{socket.gethostname()}"


def run_worker(stage: str, gpu: int | None = None, concurrency: int = 1, loglevel: str = "info") -> None:
    if stage not in STAGES:
        raise SystemExit(f"amodal: unknown stage {stage!r} (one of {', '.join(STAGES)})")
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before the worker pinned its GPU")
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if stage not in GPU_STAGES else str(gpu if gpu is not None else 0)
    os.environ["AMODAL_WORKER_STAGE"] = stage
    from tasks.app import app
    import workers.warmup  # noqa: F401  (connects the per-process warm-up)

    prefetch = 1
    if stage == "inpaint":
        from tasks.inpaint import BATCH_SIZE

        prefetch = BATCH_SIZE
    app.worker_main([
        "worker", "--queues", stage, "--concurrency", str(concurrency), "--pool", "prefork",
        "--hostname", node_name(stage, gpu if stage in GPU_STAGES else None),
        "--prefetch-multiplier", str(prefetch), "--loglevel", loglevel, "--task-events",
    ])
