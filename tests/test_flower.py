"""Flower for real: basic auth on every page and API call, Prometheus metrics open to scrapers, and
every step of every job (batched stages included) shown with its state, worker and runtime."""
from __future__ import annotations

import ast
import json
import socket
import subprocess
import time
from collections import Counter

import json5
import pytest

from amodal.errors import UsageError
import requests

from amodal.jobstore import load_state
from amodal.state import WORK_STAGES
from amodal.storage import open_storage
from tests import databases, flowerproc
from tests.cluster import amodal, cluster_env, start_workers
from tasks.nodes import node_name
from workers.main import GPU_STAGES

AUTH = ("watcher", "s3cret-pw")

# tests/test_distributed.py takes these from here; they are tests/flowerproc.py's.
free_port = flowerproc.free_port
start_flower = flowerproc.launch_flower


def flower_env(redis_url: str) -> dict[str, str]:
    return flowerproc.flower_env(redis_url, AUTH)


@pytest.fixture
def own_redis_url():
    """A Redis database of this module's own (workers of other tests run on the shared one), emptied."""
    with databases.emptied(databases.FLOWER) as url:
        yield url


def test_flower_asks_for_credentials_and_serves_metrics(own_redis_url):
    base, stop = flowerproc.start_flower(own_redis_url, free_port(), AUTH)
    try:
        for path in ("/", "/workers", "/tasks"):  # pages: the browser is asked for credentials
            denied = requests.get(base + path, timeout=10)
            assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic"), path
        for path in ("/api/workers", "/api/tasks", "/api/queues/length"):
            assert requests.get(base + path, timeout=10).status_code == 401, path
        assert requests.get(f"{base}/api/workers", auth=("watcher", "wrong"), timeout=10).status_code == 401
        assert requests.get(f"{base}/api/workers", auth=("other", AUTH[1]), timeout=10).status_code == 401
        ok = requests.get(f"{base}/api/workers", auth=AUTH, timeout=10)
        assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("application/json")
        assert flowerproc.flower_workers(base, AUTH) == {}  # no worker runs on this database
        metrics = requests.get(f"{base}/metrics", timeout=10)  # no credentials: what a scraper sends
        assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
        assert "# TYPE flower_events_total counter" in metrics.text
        assert "# TYPE flower_worker_online gauge" in metrics.text
        assert requests.get(f"{base}/healthcheck", timeout=10).text == "OK"
    finally:
        output = stop()
    assert AUTH[1] not in output  # the password is never printed


