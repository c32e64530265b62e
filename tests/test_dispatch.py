"""Submissions that stream and resume, the dispatcher's high-water mark, stalled-job recovery and
resubmission without duplicate messages: on a real Redis and a local storage (fast), then through real
workers (slow)."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import redis

import amodal.jobstore
import producer.client
import producer.dispatch
from amodal.jobstore import commit_state, latest_state, record_outcome
from amodal.keys import records_prefix, result_prefix
from amodal.state import WORK_STAGES
from producer import Client
from producer.dispatch import Dispatcher, in_flight, queued_messages, stalled, waiting
from tasks.app import app
from tests import databases
from tests.cluster import cluster_env, start_workers
from tests.synthetic import synthetic_dataset


@pytest.fixture
def redis_url():
    with databases.emptied(databases.DISPATCH) as url:
        yield url


@pytest.fixture
def broker(redis_url, monkeypatch) -> redis.Redis:
    monkeypatch.setenv("AMODAL_BROKER_URL", redis_url)
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def small_chunks(monkeypatch):
    for module in (amodal.jobstore, producer.client, producer.dispatch):
        monkeypatch.setattr(module, "ROWS_PER_CHUNK", 4)


def dataset(tmp_path: Path, rows: int, images: int = 3, name: str = "rows.jsonl") -> tuple[Path, Path]:
    """``rows`` rows over ``images`` small PNGs (several queries per image)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i in range(images):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    annotations = tmp_path / name
    annotations.write_text("".join(json.dumps({"image": f"{r % images}.png", "query": f"thing {r // images}"}) + "\n"
                                   for r in range(rows)))
    return folder, annotations


def queued(broker: redis.Redis) -> int:
    return sum(broker.llen(stage) for stage in WORK_STAGES)


def finish(client: Client, job: str, record: dict | None = None, marker: bool = False) -> None:
    """What a worker leaves when a job ends: its ``job.json`` (``record``), its last state, ``done``, and
    with ``marker`` its outcome marker (else it is left to the dispatcher, as when the worker died then)."""
    state = latest_state(client.store, job)
    client.store.put(f"{result_prefix(state.dataset, job)}/job.json",
                     json.dumps({"status": "completed", "message": "", "flags": [], **(record or {})}).encode())
    state.version, state.stage, state.status = state.version + 1, "done", "completed"
    assert commit_state(client.store, state)
    if marker:
        record_outcome(client.store, state)


class Counting:
    """Wraps a storage: counts writes per key prefix, and fails the ``fail_at``-th write of a rows chunk."""

    def __init__(self, store, fail_at: int | None = None):
        self.store, self.fail_at, self.writes, self.reads = store, fail_at, [], []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def get(self, key):
        self.reads.append(key)
        return self.store.get(key)

    def put(self, key, data):
        self._note(key)
        return self.store.put(key, data)

    def put_if_absent(self, key, data):
        self._note(key)
        return self.store.put_if_absent(key, data)

    def _note(self, key):
        if "/rows/" in key and self.fail_at is not None and sum("/rows/" in k for k in self.writes) + 1 == self.fail_at:
            raise ConnectionError("storage went away")
        self.writes.append(key)


