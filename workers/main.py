"""``amodal worker``: one Celery worker for one stage, pinned to one GPU.

The parent process never touches CUDA: ``CUDA_VISIBLE_DEVICES`` is set before anything imports
torch, and each prefork child loads and warms its models after the fork (``workers.warmup``), so
Celery's time limits and process replacement keep working and no CUDA context is ever forked.
Once ready, the worker also runs the dispatcher's loop in a child process (``workers.dispatcher``).
Logs go to stderr in the format ``amodal --log-format`` chose, and the model libraries' loading
chatter is silenced (``amodal.logs``).
"""
from __future__ import annotations

import os
import sys

from amodal.stages import BY_NAME, GPU_STAGES, NAMES as STAGES
from tasks.nodes import node_name


def processes(stage: str) -> int:
    """Pool processes of a stage's worker unless told otherwise (amodal.stages)."""
    return BY_NAME[stage].processes


def check_worker(stage: str, settings) -> None:
    """Before a worker starts: its stage's checkpoints are in the model folder and the storage is usable."""
    from amodal.config import environment
    from amodal.errors import UsageError
    from amodal.models.registry import check_model_dir, stage_checkpoints
    from amodal.storage import check_storage, open_storage

    env = environment()
    if stage_checkpoints(stage, settings):
        if env.model_dir is None:
            raise UsageError("no model folder: set AMODAL_MODEL_DIR")
        check_model_dir(env.model_dir, settings, (stage,))
    check_storage(open_storage(env.require_storage_url()))


def run_worker(stage: str, gpu: int | None = None, concurrency: int | None = None, loglevel: str = "info") -> None:
    """Run a stage's worker (blocking) with ``concurrency`` pool processes (default :func:`processes`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before the worker pinned its GPU")
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if stage not in GPU_STAGES else str(gpu if gpu is not None else 0)
    os.environ["AMODAL_WORKER_STAGE"] = stage
    # Batches of varying shapes (image sizes, batch sizes) fragment the caching allocator's fixed segments.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from amodal.logs import silence_model_loading
    from celeryconfig import WORKER_PUBLISH_RETRY_POLICY
    from tasks.app import app
    import workers.warmup  # noqa: F401  (connects the per-process warm-up)

    silence_model_loading()
    app.conf.task_publish_retry_policy = WORKER_PUBLISH_RETRY_POLICY
    node = node_name(stage, gpu if stage in GPU_STAGES else None)
    _connect_logging_and_dispatcher(node)

    from tasks.batching import batch_size

    prefetch = batch_size(stage)
    app.conf.worker_concurrency = concurrency or processes(stage)  # batched stages run a batch per process
    app.worker_main([
        "worker", "--queues", stage, "--concurrency", str(app.conf.worker_concurrency), "--pool", "prefork",
        "--hostname", node,
        "--prefetch-multiplier", str(prefetch), "--loglevel", loglevel, "--task-events",
    ])


def _connect_logging_and_dispatcher(node: str) -> None:
    """Celery's signals: logging set up by :func:`amodal.logs.configure_logging` (so Celery redirects no
    stream to a WARNING logger), the dispatcher's loop started once the consumer is ready and stopped at
    shutdown."""
    from celery.signals import setup_logging, worker_ready, worker_shutdown

    from amodal.config import environment
    from amodal.logs import configure_logging

    children = []

    @setup_logging.connect(weak=False)
    def _logging(loglevel=None, **_) -> None:
        configure_logging(loglevel or "INFO", environment().log_format == "json")

    @worker_ready.connect(weak=False)
    def _start_dispatcher(**_) -> None:
        from workers.dispatcher import start

        children.append(start(node))

    @worker_shutdown.connect(weak=False)
    def _stop_dispatcher(**_) -> None:
        from workers.dispatcher import stop

        for child in children:
            stop(child)
