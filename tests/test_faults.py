"""Faults with real processes: every submitted row still reaches exactly one outcome.

Workers are killed with SIGKILL mid-task, a job kills its worker every time, task messages are
duplicated, the S3 endpoint refuses connections for 30 seconds, and Redis restarts mid-run.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from amodal.jobstore import latest_state, load_state
from amodal.state import OUTCOMES
from producer import Client
from tasks.app import publisher, send_stage
from tests.cluster import amodal, cluster_env, start_workers
from tests.synthetic import synthetic_dataset
from tests.tcpproxy import Proxy
from workers.placement import Slot

pytestmark = pytest.mark.slow
SETTINGS = {"preset": "robust", "num_inference_steps": 2, "max_passes": 2}  # every job through every stage
FAST_RECOVERY = {"AMODAL_VISIBILITY_TIMEOUT": "10", "AMODAL_TASK_TIME_LIMIT": "120"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(env: dict, tmp_path: Path, count: int, dataset: str = "faults", **settings) -> dict:
    images, annotations = synthetic_dataset(tmp_path, count, given=count)
    res = amodal(env, "submit", "--images", str(images), "--annotations", str(annotations), "--dataset", dataset,
                 "-q", *[f"--set={k}={v}" for k, v in {**SETTINGS, **settings}.items()])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def wait_all(client: Client, dataset: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while client.status(dataset)["pending"]:
        assert time.monotonic() < deadline, stuck(client, dataset)
        time.sleep(1)
    return list(client.manifest(dataset))


def stuck(client: Client, dataset: str) -> str:
    """Where each pending job stands, and the broker's queues: what a timeout reports."""
    import redis

    lines = []
    for m in client.manifest(dataset):
        if m["status"] == "pending":
            state = latest_state(client.store, m["job_id"])
            attempts = client.store.list(f"jobs/{m['job_id']}/attempts/")
            lines.append(f"{m['job_id']}: {state.stage} v{state.version}, attempt markers {attempts}")
    broker = redis.Redis.from_url(client.broker_url)
    queues = {k.decode(): broker.llen(k) for k in broker.scan_iter() if broker.type(k) == b"list"}
    lines.append(f"queues {queues}, unacked {broker.hlen('unacked')}")
    return "\n".join(lines)


def assert_exactly_once(client: Client, dataset: str, manifest: list[dict], rows: int) -> None:
    """One manifest line per row, one outcome marker and at most one result folder per job."""
    assert [m["line"] for m in manifest] == list(range(1, rows + 1))
    assert all(m["status"] in OUTCOMES for m in manifest)
    markers = [k.split("/") for k in client.store.list(f"outcomes/{dataset}/")]
    jobs = [parts[3] for parts in markers]
    assert sorted(jobs) == sorted({m["job_id"] for m in manifest}), "one outcome marker per job"
    folders = {k.split("/")[2] for k in client.store.list(f"results/{dataset}/")}
    assert folders == set(jobs)
    for m in manifest:
        names = {k.rpartition("/")[2] for k in client.store.list(f"results/{dataset}/{m['job_id']}/")}
        if m["status"] in ("completed", "unoccluded"):
            assert names == {"amodal_completion.png", "amodal_mask.png", "visible_mask.png", "offsets.json",
                             "prompt.txt", "job.json"}, names


@pytest.fixture
def env(tmp_path, redis_url, s3_bucket, tiny_models, monkeypatch):
    env = cluster_env(redis_url, f"s3://{s3_bucket}/data", tiny_models, SETTINGS)
    env.update(FAST_RECOVERY)
    for key in ("AMODAL_BROKER_URL", "AMODAL_STORAGE_URL"):
        monkeypatch.setenv(key, env[key])
    return env


