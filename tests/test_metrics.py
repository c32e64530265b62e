"""``amodal metrics``: the collector against messages sent through Celery and kombu's own Redis transport,
and the exporter as a process while real workers drain a dataset."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests
from kombu import Connection
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from amodal.jobstore import record_outcome, write_submission
from amodal.state import OUTCOMES, WORK_STAGES, JobState
from amodal.storage import open_storage
from amodal.keys import DISPATCH_STATE
from producer.dispatch import Flight, Progress
from producer.metrics import AmodalCollector
from tests import databases
from tests.cluster import cluster_env, outside_repository
from tests.flowerproc import AMODAL, free_port

ROOT = Path(__file__).resolve().parents[1]


def samples(text: str) -> dict[tuple, float]:
    """(sample name, label pairs...) -> value, from the exposition text."""
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def collect(collector: AmodalCollector) -> dict[tuple, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return samples(generate_latest(registry).decode())


def depth(found: dict, stage: str, name: str = "amodal_queue_depth") -> float:
    return found[(name, ("stage", stage))]


def per_dataset(found: dict, name: str) -> dict[str, float]:
    return {dict(key[1:])["dataset"]: v for key, v in found.items() if key[0] == name}


def outcomes(found: dict, dataset: str) -> dict[str, float]:
    return {dict(key[1:])["status"]: v for key, v in found.items()
            if key[0] == "amodal_dataset_outcomes_total" and dict(key[1:])["dataset"] == dataset and v}


@pytest.fixture
def own_redis_url():
    with databases.emptied(databases.METRICS) as url:
        yield url


def job(dataset: str, number: int) -> JobState:
    return JobState(job_id=f"{dataset}-{number:04d}", dataset=dataset, image_key="k", query="q", settings={})


def test_collector_counts_queued_held_and_finished_work(own_redis_url, tmp_path):
    from tasks.app import app, broker

    # 1. Messages as the producer sends them (one with a priority, so it lands in a suffixed list),
    #    and one taken by a consumer and not acknowledged.
    with broker(own_redis_url) as conn:
        for _ in range(3):
            app.send_task("amodal.inpaint", args=["j", 0], queue="inpaint", connection=conn)
        app.send_task("amodal.inpaint", args=["j", 0], queue="inpaint", connection=conn, priority=6)
        for _ in range(2):
            app.send_task("amodal.segment", args=["j", 0], queue="segment", connection=conn)
    client = redis.Redis.from_url(own_redis_url)
    assert {k.decode() for k in client.keys("inpaint*")} == {"inpaint", "inpaint\x06\x166"}
    consumer = Connection(own_redis_url)
    taken = consumer.default_channel.basic_get("segment", no_ack=False)
    assert taken is not None

    # 2. Two datasets: one finished; one with a row waiting and three jobs in flight, one stalled.
    store = open_storage(str(tmp_path / "store"))
    write_submission(store, "done", {"dataset": "done", "generation": 0, "sent": 2, "complete": True})
    write_submission(store, "busy", {"dataset": "busy", "generation": 0, "sent": 5, "complete": True})
    now = time.time()
    flights = {"busy-0001": Flight("busy", 2, "inpaint", now), "busy-0002": Flight("busy", 0, "ground", now),
               "busy-0003": Flight("busy", 1, "segment", now - 10_000)}
    store.put(DISPATCH_STATE, Progress({"done": [0, 2], "busy": [0, 4]}, flights, heartbeat=now,
                                  stall_after=600).to_json())
    for state, status in ((job("done", 0), "completed"), (job("done", 1), "no_target"), (job("busy", 0), "failed")):
        state.status = status
        record_outcome(store, state)

    collector = AmodalCollector(client, store)
    found = collect(collector)
    assert {stage: depth(found, stage) for stage in WORK_STAGES} == \
        {"ground": 0, "segment": 1, "occlusion": 0, "inpaint": 4, "finalize": 0}
    assert {stage: depth(found, stage, "amodal_queue_unacked") for stage in WORK_STAGES} == \
        {"ground": 0, "segment": 1, "occlusion": 0, "inpaint": 0, "finalize": 0}
    assert outcomes(found, "done") == {"completed": 1, "no_target": 1}
    assert outcomes(found, "busy") == {"failed": 1}
    assert per_dataset(found, "amodal_jobs_waiting") == {"busy": 1, "done": 0}
    assert per_dataset(found, "amodal_jobs_in_flight") == {"busy": 3, "done": 0}
    assert per_dataset(found, "amodal_jobs_stalled") == {"busy": 1, "done": 0}
    assert found[("amodal_dispatch_last_round_timestamp_seconds",)] == pytest.approx(now)
    assert found[("amodal_source_up", ("source", "broker"))] == found[("amodal_source_up", ("source", "storage"))] == 1

    # 3. The message acknowledged, another taken; more outcomes. A finished dataset is not listed
    #    again until its submission record changes.
    taken.ack()
    consumer.default_channel.basic_get("inpaint", no_ack=False)
    for state, status in ((job("busy", 1), "completed"), (job("done", 2), "completed")):
        state.status = status
        record_outcome(store, state)
    found = collect(collector)
    assert depth(found, "segment", "amodal_queue_unacked") == 0 and depth(found, "segment") == 1
    assert depth(found, "inpaint", "amodal_queue_unacked") == 1 and depth(found, "inpaint") == 3
    assert outcomes(found, "busy") == {"failed": 1, "completed": 1}
    assert outcomes(found, "done") == {"completed": 1, "no_target": 1}
    write_submission(store, "done", {"dataset": "done", "generation": 1, "sent": 3, "complete": True})
    assert outcomes(collect(collector), "done") == {"completed": 2, "no_target": 1}
    consumer.release()


def test_an_unreachable_broker_is_reported_not_raised(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = redis.Redis(port=port, socket_connect_timeout=1)
    found = collect(AmodalCollector(client, open_storage(str(tmp_path))))
    assert found[("amodal_source_up", ("source", "broker"))] == 0
    assert found[("amodal_source_up", ("source", "storage"))] == 1
    assert not any(key[0] == "amodal_queue_depth" for key in found)


def test_dashboard_shows_every_exported_metric_and_only_those(own_redis_url, tmp_path):
    """Each ``amodal_*`` family the exporter serves is on the dashboard, and the dashboard names no
    other; the Flower metrics it names are ones Flower serves."""
    from flower.events import get_prometheus_metrics

    store = open_storage(str(tmp_path))
    write_submission(store, "d", {"dataset": "d", "generation": 0, "sent": 0, "complete": True})
    store.put(DISPATCH_STATE, Progress({}, {}, heartbeat=time.time()).to_json())
    registry = CollectorRegistry()
    registry.register(AmodalCollector(redis.Redis.from_url(own_redis_url), store))
    exported = {s.name for family in text_string_to_metric_families(generate_latest(registry).decode())
                for s in family.samples}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    flower = {family.name + suffix for metric in vars(get_prometheus_metrics()).values()
              for family in metric.describe() for suffix in suffixes[family.type]}
    dashboard = json.loads((ROOT / "infra/grafana/dashboards/amodal.json").read_text())
    named = {name for panel in dashboard["panels"] for target in panel.get("targets", ())
             for name in re.findall(r"\b((?:amodal|flower)_\w+)", target["expr"])}
    assert {n for n in named if n.startswith("amodal_")} == exported
    assert {n for n in named if n.startswith("flower_")} <= flower
    assert {"flower_events_total", "flower_task_runtime_seconds_bucket", "flower_worker_online"} <= named


def start_metrics(env: dict, port: int) -> subprocess.Popen:
    """``amodal metrics`` as installed, from outside the repository, returned once it answers."""
    proc = subprocess.Popen([AMODAL, "metrics", "--port", str(port)], env=env, cwd=outside_repository(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            return proc
        except requests.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"amodal metrics did not start: {proc.communicate()[0]}") from None
            time.sleep(0.2)


def scrape_until(port: int, done, timeout: float, what: str) -> dict:
    """Scrape ``/metrics`` until ``done(samples)`` holds; the last samples."""
    deadline = time.monotonic() + timeout
    while True:
        found = samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"{what}: {found}"
        time.sleep(1)


def queued(found: dict) -> float:
    return sum(depth(found, stage) for stage in WORK_STAGES)


@pytest.mark.slow
def test_metrics_follow_a_dataset_through_the_workers(tmp_path, own_redis_url, s3_bucket, tiny_models):
    from tests.synthetic import synthetic_dataset
    from workers.launch import DISPATCH, WorkerGroup
    from tests.cluster import ONE_GPU, amodal

    settings = {"preset": "robust", "num_inference_steps": 2, "max_passes": 2}  # every job through every stage
    env = cluster_env(own_redis_url, f"s3://{s3_bucket}/data", tiny_models, settings)
    images, annotations = synthetic_dataset(tmp_path, 12)  # more rows than a segment or occlusion batch
    port = free_port()
    exporter = start_metrics(env, port)
    group = WorkerGroup(env, tmp_path / "logs", cwd=outside_repository())
    try:
        # 1. Recorded, nothing started: the rows wait, the queues are empty.
        res = amodal(env, "submit", "--images", str(images), "--annotations", str(annotations), "--dataset", "shapes",
                     "-q", *[f"--set={k}={v}" for k, v in settings.items()])
        assert res.returncode == 0, res.stderr
        found = scrape_until(port, lambda f: ("amodal_jobs_waiting", ("dataset", "shapes")) in f, 30, "no dataset")
        assert found[("amodal_jobs_waiting", ("dataset", "shapes"))] == 12 and queued(found) == 0
        assert outcomes(found, "shapes") == {}

        # 2. The dispatcher starts the jobs; no worker takes them: twelve messages wait in ground's queue.
        group.start_dispatcher()
        group.wait_ready([DISPATCH])
        found = scrape_until(port, lambda f: depth(f, "ground") == 12, 60, "jobs not queued")
        assert found[("amodal_jobs_in_flight", ("dataset", "shapes"))] == 12
        assert found[("amodal_jobs_waiting", ("dataset", "shapes"))] == 0

        # 3. The workers drain the queues; every job reaches an outcome.
        for slot in ONE_GPU:
            group.start(slot)
        group.wait_ready()
        seen_held = 0.0
        deadline = time.monotonic() + 900
        while True:
            found = samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
            seen_held = max(seen_held, sum(depth(found, s, "amodal_queue_unacked") for s in WORK_STAGES))
            if sum(outcomes(found, "shapes").values()) == 12:
                break
            assert time.monotonic() < deadline, (found, *(group.log(n)[-2000:] for n in group.procs))
            time.sleep(1)
        found = scrape_until(port, lambda f: f[("amodal_jobs_in_flight", ("dataset", "shapes"))] == 0, 60,
                             "jobs left in flight")
        assert queued(found) == 0 and found[("amodal_jobs_stalled", ("dataset", "shapes"))] == 0
        assert seen_held > 0  # workers were seen holding messages
        status = json.loads(amodal(env, "status", "--dataset", "shapes").stdout.strip().splitlines()[-1])
        assert outcomes(found, "shapes") == {k: v for k, v in status.items() if k in OUTCOMES and v}
    finally:
        group.stop()
        exporter.terminate()
        exporter.communicate(timeout=30)


def test_metrics_on_a_port_in_use_says_so_in_one_line(tmp_path, own_redis_url):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(AMODAL_BROKER_URL=own_redis_url, AMODAL_STORAGE_URL=f"file://{tmp_path}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([AMODAL, "metrics", "--port", str(port)], env=env, cwd=outside_repository(),
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr == f"amodal: port {port} is in use; pick another with --port\n"