def test_interrupted_submission_resumes_without_redoing_rows(tmp_path, broker, small_chunks, monkeypatch):
    monkeypatch.setenv("AMODAL_STORAGE_URL", (tmp_path / "store").as_uri())
    images, annotations = dataset(tmp_path, 18, images=6)
    client = Client()
    store = client.store
    client.store = Counting(store, fail_at=3)  # the third chunk's write fails: rows 9-18 never recorded
    with pytest.raises(ConnectionError):
        client.submit_dataset(images, annotations, "big", progress=False)
    counts = client.status("big")
    assert (counts["pending"], counts["not_sent"], counts["total"]) == (8, 10, 18)
    assert "amodal submit --images" in client.resume_command("big")
    assert queued(broker) == 0  # a submission publishes nothing

    client = Client()
    client.store = Counting(store)
    report = client.submit_dataset(images, annotations, "big", progress=False)
    chunks = sorted(k.rsplit("/", 1)[1] for k in client.store.writes if "/rows/" in k)
    assert chunks == ["0000-000002.jsonl", "0000-000003.jsonl", "0000-000004.jsonl"]  # not chunks 0 and 1
    uploads = [k for k in client.store.writes if k.startswith("inputs/")]
    assert len(uploads) == 6  # rows 9-18 name all six images, each uploaded once
    assert report.enqueued == 10 and report.rows == 18
    assert [m["line"] for m in client.manifest("big")] == list(range(1, 19))
    assert client.status("big")["pending"] == 18 and client.status("big")["not_sent"] == 0

    # the same file once more: nothing recorded or uploaded again
    client.store = Counting(store)
    again = client.submit_dataset(images, annotations, "big", progress=False)
    assert not [k for k in client.store.writes if "/rows/" in k or k.startswith("inputs/")]
    assert again.enqueued == 0 and again.finished == 0


def test_duplicates_across_chunks_are_refused(tmp_path, broker, small_chunks, monkeypatch):
    monkeypatch.setenv("AMODAL_STORAGE_URL", (tmp_path / "store").as_uri())
    images, annotations = dataset(tmp_path, 6)
    annotations.write_text(annotations.read_text() + json.dumps({"image": "1.png", "query": "thing 0"}) + "\n")
    report = Client().submit_dataset(images, annotations, "dups", progress=False)
    assert [(r["line"], r["message"]) for r in report.invalid] == [(7, "duplicate of line 2 (same image, query and mask)")]


def test_dispatcher_feeds_up_to_the_mark_and_survives_a_restart(tmp_path, broker, small_chunks, monkeypatch):
    monkeypatch.setenv("AMODAL_STORAGE_URL", (tmp_path / "store").as_uri())
    monkeypatch.setenv("AMODAL_DISPATCH_HIGH_WATER", "5")
    images, annotations = dataset(tmp_path, 13)
    client = Client()
    client.submit_dataset(images, annotations, "fed", progress=False)
    dispatcher = Dispatcher(client.store, redis_client=broker)
    dispatcher.round()
    dispatcher.round()
    assert queued(broker) == 5 and in_flight(client.store) == {"fed": 5} and waiting(client.store, "fed") == 8
    rows = list(client.manifest("fed"))
    fed = {job for job, _ in queued_messages(broker)}
    assert fed == {m["job_id"] for m in rows[:5]}  # in row order

    for m in rows[:3]:  # three jobs end; their messages were taken by workers
        finish(client, m["job_id"])
    broker.delete("ground")
    dispatcher.scan()
    dispatcher.round()
    assert queued(broker) == 3 and in_flight(client.store) == {"fed": 5}
    assert client.status("fed")["completed"] == 3  # outcome markers written when the dispatcher saw `done`

    restarted = Dispatcher(client.store, redis_client=broker)  # a new process: progress from storage
    restarted.round()
    assert queued(broker) == 3 and waiting(client.store, "fed") == 5
    for m in rows[3:8]:
        finish(client, m["job_id"])
    restarted.scan()
    restarted.round()
    restarted.round()
    assert queued(broker) == 3 + 5 and waiting(client.store, "fed") == 0
    assert {job for job, _ in queued_messages(broker)} == {m["job_id"] for m in rows[5:]}


def started(tmp_path: Path, monkeypatch, broker: redis.Redis, rows: int, name: str) -> tuple[Client, Dispatcher]:
    """A dataset of ``rows`` rows submitted to a local storage, and a dispatcher that has started its jobs."""
    monkeypatch.setenv("AMODAL_STORAGE_URL", (tmp_path / "store").as_uri())
    images, annotations = dataset(tmp_path, rows)
    client = Client()
    client.submit_dataset(images, annotations, name, progress=False)
    dispatcher = Dispatcher(client.store, redis_client=broker)
    dispatcher.round()
    return client, dispatcher


