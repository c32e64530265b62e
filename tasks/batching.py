"""The one job protocol of every stage: jobs served many per model call (``segment``, ``occlusion`` and
``inpaint`` by default; a stage that is not batched takes batches of one).

A stage's task is a celery-batches ``Batches`` task: the worker buffers up to the stage's batch
size of messages (its prefetch is raised to match) or waits its flush interval, then hands them to a
pool process together. Messages are acknowledged when the batch returns: a batch whose pool process
is lost (or killed at the hard time limit) hands its messages back to the queue at once, and a
worker lost whole hands them back through the broker's visibility timeout. Sizes and intervals come
from ``AMODAL_<STAGE>_BATCH`` and ``AMODAL_<STAGE>_FLUSH``.

celery-batches sends no task events, so monitors (Flower) would never see these steps. Each message
is reported as a task of its own, under its own id, by the worker's event dispatcher, as Celery's
``Request`` reports a plain task: ``task-received`` when it is buffered, ``task-started`` when its
batch starts in a pool process, and ``task-succeeded``, ``task-retried`` or ``task-failed`` (with
its ``runtime``) from the outcome the pool process returns for it. The worker's own counts
(``inspect stats``, ``active``) follow the same requests.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections import defaultdict
from typing import Any, Collection, NamedTuple

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import signals
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from celery.worker.state import task_ready
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from amodal.config import environment
from amodal.state import JobState
from amodal.steps import run_batch
from tasks.app import app, send_stage
from tasks.stage import MAX_ATTEMPTS, advance, claim, context, fail

log = logging.getLogger(__name__)


def batch_size(stage: str) -> int:
    """Jobs per model call of a batched stage (``AMODAL_<STAGE>_BATCH``; defaults and their measurements in
    :mod:`amodal.config`)."""
    return environment().batch_size(stage)


def flush_interval(stage: str) -> float:
    """Seconds a partial batch waits for more jobs (``AMODAL_<STAGE>_FLUSH``)."""
    return environment().flush_interval(stage)


class Outcome(NamedTuple):
    """What became of one message in a batch: its task event (``succeeded``, ``retried`` or ``failed``)
    and the event's fields (``runtime``: seconds from the batch's start until its step was settled)."""

    event: str
    fields: dict[str, Any]


# The batch raised before it settled every message (celery-batches logs the error in the pool process);
# its runtime is the batch's.
BATCH_RAISED = Outcome("failed", {"exception": "the batch raised before this step was settled; see the worker's log"})


class BatchPerProcess(Batches):
    """``Batches`` that keeps buffering while every pool process runs a batch, and never hands a pool
    process more than the batch size.

    ``Batches`` flushes on its timer whether or not the pool is free: a busy worker then queues one
    small batch per interval behind the running ones (measured: 1-2 jobs per diffusion call with
    hundreds waiting), and batching buys nothing. Holding the buffer until a pool process is done
    (or lost: billiard marks its job ready with ``WorkerLostError``) lets the next batch fill up.
    A held buffer can outgrow the batch size (the prefetch covers every process's batch); ``Batches``
    would flush it whole, one call of 32 diffusion jobs at an inpaint batch of 16 (measured with three
    pool processes: that process took 23 GiB instead of 13). Each free process takes at most
    ``flush_every`` of them; the rest stay buffered for the next.
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
        """Hand ``requests`` to the free pool processes, at most ``flush_every`` to each; what is left
        goes back to the buffer."""
        requests = list(requests)
        free = max(1, (self.app.conf.worker_concurrency or 1) - len(self._running))
        size = self.flush_every
        job = None
        for start in range(0, min(len(requests), free * size), size):
            job = self._run_batch(requests[start:start + size])
        for request in requests[free * size:]:
            self._buffer.put(request)
        return job

    def _run_batch(self, requests: list[Request]) -> Any:
        """Hand ``requests`` to a pool process as one batch; each is reported on as the batch starts and ends."""

        def on_started(pid: int, time_accepted: float) -> None:
            for request in requests:
                request.on_accepted(pid, time_accepted)  # the worker's count, active list, task-started

        def on_return(outcomes: dict[str, Outcome] | None) -> None:
            for request in requests:
                outcome = (outcomes or {}).get(request.id, BATCH_RAISED)
                task_ready(request, successful=outcome.event == "succeeded")
                request.acknowledge()
                since_start = time.time() - request.time_start if request.time_start else 0.0
                request.send_event(f"task-{outcome.event}", **{"runtime": since_start, **outcome.fields})

        def on_lost(einfo: ExceptionInfo) -> None:
            """The pool process died or hit the hard time limit: every message goes back to the queue
            (``task_reject_on_worker_lost``); as Celery does for a requeued task, no event is sent."""
            exc = einfo.exception.exc if isinstance(einfo.exception, ExceptionWithTraceback) else einfo.exception
            log.error("%s batch of %d lost: %r", self.name, len(requests), exc)
            for request in requests:
                task_ready(request)
                request.reject(requeue=True)

        job = self._pool.apply_async(
            apply_batches_task, (self, ([SimpleRequest.from_request(r) for r in requests],), 0, None),
            accept_callback=on_started, callback=on_return, error_callback=on_lost,
        )
        self._running = (*self._running, (job, time.monotonic()))
        return job


@signals.task_received.connect
def _report_buffered(sender: Any, request: Request, **_: Any) -> None:
    """``task-received`` for a message of a batched stage, as ``celery.worker.strategy`` sends it
    for a plain task (celery-batches buffers the message and sends only the signal)."""
    if isinstance(request.task, Batches):
        request.send_event(
            "task-received", name=request.name, args=request.argsrepr, kwargs=request.kwargsrepr,
            root_id=request.root_id, parent_id=request.parent_id, retries=request.request_dict.get("retries", 0),
            eta=request.eta and request.eta.isoformat(), expires=request.expires and request.expires.isoformat(),
        )


def batched_stage(stage: str):
    """The Celery task of a batched stage."""

    @app.task(name=f"amodal.{stage}", base=BatchPerProcess, flush_every=batch_size(stage),
              flush_interval=flush_interval(stage), acks_late=True)
    def run(requests: list[SimpleRequest]) -> dict[str, Outcome]:
        return run_requests(stage, requests)

    return run


def run_requests(stage: str, requests: list[SimpleRequest]) -> dict[str, Outcome]:
    """Run every live request; jobs with different settings go in separate model calls. Returns the
    outcome of each request, by its id (a stale message's step is done: it succeeds, as ``stale``).

    A job on its second or later attempt runs alone, after the others, so a job that kills its
    worker cannot take the jobs batched with it down again and again: they are committed first. A
    message that cannot be claimed (its state unreadable) fails alone; the dispatcher sends its job's
    step again once the job counts as stalled.
    """
    start = time.monotonic()
    outcomes: dict[tuple[str, int], Outcome] = {}

    def settle(message: tuple[str, int], event: str, fields: dict[str, Any]) -> None:
        outcomes[message] = Outcome(event, {**fields, "runtime": time.monotonic() - start})

    groups: dict[str, list[tuple[tuple[str, int], JobState]]] = defaultdict(list)
    retries: list[list[tuple[tuple[str, int], JobState]]] = []
    messages = dict.fromkeys(tuple(request.args[:2]) for request in requests)  # copies of one message run once
    for message in messages:
        try:
            state = claim(*message, stage)
        except Exception as exc:  # noqa: BLE001 - the others run; the dispatcher sends this job's step again
            log.exception("job %s v%d: %s message not claimed", *message, stage)
            settle(message, "failed", _error_fields(exc))
            continue
        if state is None:
            settle(message, "succeeded", {"result": "stale"})
        elif state.attempts[stage] > 1:
            retries.append([(message, state)])
        else:
            groups[state.job_settings().result_fingerprint()].append((message, state))
    for batch in [*groups.values(), *retries]:
        states = [state for _, state in batch]
        log.info("%s step of %d job(s): %s", stage, len(states), " ".join(s.job_id for s in states))
        try:
            run_batch(stage, states, context(states[0]))
        except Exception as exc:  # noqa: BLE001 - each job is retried or failed on its own
            log.exception("%s batch of %d failed", stage, len(states))
            for message, state in batch:
                settle(message, *_retry_or_fail(stage, state, exc))
            continue
        for message, state in batch:  # a job not routed on would be lost: the batch's messages are acknowledged
            try:
                advance(state)
            except Exception as exc:  # noqa: BLE001
                log.exception("job %s: %s step done, but not committed or routed on", state.job_id, stage)
                settle(message, *_retry_or_fail(stage, state, exc))
            else:
                settle(message, "succeeded", {"result": state.stage})
    return {request.id: outcomes[tuple(request.args[:2])] for request in requests}


def _retry_or_fail(stage: str, state: JobState, exc: Exception) -> tuple[str, dict[str, str]]:
    """Send the job back to its step later, or fail it after its last attempt; the task event that says so."""
    attempt = state.attempts[stage]
    if attempt >= MAX_ATTEMPTS:
        fail(state.job_id, state.version, f"{type(exc).__name__}: {exc}")
        event = "failed"
    else:
        send_stage(stage, state.job_id, state.version, countdown=min(5 * 2 ** attempt, 300))
        event = "retried"
    return event, _error_fields(exc)


def _error_fields(exc: Exception) -> dict[str, str]:
    """A task event's fields for an exception (as Celery's own failure events carry them)."""
    return {"exception": saferepr(exc), "traceback": "".join(traceback.format_exception(exc))}