def test_flower_refuses_to_start_without_basic_auth(own_redis_url):
    proc = flowerproc.run_amodal_flower(flowerproc.flower_env(own_redis_url, None), free_port(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 2
    assert "set FLOWER_BASIC_AUTH to user:password" in stderr and "Traceback" not in stderr


def test_flower_on_a_port_in_use_says_so_in_one_line(own_redis_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = flowerproc.run_amodal_flower(flowerproc.flower_env(own_redis_url, AUTH), port,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stderr.strip() == f"amodal: port {port} is in use; pick another with --port", stderr
    assert stdout == ""


@pytest.mark.parametrize("value", ["", "nopassword", "user:", ":pw", "a b:c", "admin:pa,ss", "a:b,", "a:b c"])
def test_malformed_auth_is_refused(monkeypatch, value):
    from producer.flower import basic_auth_from_env

    monkeypatch.setenv("FLOWER_BASIC_AUTH", value)
    with pytest.raises(UsageError, match="FLOWER_BASIC_AUTH"):
        basic_auth_from_env()


@pytest.mark.parametrize("value", ["admin:pw", "admin:p:w", "ops:x1,viewer:y2"])
def test_wellformed_auth_is_passed_on(monkeypatch, value):
    from producer.flower import basic_auth_from_env

    monkeypatch.setenv("FLOWER_BASIC_AUTH", value)
    assert basic_auth_from_env() == value


LIGHT = {"preset": "robust", "grounder": "gdino_sam", "tagger": "clip", "num_inference_steps": 2, "max_passes": 1}  # every stage


def steps_done(store, job_ids: list[str]) -> set[tuple[str, str, int]]:
    """(stage, job, version) of every step the jobs took: each state version waiting on a stage is one step."""
    steps = set()
    for job in job_ids:
        versions = sorted(int(key.rsplit("/", 1)[1].split(".")[0]) for key in store.list(f"jobs/{job}/state/"))
        for version in versions:
            stage = load_state(store, job, version).stage
            if stage in WORK_STAGES:
                steps.add((stage, job, version))
    return steps


def flower_steps(base: str) -> dict[tuple[str, str, int], dict]:
    """Flower's tasks by (stage, job, version), from ``/api/tasks``."""
    tasks = requests.get(f"{base}/api/tasks", auth=AUTH, timeout=30).json()
    steps = {}
    for task_id, task in tasks.items():
        job, version = ast.literal_eval(task["args"])
        steps[(task["name"].removeprefix("amodal."), job, version)] = {**task, "id": task_id}
    return steps


def flower_worker_counts(base: str) -> dict[str, Counter]:
    """Flower's event counts of each worker (the Workers page: processed is ``task-received``)."""
    rows = requests.get(f"{base}/workers", params={"json": 1}, auth=AUTH, timeout=30).json()["data"]
    return {row["hostname"]: Counter({k: v for k, v in row.items() if k.startswith("task-")}) for row in rows}


@pytest.mark.slow
def test_flower_shows_every_step_with_its_worker_state_and_runtime(tmp_path, own_redis_url, s3_bucket, tiny_models,
                                                                   paper_examples):
    """Two of the paper's examples through the five stage workers: each step of each job, batched
    stages (segment, occlusion, inpaint) included, is a task in Flower with state SUCCESS, the worker
    of its stage and a runtime; each worker's processed and succeeded counts are the steps it did."""
    env = cluster_env(own_redis_url, f"s3://{s3_bucket}/data", tiny_models, LIGHT)
    nodes = {stage: node_name(stage, 0 if stage in GPU_STAGES else None) for stage in WORK_STAGES}
    rows = json5.loads((paper_examples / "example_annotation.json").read_text())["annotations"][:2]  # a trailing comma
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps({"annotations": rows}))
    group = start_workers(env, tmp_path / "logs")
    base, stop = flowerproc.start_flower(own_redis_url, free_port(), AUTH)
    try:
        deadline = time.monotonic() + 60  # Flower hears every worker before the first job is sent
        while set(flower_worker_counts(base)) < set(nodes.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        res = amodal(env, "submit", "--images", str(paper_examples / "images"), "--annotations", str(annotations),
                     "--dataset", "flower", "-q", *[f"--set={k}={v}" for k, v in LIGHT.items()])
        assert res.returncode == 0, res.stderr
        res = amodal(env, "status", "--dataset", "flower", "--wait", "--interval", "1", timeout=900)
        assert res.returncode == 0, res.stderr
        res = amodal(env, "status", "--dataset", "flower", "--manifest")
        manifest = [json.loads(line) for line in res.stdout.splitlines()]
        expected = steps_done(open_storage(env["AMODAL_STORAGE_URL"]), [line["job_id"] for line in manifest])
        deadline = time.monotonic() + 60  # the last events are on their way
        while (steps := flower_steps(base)).keys() != expected or any(t["state"] != "SUCCESS" for t in steps.values()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        counts = flower_worker_counts(base)
        stats = {node: flowerproc.flower_workers(base, AUTH, node)[node] for node in nodes.values()}
    finally:
        output = stop()
        group.stop()
    assert len(manifest) == 2 and all(line["status"] in ("completed", "unoccluded") for line in manifest), manifest
    assert {stage for stage, _, _ in expected} == set(WORK_STAGES)  # every stage, batched ones included
    assert steps.keys() == expected, (sorted(steps), sorted(expected))
    for (stage, job, version), task in steps.items():
        assert task["state"] == "SUCCESS", task
        assert task["worker"] == nodes[stage], task
        assert task["runtime"] is not None and task["runtime"] > 0, task
        assert task["received"] and task["started"] and task["succeeded"], task
    per_stage = Counter(stage for stage, _, _ in expected)
    for stage, node in nodes.items():
        assert counts[node]["task-received"] == counts[node]["task-succeeded"] == per_stage[stage], (node, counts[node])
        assert counts[node]["task-failed"] == counts[node]["task-retried"] == 0, (node, counts[node])
        assert stats[node]["stats"]["total"] == {f"amodal.{stage}": per_stage[stage]}, stats[node]["stats"]
        assert stats[node]["active"] == [], stats[node]["active"]
    assert AUTH[1] not in output
