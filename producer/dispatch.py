"""``amodal dispatch``: feed recorded jobs to the first stage as the queues drain, and send again the
step of any job that stalled.

A submission records rows in storage (``datasets/<d>/rows/``) and publishes nothing. This process
starts their jobs in row order, keeping at most ``AMODAL_DISPATCH_HIGH_WATER`` jobs in flight (sent,
no outcome yet). A job in flight has at most one message in the broker, so the broker holds a bounded
number of messages whatever the datasets' sizes. Starting a job is the create-only write of its state
0: a job that exists already (a resubmission, or a restart of this process) gets no second message.

Every ``AMODAL_DISPATCH_SCAN_INTERVAL`` seconds it lists the state versions of each job in flight (one
listing a job: the cost grows with the jobs in flight, never with the jobs ever submitted). A job that
reached ``done`` leaves the set (its outcome marker is written again, in case its worker died before
writing it), and the records of the jobs a scan saw end are gathered in one page per rows chunk
(``amodal.jobstore.write_record_page``), which the manifest reads instead of one ``job.json`` a row, and
counted per chunk (``producer.tally``: what ``status`` reads); a chunk's pages are merged into one once none
of its jobs is in flight.
A job whose state has not advanced for :func:`stall_after` seconds and has no message in a queue or
in the broker's unacknowledged set (a message lost between kombu's BRPOP and its record of the
delivery, or a sender that died between commit and send) is stalled: its current step is sent again,
at most once per :func:`stall_after`. The protocol of ``tasks.stage`` makes a duplicate harmless, and
every delivery counts as an attempt, so a job that keeps stalling ends ``failed``.

Its progress lives in storage (``dispatch/state.json``: a feed cursor per dataset, the jobs in
flight and who holds the lock), so it survives its own restart. Every stage worker runs this loop
(``workers.dispatcher``) and ``amodal dispatch`` runs it alone; a Redis lock lets one of them work at a
time while the others wait on it. The holder renews the lock every round; one that dies holding it
loses it after ``AMODAL_DISPATCH_LOCK_SECONDS`` (60 s), and a waiting one takes over at once.

Accounting for status and metrics, plain functions over the stored progress:

- :func:`in_flight` ``(store) -> {dataset: jobs in flight}``
- :func:`stalled` ``(store, now) -> {dataset: jobs in flight that have not advanced for stall_after()}``
- :func:`waiting` ``(store, dataset) -> jobs recorded and not started yet``
- :func:`heartbeat` ``(store) -> time of the dispatcher's last round, or None``
- :func:`holder` ``(store) -> the name of the process that last held the lock, or None``
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import socket
import threading
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from amodal.config import Environment, environment
from amodal.jobstore import (ROWS_PER_CHUNK, commit_state, load_state, read_rows_chunk, read_submission,
                             record_outcome)
from amodal.keys import DISPATCH_ADOPT, DISPATCH_OPEN, DISPATCH_STATE, result_prefix, state_version, states_prefix
from amodal.state import WORK_STAGES, JobState
from amodal.storage import ObjectNotFound, Storage, open_storage
from producer.tally import Tally

log = logging.getLogger(__name__)

LOCK_NAME = "amodal:dispatch"
SAVE_EVERY = 15.0  # seconds between two stores of an unchanged progress (its heartbeat)
READY_MESSAGE = "dispatching:"  # logged once the lock is held and the stored progress loaded
ALIVE_FILE = Path(tempfile.gettempdir()) / "amodal-dispatch.alive"  # touched every round: the container's healthcheck


def stall_after(env: Environment | None = None) -> float:
    """Seconds without progress after which a job in flight is stalled: the longest a step may run,
    plus the broker's wait before it hands back a lost worker's message, plus a margin."""
    env = env or environment()
    return float(env.task_time_limit + env.visibility_timeout + env.stall_margin)


@dataclass
class Flight:
    """A job in flight as the dispatcher last saw it."""

    dataset: str
    version: int  # -1: not read yet
    stage: str
    since: float  # wall-clock time its state was last seen to advance
    resent: int = 0  # times its step was sent again
    resent_at: float = 0.0
    chunk: list[int] | None = None  # [generation, index] of the rows chunk it was started from


@dataclass
class Progress:
    """What ``dispatch/state.json`` holds."""

    cursors: dict[str, list[int]]  # dataset -> [generation, rows started or skipped]
    flights: dict[str, Flight]
    heartbeat: float = 0.0
    stall_after: float = 0.0
    holder: str = ""  # the process that holds the lock: a worker's node name, or dispatch@host

    def to_json(self) -> bytes:
        return json.dumps({"cursors": self.cursors, "heartbeat": self.heartbeat, "stall_after": self.stall_after,
                           "holder": self.holder,
                           "flights": {job: asdict(f) for job, f in self.flights.items()}}).encode()


def read_progress(store: Storage) -> Progress:
    try:
        raw = json.loads(store.get(DISPATCH_STATE))
    except ObjectNotFound:
        return Progress({}, {})
    return Progress(raw["cursors"], {job: Flight(**f) for job, f in raw["flights"].items()}, raw["heartbeat"],
                    raw["stall_after"], raw.get("holder", ""))


# -- accounting --------------------------------------------------------------------------------
def in_flight(store: Storage) -> dict[str, int]:
    """Jobs in flight per dataset: started by the dispatcher, no outcome seen yet."""
    counts: dict[str, int] = {}
    for flight in read_progress(store).flights.values():
        counts[flight.dataset] = counts.get(flight.dataset, 0) + 1
    return counts


def stalled(store: Storage, now: float | None = None) -> dict[str, int]:
    """Jobs in flight per dataset whose state has not advanced for ``stall_after()`` seconds by ``now``
    (default: the present); the dispatcher sends their step again."""
    progress, now = read_progress(store), time.time() if now is None else now
    limit = progress.stall_after or stall_after()
    counts: dict[str, int] = {}
    for flight in progress.flights.values():
        if now - flight.since > limit:
            counts[flight.dataset] = counts.get(flight.dataset, 0) + 1
    return counts


def waiting(store: Storage, dataset: str) -> int:
    """Rows recorded for the dataset that the dispatcher has not reached yet (refused rows included)."""
    submission = read_submission(store, dataset)
    if submission is None:
        return 0
    generation, done = read_progress(store).cursors.get(dataset, [submission["generation"], 0])
    return submission["sent"] - (done if generation == submission["generation"] else 0)


def heartbeat(store: Storage) -> float | None:
    """When the dispatcher last finished a round (``time.time()``), or None if none ever ran."""
    return read_progress(store).heartbeat or None


def holder(store: Storage) -> str | None:
    """The name of the process whose dispatcher last stored its progress, or None."""
    return read_progress(store).holder or None


# -- what submissions write ------------------------------------------------------------------------
def open_dataset(store: Storage, dataset: str) -> None:
    """Tell the dispatcher the dataset has rows to start (written after each recorded chunk)."""
    store.put(DISPATCH_OPEN + dataset, b"")


def adopt(store: Storage, dataset: str, job: str) -> None:
    """Ask the dispatcher to watch a job sent without it (``Client.submit``)."""
    store.put(f"{DISPATCH_ADOPT}{dataset}/{job}", b"")


def first_state(dataset: str, row: dict, submission: dict) -> JobState:
    """State 0 of a recorded row's job."""
    return JobState(job_id=row["job_id"], dataset=dataset, image_key=row["image_key"], query=row["query"],
                    mask_key=row.get("mask_key"), inputs=submission["inputs"], settings=submission["job_settings"],
                    result_prefix=result_prefix(dataset, row["job_id"]))


