"""What every stage task does: load the state its message names, run the step, commit, route on.

A message is ``(job_id, version)``. The step from ``version`` is done once: whoever creates state
``version + 1`` (a create-only write) owns it and sends the next message. A redelivered or
duplicated message finds ``version + 1`` present and only makes sure the job has moved on (the
sender may have died between committing and sending), so nothing is lost and nothing runs twice
in effect.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np

from amodal.config import environment, worker_runtime
from amodal.canvas import neutral_background
from amodal.images import load_image
from amodal.jobstore import commit_state, load_state, record_outcome
from amodal.keys import attempt_key
from amodal.settings import Settings
from amodal.state import JobState
from amodal.steps import Context, run_step
from amodal.storage import Storage, open_storage
from tasks.app import send_stage

log = logging.getLogger(__name__)
MAX_ATTEMPTS = environment().max_attempts


@functools.cache
def store() -> Storage:
    return open_storage(environment().require_storage_url())


@functools.cache
def inputs(url: str) -> Storage:
    return open_storage(url) if url else store()


@functools.cache
def _models(settings_json: str):
    from amodal.models.registry import ModelSet  # torch loads here, in the worker process only

    model_dir = environment().model_dir
    if not model_dir:
        raise RuntimeError("AMODAL_MODEL_DIR is not set")
    return ModelSet(Path(model_dir), Settings.from_dict(json.loads(settings_json)))


def models_for(settings: Settings):
    """The resident models for these settings (one set per distinct settings, normally one)."""
    return _models(json.dumps(settings.to_dict(), sort_keys=True))


@functools.cache
def _background(path: str) -> np.ndarray:
    return load_image(Path(path).read_bytes(), max_pixels=10**8, min_side=1) if path else neutral_background()


def context(state: JobState) -> Context:
    settings = state.job_settings()
    return Context(store=store(), inputs=inputs(state.inputs), models=models_for(settings),
                   background=_background(settings.background))


def count_attempt(job_id: str, version: int) -> int:
    """Register one more attempt at the step from ``version`` (create-only markers); its number."""
    n = 1
    while not store().put_if_absent(attempt_key(job_id, version, n), b""):
        n += 1
    return n


def claim(job_id: str, version: int, stage: str) -> JobState | None:
    """The state to work on, or None if this message is stale (its step is done, or unknown).

    Every delivery counts as an attempt, so a job that kills its worker each time (a poison job,
    redelivered after every loss) ends as ``failed`` after ``MAX_ATTEMPTS`` instead of looping.
    """
    state = load_state(store(), job_id, version)
    if state is None or state.stage != stage:
        log.warning("ignoring %s message for job %s v%d: no such state", stage, job_id, version)
        return None
    after = load_state(store(), job_id, version + 1)
    if after is None:
        attempt = count_attempt(job_id, version)
        if attempt > MAX_ATTEMPTS:
            fail(job_id, version, f"gave up on the {stage} step after {MAX_ATTEMPTS} attempts "
                                  "(each failed or lost its worker)")
            return None
        state.attempts[stage] = attempt
        state.settings.update(worker_runtime())  # this worker's device, dtype and compilation, not the producer's
        return state
    log.info("job %s v%d: %s already done", job_id, version, stage)
    if after.stage == "done":
        record_outcome(store(), after)
    elif load_state(store(), job_id, version + 2) is None:
        send_stage(after.stage, job_id, after.version)  # the committer may have died before sending
    return None


def advance(state: JobState) -> None:
    """Commit the state a step produced and route the job on; a lost race does nothing."""
    if not commit_state(store(), state):
        log.info("job %s v%d was committed by another worker", state.job_id, state.version)
        return
    if state.stage == "done":
        record_outcome(store(), state)
    else:
        send_stage(state.stage, state.job_id, state.version)


def fail(job_id: str, version: int, message: str) -> None:
    """Retries exhausted: end the job as ``failed`` with its reason (finalize runs here, no models)."""
    state = load_state(store(), job_id, version)
    if state is None or load_state(store(), job_id, version + 1) is not None:
        return
    state.finish("failed", message)
    run_step(state, context(state))
    advance(state)
