"""Where a dataset's jobs are: per stage, queued, in work and done (``amodal status``, ``Client.progress``).

For each stage of the pipeline:

- ``queued``: the dataset's messages waiting in the stage's queue (Redis, now);
- ``in_work``: the dataset's messages a worker of the stage holds (running or prefetched; Redis, now);
- ``done``: the dataset's rows past the stage: those with an outcome, and the jobs in flight that
  were last seen at a later stage (the dispatcher's record, refreshed every scan; a job that ended
  since the last scan may be counted twice until the next).

A job belongs to the dataset by the dispatcher's record of the jobs in flight, so the Redis reads are
bounded by the high-water mark whatever the dataset's size. Any change of these numbers is progress,
so a pipeline busy on long steps is not taken for a stuck one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from amodal.state import WORK_STAGES
from amodal.storage import Storage
from producer.dispatch import heartbeat, holder, message_job, queue_keys, read_progress, waiting

WAITING = "waiting"  # rows recorded that the dispatcher has not started yet
REDIS_TIMEOUT = 5.0


@dataclass
class StageCounts:
    queued: int = 0
    in_work: int = 0
    done: int = 0


@dataclass
class Progress:
    """A dataset's rows per outcome (``Client.status``), the rows not started, where the rest are, and
    the dispatcher's last round."""

    counts: dict[str, int]
    waiting: int
    stages: dict[str, StageCounts]
    dispatcher: str | None  # the lock holder's name
    last_round: float | None  # time.time() of the dispatcher's last round
    broker_read: bool  # False: the queues could not be read (no Redis broker, or it did not answer)

    def to_dict(self) -> dict:
        return {**self.counts, WAITING: self.waiting, "stages": {s: asdict(c) for s, c in self.stages.items()},
                "dispatcher": self.dispatcher, "last_round": self.last_round}

    def snapshot(self) -> tuple:
        """What changes when anything moves: outcomes, rows started, and each stage's numbers."""
        return (tuple(sorted(self.counts.items())), self.waiting,
                tuple((s, c.queued, c.in_work, c.done) for s, c in self.stages.items()))


def broker_messages(broker_url: str) -> tuple[dict[str, str], dict[str, str]] | None:
    """({job: stage of the queue holding its message}, {job: stage of the worker holding it}), or None
    where the broker is not Redis or does not answer."""
    import redis
    from kombu.transport.redis import Channel

    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = redis.Redis.from_url(broker_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
    try:
        with client.pipeline(transaction=False) as pipe:
            for stage in WORK_STAGES:
                for key in queue_keys(stage):
                    pipe.lrange(key, 0, -1)
            pipe.hvals(Channel.unacked_key)
            replies = pipe.execute()
    except redis.RedisError:
        return None
    finally:
        client.close()
    steps = len(queue_keys(WORK_STAGES[0]))
    queued: dict[str, str] = {}
    for i, stage in enumerate(WORK_STAGES):
        for batch in replies[i * steps:(i + 1) * steps]:
            queued.update((job[0], stage) for raw in batch if (job := message_job(raw)) is not None)
    held: dict[str, str] = {}
    for raw in replies[-1]:
        job = message_job(raw)
        if job is not None:
            held[job[0]] = json.loads(raw)[2]  # [message, exchange, routing key]: the key is the stage
    return queued, held


def dataset_progress(store: Storage, broker_url: str, dataset: str, counts: dict[str, int]) -> Progress:
    """The dataset's :class:`Progress`, given its ``counts`` (``Client.status``)."""
    record = read_progress(store)
    flights = {job: f for job, f in record.flights.items() if f.dataset == dataset}
    messages = broker_messages(broker_url)
    queued, held = messages if messages is not None else ({}, {})
    stages = {stage: StageCounts() for stage in WORK_STAGES}
    order = {stage: i for i, stage in enumerate((*WORK_STAGES, "done"))}
    for job, flight in flights.items():
        if job in queued:
            stage = queued[job]
            stages[stage].queued += 1
        elif job in held and held[job] in stages:
            stage = held[job]
            stages[stage].in_work += 1
        else:
            stage = flight.stage
        for earlier in WORK_STAGES[:order.get(stage, 0)]:
            stages[earlier].done += 1
    ended = counts["total"] - counts["pending"] - counts["not_sent"]
    for counts_of in stages.values():
        counts_of.done += ended
    return Progress(counts, waiting(store, dataset), stages, holder(store), heartbeat(store), messages is not None)


def stages_line(progress: Progress) -> str:
    """``waiting 3 | ground 1 queued, 2 in work, 4 done | segment ...``"""
    parts = [f"{WAITING} {progress.waiting}"]
    for stage, c in progress.stages.items():
        parts.append(f"{stage} {c.queued} queued, {c.in_work} in work, {c.done} done")
    return " | ".join(parts)
