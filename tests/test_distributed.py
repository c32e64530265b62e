"""End to end on real parts: Redis, an S3 server, five worker processes with tiny models, Flower."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from amodal.state import OUTCOMES
from amodal.storage import open_storage
from tests.cluster import amodal, cluster_env, start_workers
from tests.test_flower import AUTH, flower_env, free_port, start_flower
from tests.synthetic import synthetic_dataset

pytestmark = pytest.mark.slow
SETTINGS = {"preset": "robust", "num_inference_steps": 2, "max_passes": 2}  # every job through every stage


@pytest.fixture
def cluster(tmp_path, redis_url, s3_bucket, tiny_models):
    env = cluster_env(redis_url, f"s3://{s3_bucket}/data", tiny_models, SETTINGS)
    group = start_workers(env, tmp_path / "logs")
    try:
        yield group
    finally:
        group.stop()


def check_result(store, line):
    prefix = line["result"].split("/data/", 1)[1]
    rgba = Image.open(io.BytesIO(store.get(f"{prefix}/amodal_completion.png")))
    assert rgba.mode == "RGBA"
    amodal_mask = np.array(Image.open(io.BytesIO(store.get(f"{prefix}/amodal_mask.png")))) > 127
    visible = np.array(Image.open(io.BytesIO(store.get(f"{prefix}/visible_mask.png")))) > 127
    alpha = np.array(rgba)[..., 3]
    assert alpha.shape == amodal_mask.shape == visible.shape
    assert (alpha > 0)[amodal_mask].all() and not ((alpha > 0) & ~amodal_mask & ~visible).any()
    offsets = json.loads(store.get(f"{prefix}/offsets.json"))
    assert (offsets["width"], offsets["height"]) == (alpha.shape[1], alpha.shape[0])
    record = json.loads(store.get(f"{prefix}/job.json"))
    assert record["status"] == line["status"]
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(record)


def test_datasets_through_five_workers(cluster, tmp_path, paper_examples):
    env = cluster.env
    assert len(cluster.procs) == 5  # five stage workers, each running the dispatcher's loop
    images, annotations = synthetic_dataset(tmp_path)
    store = open_storage(env["AMODAL_STORAGE_URL"])
    submitted = {}
    for dataset, imgs, ann in (("synthetic", images, annotations),
                               ("paper", paper_examples / "images", paper_examples / "example_annotation.json")):
        res = amodal(env, "submit", "--images", str(imgs), "--annotations", str(ann), "--dataset", dataset, "-q",
                     *[f"--set={k}={v}" for k, v in SETTINGS.items()])
        assert res.returncode == 0, res.stderr
        submitted[dataset] = json.loads(res.stdout.strip().splitlines()[-1])
    assert submitted["synthetic"]["recorded"] == 12 and submitted["paper"]["recorded"] == 7

    for dataset in submitted:
        res = amodal(env, "status", "--dataset", dataset, "--wait", "--interval", "1", timeout=900)
        assert res.returncode == 0, res.stderr + "\n".join(cluster.log(s)[-2000:] for s in cluster.procs)
        counts = json.loads(res.stdout.strip().splitlines()[-1])
        assert counts["pending"] == 0 and counts["failed"] == 0, (counts, res.stderr)

        res = amodal(env, "status", "--dataset", dataset, "--manifest")
        lines = [json.loads(x) for x in res.stdout.splitlines()]
        assert [x["line"] for x in lines] == list(range(1, len(lines) + 1))
        assert all(x["status"] in OUTCOMES for x in lines)
        for line in lines:
            if line["result"]:
                check_result(store, line)
        if dataset == "synthetic":
            given = lines[:6]  # given masks: found, and (truncated or occluded) completed by the loop
            assert all(x["status"] == "completed" for x in given[::2]), given  # the truncated ones
            assert {x["status"] for x in lines} <= set(OUTCOMES)

    # the same submission again: nothing new is enqueued, no second result appears
    results_before = sorted(store.list("results/"))
    res = amodal(env, "submit", "--images", str(images), "--annotations", str(annotations), "--dataset",
                 "synthetic", "-q", *[f"--set={k}={v}" for k, v in SETTINGS.items()])
    again = json.loads(res.stdout.strip().splitlines()[-1])
    assert again["recorded"] == 0 and again["finished"] == 12
    assert sorted(store.list("results/")) == results_before

    # JSON only on the wire: a pickled message is refused, not run
    from tasks.app import app, broker

    with broker(env["AMODAL_BROKER_URL"]) as connection:
        app.send_task("amodal.ground", args=["0" * 24, 0], queue="ground", serializer="pickle",
                      connection=connection)
    deadline = time.monotonic() + 60
    while "Refusing to deserialize untrusted content of type pickle" not in cluster.log("ground-gpu0"):
        assert time.monotonic() < deadline, cluster.log("ground-gpu0")[-3000:]
        time.sleep(0.5)
    assert not list(store.list(f"jobs/{'0' * 24}/"))
    # no credentials in any worker's log
    assert all(env["AWS_SECRET_ACCESS_KEY"] not in cluster.log(name) for name in cluster.procs)


def test_flower_lists_the_five_stage_workers(cluster, redis_url):
    import requests

    port = free_port()
    proc = start_flower(flower_env(redis_url), port)
    try:
        deadline = time.monotonic() + 60
        while True:
            workers = requests.get(f"http://127.0.0.1:{port}/api/workers?refresh=1", auth=AUTH, timeout=30).json()
            stages = sorted(name.split("@")[0] for name in workers)
            if len(stages) == 5 or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert stages == ["finalize", "ground-gpu0", "inpaint-gpu0", "occlusion-gpu0", "segment-gpu0"]


def test_submit_from_an_s3_prefix_reads_images_in_place(tmp_path, redis_url, s3_bucket, s3_admin, monkeypatch):
    """Images under s3:// are not copied: jobs name them in their own bucket; missing ones are invalid."""
    from amodal.jobstore import latest_state
    from producer import Client
    from producer.dispatch import Dispatcher

    images, annotations = synthetic_dataset(tmp_path, 4, given=4)
    for path in images.iterdir():
        s3_admin.put_object(Bucket=s3_bucket, Key=f"photos/{path.name}", Body=path.read_bytes())
    annotations.write_text(annotations.read_text() + json.dumps({"image": "gone.png", "query": "x"}) + "\n")
    monkeypatch.setenv("AMODAL_BROKER_URL", redis_url)
    client = Client(broker_url=redis_url, storage_url=f"s3://{s3_bucket}/store")
    report = client.submit_dataset(f"s3://{s3_bucket}/photos", annotations, "from-s3", progress=False)
    assert report.enqueued == 4 and [r["message"] for r in report.invalid] == ["image not found: gone.png"]
    lines = list(client.manifest("from-s3"))
    assert [x["status"] for x in lines] == ["pending"] * 4 + ["invalid"]
    Dispatcher(client.store).round()  # starts the jobs: their state 0 appears
    state = latest_state(client.store, lines[0]["job_id"])
    assert state.inputs == f"s3://{s3_bucket}/photos" and state.image_key == "scene00.png"
    assert not [k for k in client.store.list("inputs/")]  # nothing uploaded