def test_manifest_takes_finished_records_from_the_dispatchers_pages(tmp_path, broker, small_chunks, monkeypatch):
    client, dispatcher = started(tmp_path, monkeypatch, broker, 10, "paged")
    rows = list(client.manifest("paged"))

    def record(i: int) -> dict:
        return {"message": f"job {i}", "quality": {"amodal_px": 100 + i}, "flags": ["window_edge"] if i % 2 else []}

    for i, m in enumerate(rows[:7]):  # all of chunk 0 (rows 1-4) and three rows of chunk 1
        finish(client, m["job_id"], record(i))
    dispatcher.scan()
    pages = sorted(client.store.list(records_prefix("paged")))
    assert [key.split("/")[3] for key in pages] == ["0000-000000", "0000-000001"]
    finish(client, rows[7]["job_id"], record(7), marker=True)  # ended after the scan: no page holds it yet

    client.store = Counting(client.store)
    lines = list(client.manifest("paged"))
    assert [line["line"] for line in lines] == list(range(1, 11))
    for i, line in enumerate(lines[:8]):
        assert (line["status"], line["message"], line["quality"], line["flags"]) == \
            ("completed", *record(i).values())
    assert [line["status"] for line in lines[8:]] == ["pending", "pending"]
    read = [key for key in client.store.reads if key.endswith("/job.json")]
    # the rows started and not paged (in flight, or ended since the scan) read their job.json; the rest came
    # from 2 pages
    assert sorted(read) == sorted(f"{result_prefix('paged', m['job_id'])}/job.json" for m in rows[7:])


def test_stalled_job_is_sent_again_once(tmp_path, broker, monkeypatch):
    client, dispatcher = started(tmp_path, monkeypatch, broker, 3, "lost")
    jobs = [m["job_id"] for m in client.manifest("lost")]
    lost = jobs[0]
    # the message lost as kombu can lose it: taken off the queue, never recorded as unacknowledged
    assert broker.rpop("ground") is not None and lost not in {j for j, _ in queued_messages(broker)}
    for flight in dispatcher.progress.flights.values():
        flight.since -= dispatcher.stall_after + 1  # nothing advanced for longer than the bound
    dispatcher.round()
    assert stalled(client.store) == {"lost": 3} and client.status("lost")["stalled"] == 3
    dispatcher.scan()
    assert sorted(queued_messages(broker)) == sorted((j, 0) for j in jobs)  # only the lost one sent again
    assert queued(broker) == 3
    dispatcher.scan()
    assert queued(broker) == 3  # not again before another stall_after
    assert dispatcher.progress.flights[lost].resent == 1


def test_resubmission_in_flight_sends_no_duplicates(tmp_path, broker, small_chunks, monkeypatch):
    monkeypatch.setenv("AMODAL_STORAGE_URL", (tmp_path / "store").as_uri())
    images, annotations = dataset(tmp_path, 6)
    client = Client()
    client.submit_dataset(images, annotations, "again", progress=False)
    dispatcher = Dispatcher(client.store, redis_client=broker)
    dispatcher.round()
    assert queued(broker) == 6
    client.submit_dataset(images, annotations, "again", progress=False)
    dispatcher.round()
    assert queued(broker) == 6
    # a changed file: a new generation of rows; its old rows' jobs exist and get no message
    images, bigger = dataset(tmp_path, 9, name="more.jsonl")
    report = client.submit_dataset(images, bigger, "again", progress=False)
    assert report.enqueued == 9
    fresh = Dispatcher(client.store, redis_client=broker)
    fresh.round()
    fresh.round()
    assert queued(broker) == 9 and len({j for j, _ in queued_messages(broker)}) == 9


# -- through real workers ------------------------------------------------------------------------
SETTINGS = {"preset": "robust", "num_inference_steps": 2, "max_passes": 2}  # every job through every stage


@pytest.fixture
def env(tmp_path, redis_url, s3_bucket, tiny_models, monkeypatch):
    env = cluster_env(redis_url, f"s3://{s3_bucket}/data", tiny_models, SETTINGS)
    # a stalled job is sent again after 60 + 10 + 5 s
    env.update(AMODAL_VISIBILITY_TIMEOUT="10", AMODAL_TASK_TIME_LIMIT="60", AMODAL_STALL_MARGIN="5")
    for key in ("AMODAL_BROKER_URL", "AMODAL_STORAGE_URL"):
        monkeypatch.setenv(key, env[key])
    return env