def wait_log(group, name: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in group.log(name):
        assert time.monotonic() < deadline, f"{name} never logged {text!r}"
        time.sleep(0.2)


def wait_stage(client: Client, dataset: str, stage: str, timeout: float = 120) -> None:
    """Until some job of the dataset has been sent to ``stage``."""
    deadline = time.monotonic() + timeout
    jobs = [m["job_id"] for m in client.manifest(dataset)]
    while not any((s := latest_state(client.store, j)) and s.stage == stage for j in jobs):
        assert time.monotonic() < deadline, f"no job reached {stage}"
        time.sleep(0.1)


def test_sigkill_segment_and_inpaint_workers_mid_run(env, tmp_path):
    group = start_workers(env, tmp_path / "logs")
    client = Client()
    try:
        submit(env, tmp_path, 8)
        for name, stage in (("segment-gpu0", "segment"), ("inpaint-gpu0", "inpaint")):
            wait_stage(client, "faults", stage)
            wait_log(group, name, f"{stage} step of")  # it runs a batch; others sit in its buffer
            # Not while a burst of messages is being delivered: kombu's Redis transport takes a message
            # off the queue (BRPOP) before it records it as unacknowledged, and a kill in between loses it.
            time.sleep(1.0)
            group.signal(name, signal.SIGKILL)  # the whole worker: parent and pool children
            group.procs[name].wait(timeout=30)
            slot = group.slots.pop(name)
            del group.procs[name]
            group.wait_ready([group.start(slot)])
        manifest = wait_all(client, "faults", timeout=600)
    finally:
        group.stop()
    assert all(m["status"] in ("completed", "unoccluded") for m in manifest), manifest
    assert_exactly_once(client, "faults", manifest, 8)


def test_poison_job_is_failed_after_bounded_attempts(env, tmp_path):
    """A job whose inpaint kills the worker's pool process each time (as an OOM kill would) ends
    ``failed`` after 3 attempts; the jobs batched with it complete."""
    env["AMODAL_MAX_ATTEMPTS"] = "3"
    # one inpaint process, so killing the poison job's process kills no other job's
    group = start_workers(env, tmp_path / "logs", concurrency={"inpaint": 1})
    client = Client()
    try:
        (tmp_path / "others").mkdir()
        submit(env, tmp_path / "others", 3)
        (tmp_path / "poison").mkdir()
        # Its own settings (more steps) make its diffusion call long enough to be killed inside.
        submit(env, tmp_path / "poison", 1, dataset="poison", num_inference_steps=40)
        (poison,) = [m["job_id"] for m in client.manifest("poison")]
        worker = psutil.Process(group.procs["inpaint-gpu0"].pid)
        kills = 0
        deadline = time.monotonic() + 600
        while client.status("faults")["pending"] or client.status("poison")["pending"]:
            assert time.monotonic() < deadline, (client.status("faults"), client.status("poison"))
            runs = [line for line in group.log("inpaint-gpu0").splitlines() if "inpaint step of" in line and poison in line]
            if len(runs) > kills:  # its diffusion call has started: kill the pool process
                kills = len(runs)
                for child in worker.children(recursive=True):
                    child.kill()
            time.sleep(0.05)
        others, (doomed,) = list(client.manifest("faults")), list(client.manifest("poison"))
    finally:
        group.stop()
    assert kills == 3
    assert doomed["status"] == "failed" and "after 3 attempts" in doomed["message"], doomed
    assert all(m["status"] in ("completed", "unoccluded") for m in others), others
    assert_exactly_once(client, "faults", others, 3)
    assert_exactly_once(client, "poison", [doomed], 1)
    res = amodal(env, "status", "--dataset", "poison")
    assert "failed" in res.stderr and "after 3 attempts" in res.stderr


def test_duplicated_messages_and_racing_workers(env, tmp_path):
    slots = [Slot("ground", 0), Slot("segment", 0), Slot("segment", 0), Slot("occlusion", 0),
             Slot("occlusion", 0), Slot("inpaint", 0), Slot("finalize", None), Slot("finalize", None)]
    group = start_workers(env, tmp_path / "logs", slots)
    client = Client(broker_url=env["AMODAL_BROKER_URL"])
    stack = contextlib.ExitStack()
    try:
        submit(env, tmp_path, 6)
        producer = stack.enter_context(publisher(env["AMODAL_BROKER_URL"]))
        for m in client.manifest("faults"):
            job = m["job_id"]
            deadline = time.monotonic() + 60
            while load_state(client.store, job, 0) is None:  # the dispatcher starts the job
                assert time.monotonic() < deadline, f"job {job} never started"
                time.sleep(0.1)
            for _ in range(2):  # each job's first message now arrives three times
                send_stage("ground", job, 0, producer=producer)
        manifest = wait_all(client, "faults", timeout=600)
        time.sleep(3)  # let the duplicates drain
    finally:
        stack.close()
        group.stop()
    assert_exactly_once(client, "faults", manifest, 6)
    for m in manifest:
        versions = sorted(client.store.list(f"jobs/{m['job_id']}/state/"))
        assert len(versions) == len(set(versions)) and latest_state(client.store, m["job_id"]).stage == "done"


def test_storage_outage_of_30_seconds(env, tmp_path, s3_endpoint):
    proxy = Proxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.up()
    env["AWS_ENDPOINT_URL"] = proxy.url
    group = start_workers(env, tmp_path / "logs")
    try:
        submit(env, tmp_path, 6)
        wait_stage(Client(), "faults", "inpaint")
        proxy.down()
        time.sleep(30)
        proxy.up()
        manifest = wait_all(Client(), "faults", timeout=600)
    finally:
        group.stop()
        proxy.down()
    assert all(m["status"] in ("completed", "unoccluded") for m in manifest), manifest
    assert_exactly_once(Client(), "faults", manifest, 6)
    logs = "".join(group.log(n) for n in group.procs)
    assert "retrying" in logs.lower()


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of the test's own with append-only persistence, restartable on the same port."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed")
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
           "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis did not start")

    procs = [start()]
    yield f"redis://127.0.0.1:{port}/0", procs, start
    for p in procs:
        p.terminate()


def test_redis_restart_mid_run(env, tmp_path, own_redis, monkeypatch):
    url, procs, start = own_redis
    env["AMODAL_BROKER_URL"] = url
    monkeypatch.setenv("AMODAL_BROKER_URL", url)
    group = start_workers(env, tmp_path / "logs")
    try:
        submit(env, tmp_path, 6)
        wait_log(group, "segment-gpu0", "segment step of")
        procs[0].send_signal(signal.SIGTERM)  # Redis writes its append-only file and exits
        procs[0].wait(timeout=30)
        time.sleep(3)
        procs.append(start())
        manifest = wait_all(Client(), "faults", timeout=600)
    finally:
        group.stop()
    assert all(m["status"] in ("completed", "unoccluded") for m in manifest), manifest
    assert_exactly_once(Client(), "faults", manifest, 6)
