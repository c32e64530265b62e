"""Stages that serve many jobs per model call (``segment``, ``occlusion`` and ``inpaint``).

A batched stage is a celery-batches ``Batches`` task: the worker buffers up to the stage's batch
size of messages (its prefetch is raised to match) or waits its flush interval, then hands them to a
pool process together. Messages are acknowledged when the batch returns, so a worker lost mid-batch
hands every one of them back. Sizes and intervals come from ``AMODAL_<STAGE>_BATCH`` and
``AMODAL_<STAGE>_FLUSH``.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Any, Collection

from celery.worker.request import Request
from celery_batches import Batches, SimpleRequest

from amodal.state import JobState
from amodal.steps import run_batch
from tasks.app import app, send_stage
from tasks.stage import MAX_ATTEMPTS, advance, claim, context, fail

log = logging.getLogger(__name__)
# inpaint: 16 measured 1,043 images/hour on one H100 against 849 at 8 (bench/results/gpu_throughput_clip_tagger.json,
# gpu_throughput_b8.json). segment: 4 jobs per call cut the stage's time per image from 1.88 s to 1.47 s
# (bench/results/gpu_throughput_segment_batch1.json, gpu_throughput_segment_batch4.json); 8 cut it no further
# and, with SAM encoding 8 at once, took the card to 78 GiB. occlusion: a job asks about 2(N-1) pairs, so 8 jobs
# fill InstaOrder's batch of 64 (an H100 runs a pair in 5.1 ms alone, 0.33 ms in a bf16 batch of 64).
DEFAULTS = {"segment": (4, 0.2), "occlusion": (8, 0.2), "inpaint": (16, 0.5)}


def batch_size(stage: str) -> int:
    return int(os.environ.get(f"AMODAL_{stage.upper()}_BATCH", DEFAULTS[stage][0]))


def flush_interval(stage: str) -> float:
    return float(os.environ.get(f"AMODAL_{stage.upper()}_FLUSH", DEFAULTS[stage][1]))


class BatchPerProcess(Batches):
    """``Batches`` that keeps buffering while every pool process runs a batch.

    ``Batches`` flushes on its timer whether or not the pool is free: a busy worker then queues one
    small batch per interval behind the running ones (measured: 1-2 jobs per diffusion call with
    hundreds waiting), and batching buys nothing. Holding the buffer until a pool process is done
    (or lost: billiard marks its job ready with ``WorkerLostError``) lets the next batch fill up.
    """

    _running: tuple[tuple[Any, float], ...] = ()  # (pool job, start) of each batch in flight

    def Strategy(self, task: Batches, app: Any, consumer: Any) -> Any:  # noqa: N802 - Celery's name
        """Called on every consumer start. Celery clears the event loop's timers when it reconnects to
        the broker (``celery.worker.loops``), killing the flush timer armed before: arm a new one with
        the next message, or the buffer would only flush when it fills. The pool drops the jobs it had
        not started, which would never report ready: forget the batches in flight."""
        self._tref, self._running = None, ()
        return super().Strategy(task, app, consumer)

    def _do_flush(self) -> None:
        now = time.monotonic()
        hold_limit = self.app.conf.task_time_limit or 3600  # a pool job never marked ready stops holding
        self._running = tuple(
            (job, since) for job, since in self._running
            if not getattr(job, "ready", lambda: True)() and now - since < hold_limit  # inline pools: done
        )
        if len(self._running) >= (self.app.conf.worker_concurrency or 1):
            return  # the timer stays armed and tries again
        super()._do_flush()

    def flush(self, requests: Collection[Request]) -> Any:
        job = super().flush(requests)
        self._running = (*self._running, (job, time.monotonic()))
        return job


def batched_stage(stage: str):
    """The Celery task of a batched stage."""

    @app.task(name=f"amodal.{stage}", base=BatchPerProcess, flush_every=batch_size(stage),
              flush_interval=flush_interval(stage), acks_late=True)
    def run(requests: list[SimpleRequest]) -> int:
        return run_requests(stage, requests)

    return run


def run_requests(stage: str, requests: list[SimpleRequest]) -> int:
    """Run every live request; jobs with different settings go in separate model calls.

    A job on its second or later attempt runs alone, after the others, so a job that kills its
    worker cannot take the jobs batched with it down again and again: they are committed first.
    """
    groups: dict[str, list[JobState]] = defaultdict(list)
    retries: list[list[JobState]] = []
    messages = dict.fromkeys(tuple(request.args[:2]) for request in requests)  # copies of one message run once
    for job_id, version in messages:
        state = claim(job_id, version, stage)
        if state is None:
            continue
        if state.attempts[stage] > 1:
            retries.append([state])
        else:
            groups[state.job_settings().result_fingerprint()].append(state)
    batches = [*groups.values(), *retries]
    for states in batches:
        log.info("%s step of %d job(s): %s", stage, len(states), " ".join(s.job_id for s in states))
        try:
            run_batch(stage, states, context(states[0]))
        except Exception as exc:  # noqa: BLE001 - each job is retried or failed on its own
            log.exception("%s batch of %d failed", stage, len(states))
            for state in states:
                _retry_or_fail(stage, state, exc)
            continue
        for state in states:  # a job not routed on would be lost: the batch's messages are acknowledged
            try:
                advance(state)
            except Exception as exc:  # noqa: BLE001
                log.exception("job %s: %s step done, but not committed or routed on", state.job_id, stage)
                _retry_or_fail(stage, state, exc)
    return sum(len(states) for states in batches)


def _retry_or_fail(stage: str, state: JobState, exc: Exception) -> None:
    attempt = state.attempts[stage]
    if attempt >= MAX_ATTEMPTS:
        fail(state.job_id, state.version, f"{type(exc).__name__}: {exc}")
    else:
        send_stage(stage, state.job_id, state.version, countdown=min(5 * 2 ** attempt, 300))