def submit(env: dict, tmp_path: Path, count: int, name: str) -> Client:
    from tests.cluster import amodal

    images, annotations = synthetic_dataset(tmp_path, count, given=count)
    res = amodal(env, "submit", "--images", str(images), "--annotations", str(annotations), "--dataset", name, "-q",
                 *[f"--set={k}={v}" for k, v in SETTINGS.items()])
    assert res.returncode == 0, res.stderr
    return Client()


@pytest.mark.slow
def test_queue_stays_under_the_mark_through_workers(env, tmp_path):
    from tests.test_faults import assert_exactly_once, wait_all

    env["AMODAL_DISPATCH_HIGH_WATER"] = "3"
    broker = redis.Redis.from_url(env["AMODAL_BROKER_URL"])
    group = start_workers(env, tmp_path / "logs")
    peak, jobs, done = [0], [0], threading.Event()

    def sample() -> None:
        """Messages waiting in the queues, and jobs with a message anywhere (a worker acknowledges a step's
        message after sending the next, so a job may briefly have two)."""
        while not done.is_set():
            peak[0] = max(peak[0], queued(broker))
            jobs[0] = max(jobs[0], len({job for job, _ in queued_messages(broker)}))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        client = submit(env, tmp_path, 10, "marked")
        manifest = wait_all(client, "marked", timeout=600)
    finally:
        done.set()
        sampler.join()
        group.stop()
    assert peak[0] <= 3 and 0 < jobs[0] <= 3, (peak, jobs)  # workers may take each message at once
    assert_exactly_once(client, "marked", manifest, 10)


@pytest.mark.slow
def test_message_removed_mid_run_is_recovered(env, tmp_path):
    """Without a segment worker, jobs wait in its queue; one message is removed with a plain Redis client.
    Its job is sent again within stall_after() plus a scan interval, and every row ends once."""
    from tests.test_faults import assert_exactly_once, wait_all
    from workers.placement import Slot

    broker = redis.Redis.from_url(env["AMODAL_BROKER_URL"])
    slots = [Slot("ground", 0), Slot("occlusion", 0), Slot("inpaint", 0), Slot("finalize", None)]
    group = start_workers(env, tmp_path / "logs", slots)
    try:
        client = submit(env, tmp_path, 3, "removed")
        deadline = time.monotonic() + 300
        while broker.llen("segment") < 3:
            assert time.monotonic() < deadline, "jobs never reached the segment queue"
            time.sleep(0.2)
        removed = producer.dispatch.message_job(broker.rpop("segment"))
        removed_at = time.monotonic()
        group.wait_ready([group.start(Slot("segment", 0))])
        manifest = wait_all(client, "removed", timeout=600)
        recovered_after = time.monotonic() - removed_at
    finally:
        group.stop()
    assert_exactly_once(client, "removed", manifest, 3)
    # the worker whose dispatcher held the lock says so in its log
    assert any(f"job {removed[0]} stalled at segment v{removed[1]}" in group.log(name) for name in group.procs)
    assert recovered_after < 60 + 10 + 5 + 60  # stall_after, then a scan, then the rest of the job


@pytest.mark.slow
def test_sigkill_during_bursts_of_deliveries(env, tmp_path):
    """Segment workers killed as a burst of messages arrives (the window between kombu's BRPOP and its
    record of the delivery): every job still ends with exactly one outcome."""
    from tests.test_faults import assert_exactly_once, wait_all
    from workers.placement import Slot

    broker = redis.Redis.from_url(env["AMODAL_BROKER_URL"])
    group = start_workers(env, tmp_path / "logs", [Slot(s, 0) for s in ("ground", "occlusion", "inpaint")]
                          + [Slot("finalize", None)])
    try:
        client = submit(env, tmp_path, 8, "burst")
        deadline = time.monotonic() + 300
        while broker.llen("segment") < 8:
            assert time.monotonic() < deadline, "jobs never reached the segment queue"
            time.sleep(0.2)
        for _ in range(2):
            name = group.start(Slot("segment", 0))
            while broker.llen("segment") == 8 and group.procs[name].poll() is None:
                time.sleep(0.01)  # the first deliveries of the burst
            group.signal(name, signal.SIGKILL)
            group.procs[name].wait(timeout=30)
            del group.procs[name], group.slots[name]
        group.wait_ready([group.start(Slot("segment", 0))])
        manifest = wait_all(client, "burst", timeout=900)
    finally:
        group.stop()
    assert_exactly_once(client, "burst", manifest, 8)


