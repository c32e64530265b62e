"""``amodal metrics``: a Prometheus exporter of what Flower does not show, computed at each scrape.

Flower's metrics cover tasks and workers; these cover the backlog and the datasets:

- ``amodal_queue_depth{stage}``: messages waiting in the stage's queue. kombu's Redis transport keeps
  a queue as a Redis list named after it plus one list per priority step (``<queue>\\x06\\x16<step>``).
- ``amodal_queue_unacked{stage}``: messages a worker of the stage holds and has not acknowledged yet
  (running or prefetched), from the transport's ``unacked`` hash.
- ``amodal_jobs_in_flight{dataset}``: jobs sent and without an outcome yet.
- ``amodal_dataset_jobs{dataset}``: jobs a dataset's submission has to run (rows refused at submission
  are not jobs).
- ``amodal_dataset_outcomes_total{dataset,status}``: jobs with each outcome, from the outcome markers
  (a counter: outcomes only accrue, so ``rate()`` gives throughput per dataset).
- ``amodal_source_up{source}``: 1 if the broker (``broker``) or the storage (``storage``) answered this scrape.

Redis reads are a few ``LLEN`` and one ``HVALS`` of the unacknowledged messages (at most the workers'
prefetch). Storage reads are one listing of ``datasets/``, one read of each submission record and a
listing of each unfinished dataset's outcome markers; a finished dataset's counts are kept until its
submission record changes (a resubmission).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
from typing import Iterable, Iterator

import redis
from kombu.transport.redis import Channel
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from amodal.errors import ServiceError, UsageError
from amodal.jobstore import outcome_counts, read_submission
from amodal.state import OUTCOMES, WORK_STAGES
from amodal.storage import S3Storage, Storage

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808
REDIS_TIMEOUT = 5.0  # seconds a Redis call may take before the scrape reports the broker down
STORAGE_RETRY_SECONDS = 5.0  # a scrape reports the storage down instead of retrying for minutes


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu's transport keeps ``queue`` in: the queue's name for the default priority,
    then one suffixed list per further priority step."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in Channel.priority_steps]


def queue_depths(client: redis.Redis, queues: Iterable[str] = WORK_STAGES) -> dict[str, int]:
    """Messages waiting per queue, every priority list counted."""
    queues = list(queues)
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in queue_keys(queue):
                pipe.llen(key)
        lengths = pipe.execute()
    steps = len(Channel.priority_steps)
    return {queue: sum(lengths[i * steps:(i + 1) * steps]) for i, queue in enumerate(queues)}


def unacked_per_queue(client: redis.Redis, queues: Iterable[str] = WORK_STAGES) -> dict[str, int]:
    """Messages delivered and not acknowledged, per queue. Each entry of the transport's ``unacked``
    hash is ``[message, exchange, routing_key]``; the stage queues are routed by their own name."""
    counts = dict.fromkeys(queues, 0)
    for value in client.hvals(Channel.unacked_key):
        routing_key = json.loads(value)[2]
        if routing_key in counts:
            counts[routing_key] += 1
    return counts


def dataset_names(store: Storage) -> list[str]:
    """Datasets with a submission record (``datasets/<name>/submission.json``)."""
    suffix = "/submission.json"
    return sorted(key[len("datasets/"):-len(suffix)] for key in store.list("datasets/") if key.endswith(suffix))


class DatasetCounts:
    """Per dataset: its submission record and jobs per outcome; finished datasets are not listed again."""

    def __init__(self, store: Storage) -> None:
        self.store = store
        self._finished: dict[str, tuple[dict, dict[str, int]]] = {}

    def __call__(self) -> dict[str, tuple[dict, dict[str, int]]]:
        found = {}
        for name in dataset_names(self.store):
            submission = read_submission(self.store, name)
            if submission is None:
                continue
            kept = self._finished.get(name)
            if kept is not None and kept[0] == submission:
                found[name] = kept
                continue
            counts = {status: len(jobs) for status, jobs in outcome_counts(self.store, name).items()}
            found[name] = (submission, counts)
            if submission["sent"] >= submission["jobs"] and sum(counts.values()) >= submission["jobs"]:
                self._finished[name] = found[name]
        return found


class AmodalCollector(Collector):
    """The metrics above, read from Redis and the storage at each ``collect()``."""

    def __init__(self, client: redis.Redis, store: Storage) -> None:
        self.client = client
        self.datasets = DatasetCounts(store)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("amodal_source_up", "1 if the source answered this scrape", labels=["source"])
        yield from self._broker_metrics(up)
        yield from self._dataset_metrics(up)
        yield up

    def _broker_metrics(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        try:
            depths, unacked = queue_depths(self.client), unacked_per_queue(self.client)
        except redis.RedisError as exc:
            log.warning("broker unreadable: %s", exc)
            up.add_metric(["broker"], 0)
            return
        up.add_metric(["broker"], 1)
        depth = GaugeMetricFamily("amodal_queue_depth", "Messages waiting in the stage's queue", labels=["stage"])
        held = GaugeMetricFamily("amodal_queue_unacked",
                                 "Messages a worker of the stage holds unacknowledged (running or prefetched)",
                                 labels=["stage"])
        for stage in WORK_STAGES:
            depth.add_metric([stage], depths[stage])
            held.add_metric([stage], unacked[stage])
        yield depth
        yield held

    def _dataset_metrics(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        try:
            datasets = self.datasets()
        except Exception as exc:  # noqa: BLE001 - boto3, the filesystem and JSON each raise their own
            log.warning("storage unreadable: %s", exc)
            up.add_metric(["storage"], 0)
            return
        up.add_metric(["storage"], 1)
        jobs = GaugeMetricFamily("amodal_dataset_jobs", "Jobs the dataset's submission has to run",
                                 labels=["dataset"])
        in_flight = GaugeMetricFamily("amodal_jobs_in_flight", "Jobs sent without an outcome yet", labels=["dataset"])
        outcomes = CounterMetricFamily("amodal_dataset_outcomes", "Jobs with each outcome",
                                       labels=["dataset", "status"])
        for name, (submission, counts) in datasets.items():
            jobs.add_metric([name], submission["jobs"])
            in_flight.add_metric([name], max(submission["sent"] - sum(counts.values()), 0))
            for status in OUTCOMES:
                outcomes.add_metric([name, status], counts[status])
        yield jobs
        yield in_flight
        yield outcomes


def serve(collector: Collector, port: int, address: str) -> None:
    """Serve ``/metrics`` of ``collector`` on ``address:port`` until stopped."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(collector)
    try:
        _, thread = start_http_server(port, address, registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ServiceError(f"port {port} is in use; pick another with --port") from None
    thread.join()


def add_metrics_command(subparsers) -> argparse.ArgumentParser:
    """Add ``metrics`` to the ``amodal`` command's subparsers."""
    parser = subparsers.add_parser(
        "metrics", help="serve Prometheus metrics: queue depth per stage, jobs in flight, outcomes per dataset",
        description="serve Prometheus metrics at /metrics: queue depth and unacknowledged messages per stage, "
                    "jobs in flight, outcomes per dataset (AMODAL_BROKER_URL, AMODAL_STORAGE_URL)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port to serve on")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.set_defaults(func=cmd_metrics)
    return parser


def cmd_metrics(args: argparse.Namespace) -> int:
    from amodal.cli import _storage_url
    from amodal.config import environment
    from amodal.storage import check_storage, open_storage
    from producer.checks import check_broker

    broker = environment().broker_url
    if not broker.startswith(("redis://", "rediss://", "unix://")):
        raise UsageError(f"amodal metrics reads queues from Redis; AMODAL_BROKER_URL is {broker.split(':')[0]}://")
    store = open_storage(_storage_url())
    if isinstance(store, S3Storage):
        store.retry_seconds = STORAGE_RETRY_SECONDS
    check_storage(store, probe_writes=False)
    check_broker()
    client = redis.Redis.from_url(broker, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
    serve(AmodalCollector(client, store), args.port, args.address)
    return 0
