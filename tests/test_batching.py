"""Batched stages: while every pool process runs a batch, the next one fills up."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tasks.stages import TASKS

inpaint = TASKS["inpaint"]


class PoolJob:
    def __init__(self) -> None:
        self.done = False

    def ready(self) -> bool:
        return self.done


class Pool:
    """Records each batch handed to it; its jobs finish when the test says so."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.jobs: list[PoolJob] = []

    def apply_async(self, target, args, accept_callback=None, callback=None, error_callback=None):
        _, (requests,), *_ = args
        self.batches.append([r.args[0] for r in requests])
        self.jobs.append(PoolJob())
        return self.jobs[-1]


def request(job_id: str) -> SimpleNamespace:
    return SimpleNamespace(
        id=job_id, name="amodal.inpaint", _payload=((job_id, 0), {}, {}), delivery_info={}, hostname="h",
        reply_to=None, correlation_id=None, request_dict={}, eta=None, task=inpaint,
    )


@pytest.fixture
def task(monkeypatch):
    pool = Pool()
    monkeypatch.setattr(inpaint, "_pool", pool, raising=False)
    monkeypatch.setattr(inpaint, "_running", ())
    monkeypatch.setitem(inpaint.app.conf, "worker_concurrency", 1)
    monkeypatch.setattr(inpaint, "_tref", None)
    yield inpaint, pool
    while not inpaint._buffer.empty():
        inpaint._buffer.get()


def test_the_buffer_is_held_while_a_batch_runs(task):
    task, pool = task
    task._buffer.put(request("a"))
    task._do_flush()
    assert pool.batches == [["a"]]
    for job in "bcd":  # they arrive one by one while "a" runs; timer ticks would flush each alone
        task._buffer.put(request(job))
        task._do_flush()
    assert pool.batches == [["a"]]
    pool.jobs[0].done = True
    task._do_flush()
    assert pool.batches == [["a"], ["b", "c", "d"]]


def test_a_batch_that_never_reports_stops_holding_after_the_time_limit(task, monkeypatch):
    task, pool = task
    task._buffer.put(request("a"))
    task._do_flush()
    task._buffer.put(request("b"))
    ((job, since),) = task._running
    monkeypatch.setattr(task, "_running", ((job, since - task.app.conf.task_time_limit - 1),))
    task._do_flush()
    assert pool.batches == [["a"], ["b"]]


def test_each_pool_process_runs_a_batch(task, monkeypatch):
    task, pool = task
    monkeypatch.setitem(task.app.conf, "worker_concurrency", 2)
    for job in "ab":
        task._buffer.put(request(job))
        task._do_flush()
    assert pool.batches == [["a"], ["b"]]  # two processes: two batches in flight
    for job in "cd":
        task._buffer.put(request(job))
        task._do_flush()
    assert pool.batches == [["a"], ["b"]]
    pool.jobs[1].done = True
    task._do_flush()
    assert pool.batches == [["a"], ["b"], ["c", "d"]]
    task._buffer.put(request("e"))
    task._do_flush()
    assert pool.batches == [["a"], ["b"], ["c", "d"]]  # "a" and "c, d" still run


def test_a_consumer_restart_arms_a_new_flush_timer(task):
    """Celery clears the event loop's timers when it reconnects to the broker; the old flush timer is gone."""
    task, pool = task

    consumer = SimpleNamespace(pool=pool, hostname="h", connection_errors=(), event_dispatcher=None, timer=None)
    task._buffer.put(request("a"))
    task._do_flush()  # a batch in flight
    task._tref = object()  # the timer armed before the connection dropped
    task.Strategy(task, task.app, consumer)  # the consumer restarts after reconnecting
    assert task._tref is None and task._running == ()
    task._buffer.put(request("b"))
    task._do_flush()
    assert pool.batches == [["a"], ["b"]]  # the dropped batch does not hold the next one


def test_a_job_that_cannot_be_routed_on_is_retried_not_dropped(monkeypatch):
    from tasks import batching

    settings = SimpleNamespace(result_fingerprint=lambda: "same")
    states = {j: SimpleNamespace(job_id=j, version=0, stage="finalize", attempts={"inpaint": 1},
                                 job_settings=lambda: settings) for j in "ab"}
    advanced, sent = [], []

    def advance(state):
        if state.job_id == "a":
            raise ConnectionError("storage unreachable")
        advanced.append(state.job_id)

    monkeypatch.setattr(batching, "claim", lambda job_id, version, stage: states[job_id])
    monkeypatch.setattr(batching, "context", lambda state: None)
    monkeypatch.setattr(batching, "run_batch", lambda stage, batch, ctx: None)
    monkeypatch.setattr(batching, "advance", advance)
    monkeypatch.setattr(batching, "send_stage", lambda stage, job_id, version, countdown=None: sent.append((stage, job_id)))
    outcomes = batching.run_requests("inpaint", [SimpleNamespace(id=f"m{j}", args=(j, 0)) for j in "ab"])
    assert {k: (v.event, v.fields.get("result")) for k, v in outcomes.items()} == {
        "ma": ("retried", None), "mb": ("succeeded", "finalize")}
    assert advanced == ["b"] and sent == [("inpaint", "a")]  # "a" comes back to its step; "b" moved on


def test_a_message_that_cannot_be_claimed_fails_alone(monkeypatch):
    from tasks import batching

    settings = SimpleNamespace(result_fingerprint=lambda: "same")
    ran: list[list[str]] = []

    def claim(job_id, version, stage):
        if job_id == "a":
            raise ConnectionError("storage unreachable")
        return SimpleNamespace(job_id=job_id, version=0, stage="finalize", attempts={"inpaint": 1},
                               job_settings=lambda: settings)

    monkeypatch.setattr(batching, "claim", claim)
    monkeypatch.setattr(batching, "context", lambda state: None)
    monkeypatch.setattr(batching, "run_batch", lambda stage, batch, ctx: ran.append([s.job_id for s in batch]))
    monkeypatch.setattr(batching, "advance", lambda state: None)
    outcomes = batching.run_requests("inpaint", [SimpleNamespace(id=f"m{j}", args=(j, 0)) for j in "abc"])
    assert {k: v.event for k, v in outcomes.items()} == {"ma": "failed", "mb": "succeeded", "mc": "succeeded"}
    assert "storage unreachable" in outcomes["ma"].fields["exception"]
    assert ran == [["b", "c"]]  # the jobs batched with it ran, together


def test_a_pool_process_never_takes_more_than_the_batch_size(task, monkeypatch):
    """Jobs buffered while every process ran are handed out a batch size at a time, one batch per free
    process; the rest wait in the buffer."""
    task, pool = task
    monkeypatch.setattr(task, "flush_every", 2)
    monkeypatch.setitem(task.app.conf, "worker_concurrency", 2)
    for job in "ab":
        task._buffer.put(request(job))
        task._do_flush()
    for job in "cdefg":
        task._buffer.put(request(job))
        task._do_flush()
    assert pool.batches == [["a"], ["b"]]
    pool.jobs[0].done = pool.jobs[1].done = True
    task._do_flush()
    assert pool.batches == [["a"], ["b"], ["c", "d"], ["e", "f"]]
    pool.jobs[2].done = True
    task._do_flush()
    assert pool.batches[-1] == ["g"] and task._buffer.empty()
