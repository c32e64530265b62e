"""``amodal metrics``: a Prometheus exporter of what Flower does not show, computed at each scrape.

Flower's metrics cover tasks and workers; these cover the backlog and the datasets:

- ``amodal_queue_depth{stage}``: messages waiting in the stage's queue. kombu's Redis transport keeps
  a queue as a Redis list named after it plus one list per priority step (``<queue>\\x06\\x16<step>``).
- ``amodal_queue_unacked{stage}``: messages a worker of the stage holds and has not acknowledged yet
  (running or prefetched), from the transport's ``unacked`` hash.
- ``amodal_jobs_waiting{dataset}``, ``amodal_jobs_in_flight{dataset}``, ``amodal_jobs_stalled{dataset}``:
  rows recorded and not started, jobs started without an outcome, and those of them that have not
  advanced for the stall limit, as the dispatcher (``producer.dispatch``) records them.
- ``amodal_dataset_outcomes_total{dataset,status}``: jobs with each outcome, from the outcome markers
  (a counter: outcomes only accrue, so ``rate()`` gives throughput per dataset).
- ``amodal_dispatch_last_round_timestamp_seconds``: when the dispatcher last finished a round.
- ``amodal_source_up{source}``: 1 if the broker (``broker``) or the storage (``storage``) answered this scrape.

Redis reads are a few ``LLEN`` and one ``HVALS`` of the unacknowledged messages (at most the workers'
prefetch). Storage reads are the dispatcher's progress record, one listing of ``datasets/``, each
submission record and a listing of each unfinished dataset's outcome markers; a finished dataset's
counts are kept until its submission record changes (a resubmission).
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
from amodal.keys import DATASETS, dataset_of_submission
from amodal.state import OUTCOMES, WORK_STAGES
from amodal.storage import S3Storage, Storage
from producer.dispatch import heartbeat, in_flight, queue_keys, stalled, waiting

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808
REDIS_TIMEOUT = 5.0  # seconds a Redis call may take before the scrape reports the broker down
STORAGE_RETRY_SECONDS = 5.0  # a scrape reports the storage down instead of retrying for minutes


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
    """Datasets with a submission record (``amodal.keys.submission_key``)."""
    return sorted(name for name in map(dataset_of_submission, store.list(DATASETS)) if name)


class OutcomeCounts:
    """Jobs per outcome of each dataset, from its markers. A finished dataset (nothing waiting or in
    flight) keeps its counts until its submission record changes, so it is not listed at every scrape."""

    def __init__(self, store: Storage) -> None:
        self.store = store
        self._finished: dict[str, tuple[dict | None, dict[str, int]]] = {}

    def __call__(self, datasets: Iterable[str], finished: set[str]) -> dict[str, dict[str, int]]:
        found = {}
        for name in datasets:
            submission = read_submission(self.store, name)
            kept = self._finished.pop(name, None)
            if kept is not None and kept[0] == submission and name in finished:
                counts = kept[1]
            else:
                counts = {status: len(jobs) for status, jobs in outcome_counts(self.store, name).items()}
            if name in finished:
                self._finished[name] = (submission, counts)
            found[name] = counts
        return found


class AmodalCollector(Collector):
    """The metrics above, read from Redis and the storage at each ``collect()``."""

    def __init__(self, client: redis.Redis, store: Storage) -> None:
        self.client, self.store = client, store
        self.outcomes = OutcomeCounts(store)

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
        # 1. What the dispatcher recorded, then the outcome markers (after it: a job leaves the jobs in
        #    flight only once its marker is written).
        try:
            flying, stuck, last_round = in_flight(self.store), stalled(self.store), heartbeat(self.store)
            names = sorted(set(dataset_names(self.store)) | set(flying))
            queued = {name: waiting(self.store, name) for name in names}
            counts = self.outcomes(names, {n for n in names if not flying.get(n) and not queued[n]})
        except Exception as exc:  # noqa: BLE001 - boto3, the filesystem and JSON each raise their own
            log.warning("storage unreadable: %s", exc)
            up.add_metric(["storage"], 0)
            return
        up.add_metric(["storage"], 1)
        # 2. The families.
        families = {
            "waiting": GaugeMetricFamily("amodal_jobs_waiting", "Rows recorded that the dispatcher has not "
                                         "started yet", labels=["dataset"]),
            "in_flight": GaugeMetricFamily("amodal_jobs_in_flight", "Jobs started without an outcome yet",
                                           labels=["dataset"]),
            "stalled": GaugeMetricFamily("amodal_jobs_stalled", "Jobs in flight whose state has not advanced "
                                         "for the dispatcher's stall limit", labels=["dataset"]),
        }
        outcomes = CounterMetricFamily("amodal_dataset_outcomes", "Jobs with each outcome",
                                       labels=["dataset", "status"])
        for name in names:
            families["waiting"].add_metric([name], queued[name])
            families["in_flight"].add_metric([name], flying.get(name, 0))
            families["stalled"].add_metric([name], stuck.get(name, 0))
            for status in OUTCOMES:
                outcomes.add_metric([name, status], counts[name][status])
        yield from families.values()
        yield outcomes
        if last_round is not None:
            yield GaugeMetricFamily("amodal_dispatch_last_round_timestamp_seconds",
                                    "When the dispatcher last finished a round (Unix time)", value=last_round)


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
        "metrics", help="serve Prometheus metrics: queue depth per stage, jobs waiting, in flight and stalled, "
                        "outcomes per dataset",
        description="serve Prometheus metrics at /metrics: queue depth and unacknowledged messages per stage; jobs "
                    "waiting, in flight and stalled and outcomes per dataset (AMODAL_BROKER_URL, AMODAL_STORAGE_URL)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port to serve on")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.set_defaults(func=cmd_metrics)
    return parser


def cmd_metrics(args: argparse.Namespace) -> int:
    from amodal.config import environment
    from amodal.storage import check_storage, open_storage
    from producer.checks import check_broker

    broker = environment().broker_url
    if not broker.startswith(("redis://", "rediss://", "unix://")):
        raise UsageError(f"amodal metrics reads queues from Redis; AMODAL_BROKER_URL is {broker.split(':')[0]}://")
    store = open_storage(environment().require_storage_url())
    if isinstance(store, S3Storage):
        store.retry_seconds = STORAGE_RETRY_SECONDS
    check_storage(store, probe_writes=False)
    check_broker()
    client = redis.Redis.from_url(broker, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
    serve(AmodalCollector(client, store), args.port, args.address)
    return 0