# -- the broker --------------------------------------------------------------------------------
def message_job(raw: bytes) -> tuple[str, int] | None:
    """(job id, version) of a stage message as kombu's Redis transport stores it."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an unacknowledged entry: [message, exchange, routing key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]), int(args[1])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu's transport keeps ``queue`` in: the queue's name for the default priority,
    then one suffixed list per further priority step."""
    from kombu.transport.redis import Channel

    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in Channel.priority_steps]


def queued_messages(client) -> set[tuple[str, int]]:
    """(job id, version) of every message in a stage queue or held unacknowledged by a worker."""
    from kombu.transport.redis import Channel

    found: set[tuple[str, int]] = set()
    keys = [key for stage in WORK_STAGES for key in queue_keys(stage)]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.lrange(key, 0, -1)
        pipe.hvals(Channel.unacked_key)
        for batch in pipe.execute():
            found.update(job for raw in batch if (job := message_job(raw)) is not None)
    return found


# -- the process ---------------------------------------------------------------------------------
class Dispatcher:
    """Feeds the first stage up to the high-water mark and recovers stalled jobs (module docstring)."""

    def __init__(self, store: Storage, env: Environment | None = None, redis_client=None, name: str = "") -> None:
        env = env or environment()
        self.store, self.broker_url, self.redis = store, env.broker_url, redis_client
        self.mark, self.scan_interval, self.stall_after = env.dispatch_high_water, env.dispatch_scan_interval, \
            stall_after(env)
        self.pool = ThreadPoolExecutor(env.submit_concurrency)
        self.progress = read_progress(store)
        self.progress.stall_after = self.stall_after
        self.progress.holder = name or f"dispatch@{socket.gethostname()}"
        self._chunk: dict[str, tuple[tuple[int, int], list[dict]]] = {}  # dataset -> (generation, index), rows
        self._next_scan = time.monotonic() + self.scan_interval
        self._saved = ""  # the cursors and flights last stored, as JSON
        self.tally = Tally(store, self.pool)

    def round(self) -> None:
        """One round: watch adopted jobs, start jobs while there is room, check the jobs in flight
        when a scan is due, then store the progress."""
        self._adopt()
        self._feed()
        if time.monotonic() >= self._next_scan:
            self.scan()
            self._next_scan = time.monotonic() + self.scan_interval
        self._save()

    def _save(self) -> None:
        """Store the progress when it changed, and at least every ``SAVE_EVERY`` seconds (the heartbeat)."""
        now = time.time()
        work = json.dumps([self.progress.cursors, {job: asdict(f) for job, f in self.progress.flights.items()}])
        if work != self._saved or now - self.progress.heartbeat >= SAVE_EVERY:
            self.progress.heartbeat = now
            self.store.put(DISPATCH_STATE, self.progress.to_json())
            self._saved = work

    # 1. jobs sent by Client.submit
    def _adopt(self) -> None:
        for key in list(self.store.list(DISPATCH_ADOPT)):
            dataset, job = key[len(DISPATCH_ADOPT):].rsplit("/", 1)
            self.progress.flights.setdefault(job, Flight(dataset, -1, "", time.time()))
            self.store.delete(key)

    # 2. starting recorded jobs
    def _feed(self) -> None:
        for key in list(self.store.list(DISPATCH_OPEN)):
            room = self.mark - len(self.progress.flights)
            if room <= 0:
                return
            self._feed_dataset(key[len(DISPATCH_OPEN):], room)

    def _feed_dataset(self, dataset: str, room: int) -> None:
        submission = read_submission(self.store, dataset)
        if submission is None:
            self.store.delete(DISPATCH_OPEN + dataset)
            return
        generation, done = self.progress.cursors.get(dataset, [submission["generation"], 0])
        if generation != submission["generation"]:
            generation, done = submission["generation"], 0
        rows = []
        while len(rows) < room and done < submission["sent"]:
            row = self._row(dataset, generation, done)
            if row is None:  # a new generation replaced the rows meanwhile: next round
                break
            if not row.get("status"):  # rows refused at submission have no job
                rows.append((done, row))
            done += 1
        self._start(dataset, submission, generation, rows)
        self.progress.cursors[dataset] = [generation, done]
        if done >= submission["sent"] and submission["complete"]:
            self._close(dataset, submission)

    def _row(self, dataset: str, generation: int, index: int) -> dict | None:
        where = (generation, index // ROWS_PER_CHUNK)
        cached = self._chunk.get(dataset)
        if cached is None or cached[0] != where:
            cached = self._chunk[dataset] = (where, read_rows_chunk(self.store, dataset, *where))
        rows = cached[1]
        return rows[index % ROWS_PER_CHUNK] if index % ROWS_PER_CHUNK < len(rows) else None

    def _start(self, dataset: str, submission: dict, generation: int, rows: list[tuple[int, dict]]) -> None:
        """Create each (row index, row)'s job state 0 and send its first step; a job that existed gets no
        message (it is watched, and sent again only if it stalls)."""
        from tasks.app import publisher, send_stage

        states = [first_state(dataset, row, submission) for _, row in rows]
        created = list(self.pool.map(lambda s: commit_state(self.store, s), states))
        now = time.time()
        with publisher(self.broker_url) as producer:
            for (index, _), state, new in zip(rows, states, created):
                if new:
                    send_stage(state.stage, state.job_id, 0, producer=producer)
                self.progress.flights[state.job_id] = Flight(dataset, 0 if new else -1, state.stage, now,
                                                             chunk=[generation, index // ROWS_PER_CHUNK])

    def _close(self, dataset: str, submission: dict) -> None:
        """Drop the dataset's marker; put it back if a submission recorded more meanwhile."""
        self.store.delete(DISPATCH_OPEN + dataset)
        if read_submission(self.store, dataset) != submission:
            open_dataset(self.store, dataset)

    # 3. the jobs in flight
    def scan(self) -> None:
        from tasks.app import publisher, send_stage

        queued = queued_messages(self.redis) if self.redis is not None else set()
        jobs = list(self.progress.flights)
        now = time.time()
        ended: dict[tuple[str, int, int], list[JobState]] = {}  # (dataset, generation, chunk) -> jobs that ended
        stalled_jobs: list[str] = []
        for job, state in zip(jobs, self.pool.map(self._changed, jobs)):
            flight = self.progress.flights[job]
            if state is not None:
                if flight.version >= 0:
                    flight.since = now
                flight.version, flight.stage = state.version, state.stage
                if state.stage == "done":
                    record_outcome(self.store, state)
                    if flight.chunk is not None:
                        ended.setdefault((flight.dataset, *flight.chunk), []).append(state)
                    del self.progress.flights[job]
                    continue
            if flight.version >= 0 and now - flight.since > self.stall_after \
                    and now - flight.resent_at > self.stall_after and (job, flight.version) not in queued:
                log.warning("job %s stalled at %s v%d for %.0f s: sending its step again", job, flight.stage,
                            flight.version, now - flight.since)
                stalled_jobs.append(job)
        if stalled_jobs:
            with publisher(self.broker_url) as producer:
                for job in stalled_jobs:
                    flight = self.progress.flights[job]
                    send_stage(flight.stage, job, flight.version, producer=producer)
                    flight.resent, flight.resent_at = flight.resent + 1, now
        self._tally_ended(ended)

    def _tally_ended(self, ended: dict[tuple[str, int, int], list[JobState]]) -> None:
        """Page and count the jobs that ended, per rows chunk (producer.tally); merge the pages of chunks
        left with no job in flight."""
        for chunk, states in ended.items():
            self.tally.ended(chunk, states)
        busy = {(f.dataset, *f.chunk) for f in self.progress.flights.values() if f.chunk is not None}
        for chunk in ended:
            self.tally.finished(chunk, busy, self.progress.cursors.get(chunk[0], [-1, 0]))

    def _changed(self, job: str) -> JobState | None:
        """The job's latest state if its version is not the one the flight knows, else None (no read)."""
        versions = [state_version(key) for key in self.store.list(states_prefix(job))]
        if not versions or max(versions) == self.progress.flights[job].version:
            return None
        return load_state(self.store, job, max(versions))


def run_dispatcher(stop: threading.Event | None = None, name: str = "") -> None:
    """Until ``stop`` is set (or SIGTERM/SIGINT): a round every ``AMODAL_DISPATCH_INTERVAL`` seconds, while
    holding the dispatch lock; a lock lost (a broker restarted without persistence, or a round longer than
    the lease) is waited for again. ``name`` is recorded as the lock's holder."""
    import redis

    from tasks.app import app

    env = environment()
    env.require_storage_url()
    stop = stop or _stop_on_signals()
    app.conf.task_send_sent_event = False  # half of the publishing time, and Flower has no use for it here
    client = redis.Redis.from_url(env.broker_url) if env.broker_url.startswith(("redis://", "rediss://")) else None
    held = client.lock(LOCK_NAME, timeout=env.dispatch_lock_seconds) if client is not None else None
    if held is not None and not _take(held, stop):
        return
    name = name or f"dispatch@{socket.gethostname()}"
    try:
        dispatcher = Dispatcher(open_storage(env.storage_url), env, client, name)
        log.info("%s %s (pid %d) holds the lock; high-water mark %d jobs in flight, stalled after %.0f s",
                 READY_MESSAGE, name, os.getpid(), dispatcher.mark, dispatcher.stall_after)
        while not stop.is_set():
            try:
                dispatcher.round()
            except Exception:  # a broker or storage outage: try again next round
                log.exception("dispatch round failed; retrying")
            if held is not None and not _renew(held):
                log.warning("the dispatch lock was lost; taking it again")
                if not _take(held, stop):
                    return
                dispatcher = Dispatcher(open_storage(env.storage_url), env, client, name)  # another may have worked
            ALIVE_FILE.touch()
            stop.wait(env.dispatch_interval)
    finally:
        if held is not None and _owned(held):
            held.release()


def _take(lock, stop: threading.Event) -> bool:
    """Wait until ``lock`` is held (True) or ``stop`` is set (False); a broker that does not answer is
    waited for."""
    import redis

    while not stop.is_set():
        ALIVE_FILE.touch()
        try:
            if lock.acquire(blocking=True, blocking_timeout=5):
                return True
            log.info("another dispatcher holds the lock; waiting")
        except redis.exceptions.ConnectionError as exc:
            log.warning("the broker does not answer (%s); waiting", exc)
            stop.wait(5)
    return False


def _renew(lock) -> bool:
    """Extend the lock's lease; False if it is no longer ours. While the broker does not answer, it is
    kept (no other dispatcher can publish either)."""
    import redis

    try:
        lock.reacquire()
    except redis.exceptions.LockNotOwnedError:
        return False
    except redis.exceptions.ConnectionError as exc:
        log.warning("the broker does not answer (%s); keeping the lock", exc)
    return True


def _owned(lock) -> bool:
    import redis

    try:
        return lock.owned()
    except redis.exceptions.ConnectionError:
        return False


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def add_dispatch_command(subparsers, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    """Add ``dispatch`` to the ``amodal`` command's subparsers."""
    text = ("start submitted jobs as the queues drain and send again the step of stalled jobs, apart from the "
            "workers (every `amodal worker` runs this loop too; one at a time works, by a lock in Redis)")
    parser = subparsers.add_parser(
        "dispatch", help=text, formatter_class=formatter_class,
        description=f"{text}. Reads AMODAL_BROKER_URL and AMODAL_STORAGE_URL; at most AMODAL_DISPATCH_HIGH_WATER "
                    "jobs in flight.")
    parser.set_defaults(func=cmd_dispatch)
    return parser


def cmd_dispatch(args: argparse.Namespace) -> int:
    from amodal.storage import check_storage

    check_storage(open_storage(environment().require_storage_url()))  # it commits jobs' first states: create-only writes must hold
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)  # a service's log: its start, the lock, stalled jobs
    run_dispatcher()
    return 0