def for_threads(tmp_path: Path, monkeypatch, caplog, name: str) -> Client:
    """A 4-row dataset submitted, and what a dispatcher run in a thread of this process needs."""
    import logging

    monkeypatch.setenv("AMODAL_STORAGE_URL", (tmp_path / "store").as_uri())
    monkeypatch.setenv("AMODAL_DISPATCH_INTERVAL", "0.1")
    monkeypatch.setitem(app.conf, "task_send_sent_event", app.conf.task_send_sent_event)  # the dispatcher turns it off
    images, annotations = dataset(tmp_path, 4)
    client = Client()
    client.submit_dataset(images, annotations, name, progress=False)
    caplog.set_level(logging.INFO, logger="producer.dispatch")
    return client


def wait_queued(broker: redis.Redis, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while queued(broker) < count:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_one_dispatcher_at_work(tmp_path, broker, monkeypatch, caplog):
    """A second dispatcher waits on the lock; it takes over, from the stored progress, when the first stops."""
    for_threads(tmp_path, monkeypatch, caplog, "locked")
    first, second = threading.Event(), threading.Event()
    threads = [threading.Thread(target=producer.dispatch.run_dispatcher, args=(stop,)) for stop in (first, second)]
    threads[0].start()
    wait_queued(broker, 4)
    threads[1].start()
    time.sleep(6)
    assert caplog.text.count(producer.dispatch.READY_MESSAGE) == 1 and "another dispatcher holds the lock" in caplog.text
    first.set()
    threads[0].join(timeout=30)
    deadline = time.monotonic() + 30
    while caplog.text.count(producer.dispatch.READY_MESSAGE) < 2:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.1)
    second.set()
    threads[1].join(timeout=30)
    assert queued(broker) == 4  # the second started nothing again


def test_dispatcher_outlives_a_broker_that_forgets_its_lock(tmp_path, broker, monkeypatch, caplog):
    """A Redis restarted without persistence has lost the lock (and the queues): the dispatcher takes the
    lock again and goes on feeding."""
    client = for_threads(tmp_path, monkeypatch, caplog, "before")
    stop = threading.Event()
    thread = threading.Thread(target=producer.dispatch.run_dispatcher, args=(stop,))
    thread.start()
    try:
        wait_queued(broker, 4)
        broker.flushdb()  # what a restart of a Redis that keeps nothing on disk leaves
        images, annotations = dataset(tmp_path, 3, name="after.jsonl")
        client.submit_dataset(images, annotations, "after", progress=False)
        wait_queued(broker, 3)
        assert thread.is_alive() and broker.exists(producer.dispatch.LOCK_NAME)
        assert "the dispatch lock was lost; taking it again" in caplog.text
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not broker.exists(producer.dispatch.LOCK_NAME)  # released on the way out