def test_bad_input_corpus_through_submit(cluster, tmp_path):
    """Each bad row of the corpus gets its own invalid outcome on the queued path; the rest complete."""
    from tests.badinputs import LIMITS, write_bad_corpus

    annotations, expected = write_bad_corpus(tmp_path)
    env = cluster.env
    sets = [f"--set={k}={v}" for k, v in {**LIMITS, **SETTINGS}.items()]
    res = amodal(env, "submit", "--images", str(tmp_path / "images"), "--annotations", str(annotations),
                 "--dataset", "bad", "-q", *sets)
    assert res.returncode == 0, res.stderr
    res = amodal(env, "status", "--dataset", "bad", "--wait", "--interval", "1", timeout=900)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in amodal(env, "status", "--dataset", "bad", "--manifest").stdout.splitlines()]
    assert [x["line"] for x in lines] == [e["line"] for e in expected]
    duplicates = 0
    for line, want in zip(lines, expected):
        assert line["status"] != "failed", line
        if want["kind"] == "invalid":
            assert line["status"] == "invalid" and want["message"] in line["message"], (line, want)
        elif line["status"] == "invalid":
            # uploads are keyed by content: sub/good.png is good.png again, with the same query
            assert line["message"].startswith("duplicate of line"), line
            duplicates += 1
    assert duplicates == 1
