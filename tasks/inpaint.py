"""The ``inpaint`` stage: requests from many jobs go through one diffusion call.

Batching is celery-batches' ``Batches`` task: the worker buffers up to ``AMODAL_INPAINT_BATCH``
messages (its prefetch is raised to match) or waits ``AMODAL_INPAINT_FLUSH`` seconds, then runs
them together, one batch at a time. Messages are acknowledged when the batch returns, so a worker
lost mid-batch hands every one of them back.
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
from amodal.steps import run_inpaint
from tasks.app import app, send_stage
from tasks.stage import MAX_ATTEMPTS, advance, claim, context, fail

log = logging.getLogger(__name__)
# 16 measured 1043 images/hour on one H100 against 849 at 8
# (bench/results/gpu_throughput_clip_tagger.json, gpu_throughput_b8.json).
BATCH_SIZE = int(os.environ.get("AMODAL_INPAINT_BATCH", "16"))
FLUSH_SECONDS = float(os.environ.get("AMODAL_INPAINT_FLUSH", "0.5"))


class OneBatchAtATime(Batches):
    """``Batches`` that keeps buffering while its last batch still runs in the pool.

    ``Batches`` flushes on its timer whether or not the pool is free: a busy worker then queues one
    small batch per interval behind the running one (measured: 1-2 jobs per diffusion call with
    hundreds waiting), and batching buys nothing. Holding the buffer until the pool job is done
    (or lost: billiard marks it ready with ``WorkerLostError``) lets the next batch fill up.
    """

    _running: Any = None  # the pool job of the batch in flight
    _since = 0.0

    def _do_flush(self) -> None:
        ready = getattr(self._running, "ready", None)  # prefork's job; other pools run inline
        hold_limit = self.app.conf.task_time_limit or 3600  # a pool job never marked ready stops holding
        if ready is not None and not ready() and time.monotonic() - self._since < hold_limit:
            return  # the timer stays armed and tries again
        super()._do_flush()

    def flush(self, requests: Collection[Request]) -> Any:
        self._running, self._since = super().flush(requests), time.monotonic()
        return self._running


@app.task(name="amodal.inpaint", base=OneBatchAtATime, flush_every=BATCH_SIZE, flush_interval=FLUSH_SECONDS,
          acks_late=True)
def inpaint(requests: list[SimpleRequest]) -> int:
    """Run every live request; jobs with different settings go in separate diffusion calls.

    A job on its second or later attempt runs alone, after the others, so a job that kills its
    worker cannot take the jobs batched with it down again and again: they are committed first.
    """
    groups: dict[str, list[JobState]] = defaultdict(list)
    retries: list[list[JobState]] = []
    messages = dict.fromkeys(tuple(request.args[:2]) for request in requests)  # copies of one message run once
    for job_id, version in messages:
        state = claim(job_id, version, "inpaint")
        if state is None:
            continue
        if state.attempts["inpaint"] > 1:
            retries.append([state])
        else:
            groups[state.job_settings().result_fingerprint()].append(state)
    batches = [*groups.values(), *retries]
    for states in batches:
        log.info("inpainting %d job(s): %s", len(states), " ".join(s.job_id for s in states))
        try:
            run_inpaint(states, context(states[0]))
        except Exception as exc:  # noqa: BLE001 - each job is retried or failed on its own
            log.exception("inpaint batch of %d failed", len(states))
            for state in states:
                _retry_or_fail(state, exc)
            continue
        for state in states:
            advance(state)
    return sum(len(states) for states in batches)


def _retry_or_fail(state: JobState, exc: Exception) -> None:
    attempt = state.attempts["inpaint"]
    if attempt >= MAX_ATTEMPTS:
        fail(state.job_id, state.version, f"{type(exc).__name__}: {exc}")
    else:
        send_stage("inpaint", state.job_id, state.version, countdown=min(5 * 2 ** attempt, 300))