@pytest.mark.slow
def test_killing_the_worker_that_dispatches_loses_no_row(env, tmp_path):
    """No dispatcher process: the workers run its loop. The queues are bound each to its own exchange and
    key. SIGKILL to the lock holder's whole process group mid-run (its supervisor starts it again, as
    compose or `amodal launch` do): another worker's loop takes over within the lock's lease plus a round,
    and every row ends with exactly one outcome."""
    from kombu.transport.redis import Channel

    from producer.dispatch import holder
    from tests.cluster import wait_for_dispatcher
    from tests.test_faults import assert_exactly_once, wait_all
    lease = 8
    env.update(AMODAL_DISPATCH_LOCK_SECONDS=str(lease), AMODAL_DISPATCH_HIGH_WATER="2")
    broker = redis.Redis.from_url(env["AMODAL_BROKER_URL"])
    group = start_workers(env, tmp_path / "logs")
    try:
        for stage in WORK_STAGES:  # kombu's record of a binding: key, pattern, queue joined by its separator
            assert broker.smembers(f"{Channel.keyprefix_queue % stage}") == \
                {Channel.sep.join([stage, "", stage]).encode()}, stage
        client = submit(env, tmp_path, 8, "holder")
        first = wait_for_dispatcher(group)
        deadline = time.monotonic() + 120
        while not client.status("holder")["completed"] + client.status("holder")["unoccluded"]:
            assert time.monotonic() < deadline, "no row ended"
            time.sleep(0.5)
        killed_at = time.monotonic()
        slot = group.slots[first]
        group.signal(first, signal.SIGKILL)
        group.procs[first].wait(timeout=30)
        others = [name for name in group.procs if name != first]
        before = {name: group.log(name).count(producer.dispatch.READY_MESSAGE) for name in others}
        while not any(group.log(n).count(producer.dispatch.READY_MESSAGE) > before[n] for n in others):
            assert time.monotonic() - killed_at < lease + 15, "no worker took the lock over"
            time.sleep(0.2)
        took_over = time.monotonic() - killed_at
        del group.procs[first]
        group.start(slot)  # its stage needs a worker again
        manifest = wait_all(client, "holder", timeout=600)
        assert "@" in holder(client.store)  # a worker's node name
    finally:
        group.stop()
    assert took_over <= lease + 15, took_over
    logs = "".join(group.log(name) for name in group.procs)
    assert "Loading weights" not in logs and "celery.redirected" not in logs  # no model-loading chatter
    assert "INFO workers.warmup: ground worker: models loaded and warmed" in logs  # an honest level
    assert f"exchange={WORK_STAGES[0]}(direct) key={WORK_STAGES[0]}" in logs  # the banner says the same
    assert_exactly_once(client, "holder", manifest, 8)
    print(f"lock taken over {took_over:.1f} s after its holder was killed (lease {lease} s)")


def test_progress_counts_jobs_per_stage_from_the_queues(tmp_path, broker, monkeypatch):
    """A job whose message waits in a stage's queue is queued there, one held by a worker is in work, and
    both count as done at every earlier stage; moving a message is movement."""
    from tasks.app import publisher, send_stage

    monkeypatch.setenv("AMODAL_STORAGE_URL", f"file://{tmp_path / 'store'}")
    images, annotations = dataset(tmp_path, 3)
    client = Client()
    client.submit_dataset(images, annotations, "p", progress=False)
    assert client.progress("p").waiting == 3 and client.progress("p").last_round is None
    dispatcher = Dispatcher(client.store, redis_client=broker, name="tester")
    dispatcher.round()  # three jobs sent to ground
    first = client.progress("p")
    assert first.waiting == 0 and first.dispatcher == "tester"
    assert (first.stages["ground"].queued, first.stages["segment"].done) == (3, 0)
    from kombu.transport.redis import Channel

    raw = broker.rpop("ground")  # one job's ground step is done: its message left the queue ...
    moved_job = producer.dispatch.message_job(raw)[0]
    with publisher() as sender:  # ... and its occlusion step was sent
        send_stage("occlusion", moved_job, 2, producer=sender)
    held = broker.rpop("ground")  # a ground worker holds another job's message, as kombu records it
    broker.hset(Channel.unacked_key, "tag1", json.dumps([json.loads(held), "ground", "ground"]))
    moved = client.progress("p")
    assert (moved.stages["ground"].queued, moved.stages["ground"].in_work, moved.stages["occlusion"].queued) == (1, 1, 1)
    assert moved.stages["ground"].done == 1 and moved.stages["segment"].done == 1 and moved.stages["occlusion"].done == 0
    assert moved.snapshot() != first.snapshot()
    assert moved.to_dict()["stages"]["occlusion"] == {"queued": 1, "in_work": 0, "done": 0}
