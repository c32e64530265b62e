"""``amodal export``: finished rows into WebDataset and Parquet shards, read back by webdataset, pyarrow and
datasets; and the counts and merged record pages that status and the manifest read."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
import webdataset as wds
from PIL import Image

import amodal.jobstore
import producer.client
import producer.dispatch
import producer.tally
from amodal.config import Environment
from amodal.errors import UsageError
from amodal.jobstore import commit_state, latest_state
from amodal.keys import records_prefix, result_prefix
from producer import Client
from amodal.keys import DISPATCH_STATE
from producer.dispatch import Dispatcher
from producer.export import ExportFilter, export_dataset


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def small_chunks(monkeypatch):
    for module in (amodal.jobstore, producer.client, producer.dispatch, producer.tally):
        monkeypatch.setattr(module, "ROWS_PER_CHUNK", 4)


@pytest.fixture
def broker(redis_url, monkeypatch) -> redis.Redis:
    monkeypatch.setenv("AMODAL_BROKER_URL", redis_url)
    return redis.Redis.from_url(redis_url)


def outcome(i: int) -> tuple[str, list[str]]:
    """Row i's outcome and flags: every fifth fails, every third is flagged."""
    return ("failed" if i % 5 == 4 else "completed"), (["window_edge"] if i % 3 == 0 else [])


def end_job(client: Client, job: str, i: int) -> None:
    """What finalize leaves: the result files (for a completed job), job.json, the last state ``done``."""
    state = latest_state(client.store, job)
    status, flags = outcome(i)
    prefix = result_prefix(state.dataset, job)
    if status == "completed":
        rgba = np.zeros((6, 5, 4), np.uint8)
        rgba[..., 0], rgba[1:5, 1:4, 3] = i, 255
        client.store.put(f"{prefix}/amodal_completion.png", png(rgba))
        client.store.put(f"{prefix}/amodal_mask.png", png(rgba[..., 3]))
        client.store.put(f"{prefix}/visible_mask.png", png(rgba[..., 3] // 2))
    client.store.put(f"{prefix}/job.json", json.dumps({
        "status": status, "message": "" if status == "completed" else "ran out of attempts", "flags": flags,
        "prompt": f"a thing {i}", "offsets": {"x": -i, "y": 2, "width": 5, "height": 6},
        "quality": {"amodal_px": 12 + i}}).encode())
    state.version, state.stage, state.status, state.flags = state.version + 1, "done", status, flags
    assert commit_state(client.store, state)


def submitted(tmp_path: Path, monkeypatch, broker: redis.Redis, rows: int, name: str) -> tuple[Client, Dispatcher]:
    """``rows`` rows over three images, recorded, and started by a dispatcher."""
    monkeypatch.setenv("AMODAL_STORAGE_URL", (tmp_path / "store").as_uri())
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    annotations = tmp_path / f"{name}.jsonl"
    annotations.write_text("".join(json.dumps({"image": f"{r % 3}.png", "query": f"thing {r}"}) + "\n"
                                   for r in range(rows)))
    client = Client()
    client.submit_dataset(folder, annotations, name, progress=False)
    dispatcher = Dispatcher(client.store, Environment(dispatch_high_water=rows), broker)
    dispatcher.round()
    return client, dispatcher


def finished(tmp_path: Path, monkeypatch, broker: redis.Redis, rows: int, name: str, done: int | None = None) -> Client:
    """:func:`submitted`, its first ``done`` jobs (default all) ended and seen ending by the dispatcher."""
    client, dispatcher = submitted(tmp_path, monkeypatch, broker, rows, name)
    for i, line in enumerate(list(client.manifest(name))[:rows if done is None else done]):
        end_job(client, line["job_id"], i)
    dispatcher.scan()
    return client


def test_webdataset_export_is_read_back_filtered_and_resumed(tmp_path, broker, small_chunks, monkeypatch):
    client = finished(tmp_path, monkeypatch, broker, 10, "shelves", done=8)
    out = tmp_path / "out"
    report = export_dataset(client, "shelves", "webdataset", str(out), shard_rows=4, progress=False)
    # rows 1-4 and 5-8 are finished: two shards; rows 9-10 wait for their outcomes
    assert (report.shards_written, report.shards_waiting) == (2, 1)
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".tar")
    assert names == ["shelves-000000.tar", "shelves-000001.tar"]
    samples = list(wds.WebDataset([str(out / n) for n in names], shardshuffle=False).decode("rgba"))
    kept = [i for i in range(8) if outcome(i)[0] == "completed"]
    assert [s["json"]["line"] for s in samples] == [i + 1 for i in kept]
    for i, sample in zip(kept, samples):
        meta = sample["json"]
        assert (meta["query"], meta["image"], meta["prompt"], meta["offsets"]["x"], meta["flags"]) == \
            (f"thing {i}", f"{i % 3}.png", f"a thing {i}", -i, outcome(i)[1])
        assert sample["__key__"] == meta["job_id"] and meta["quality"] == {"amodal_px": 12 + i}
        assert sample["completion.png"].shape == (6, 5, 4)
        assert round(float(sample["completion.png"][0, 0, 0]) * 255) == i
        assert sample["amodal_mask.png"].shape[:2] == sample["visible_mask.png"].shape[:2] == (6, 5)

    # the last rows end; a rerun writes only the shard that waited, and one deleted shard
    for i, line in enumerate(list(client.manifest("shelves"))[8:], 8):
        end_job(client, line["job_id"], i)
    Dispatcher(client.store, Environment(), broker).scan()  # a restarted dispatcher: its flights are stored
    (out / names[0]).unlink()
    kept_before = (out / names[1]).stat().st_mtime_ns
    again = export_dataset(client, "shelves", "webdataset", str(out), shard_rows=4, progress=False)
    assert (again.shards_written, again.shards_present, again.shards_waiting) == (2, 1, 0)
    assert (out / names[1]).stat().st_mtime_ns == kept_before
    assert sorted(p.name for p in out.iterdir()) == [*names, "shelves-000002.tar", "shelves.export.json"]
    with pytest.raises(UsageError, match="holds another export of shelves"):  # other ranges under the same names
        export_dataset(client, "shelves", "webdataset", str(out), shard_rows=5, progress=False)

    # flags: only unflagged rows, into another folder
    clean = export_dataset(client, "shelves", "webdataset", str(tmp_path / "clean"), shard_rows=4,
                           keep=ExportFilter(flags="none"), progress=False)
    assert clean.rows_written == sum(outcome(i) == ("completed", []) for i in range(10))


def test_parquet_export_to_s3_read_by_pyarrow_and_datasets(tmp_path, broker, small_chunks, monkeypatch, s3_bucket,
                                                           s3_admin):
    datasets = pytest.importorskip("datasets")
    client = finished(tmp_path, monkeypatch, broker, 6, "pq")
    report = export_dataset(client, "pq", "parquet", f"s3://{s3_bucket}/exports/pq", shard_rows=4,
                            keep=ExportFilter(statuses=("completed", "failed"), drop_flags=("window_edge",)),
                            progress=False)
    assert report.shards_written == 2
    keys = sorted(o["Key"] for o in s3_admin.list_objects_v2(Bucket=s3_bucket, Prefix="exports/")["Contents"])
    assert keys == ["exports/pq/pq-000000.parquet", "exports/pq/pq-000001.parquet", "exports/pq/pq.export.json"]
    local = []
    for key in keys[:2]:
        local.append(tmp_path / key.rsplit("/", 1)[1])
        s3_admin.download_file(s3_bucket, key, str(local[-1]))
    table = pq.read_table(local).to_pylist()
    expected = [i for i in range(6) if not outcome(i)[1]]
    assert [row["line"] for row in table] == [i + 1 for i in expected]
    assert [row["status"] for row in table] == [outcome(i)[0] for i in expected]
    assert all((row["completion"] is None) == (row["status"] == "failed") for row in table)
    loaded = datasets.Dataset.from_parquet([str(p) for p in local])
    assert loaded[0]["query"] == "thing 1" and loaded[0]["offsets"] == {"x": -1, "y": 2, "width": 5, "height": 6}
    assert Image.open(io.BytesIO(loaded[0]["completion"])).mode == "RGBA"


def test_status_counts_each_job_once_and_pages_merge(tmp_path, broker, small_chunks, monkeypatch):
    client, dispatcher = submitted(tmp_path, monkeypatch, broker, 8, "counted")
    lines = list(client.manifest("counted"))
    for i, line in enumerate(lines[:2]):
        end_job(client, line["job_id"], i)
    dispatcher.scan()
    for i, line in enumerate(lines[2:6], 2):
        end_job(client, line["job_id"], i)
    dispatcher.scan()
    # chunk 0 (rows 1-4) ended in two scans: its two pages merged into one; chunk 1 still has jobs in flight
    pages = sorted(key.split("/")[3] for key in client.store.list(records_prefix("counted")))
    assert pages == ["0000-000000", "0000-000001"]

    listed = []
    store_list = client.store.list
    client.store.list = lambda prefix="": listed.append(prefix) or store_list(prefix)
    counts = client.status("counted")
    assert not [p for p in listed if p.startswith("outcomes/")]  # no listing of outcome markers
    assert (counts["completed"], counts["failed"], counts["pending"], counts["flagged"]) == (5, 1, 2, 2)

    # the dispatcher's progress is lost and the dataset fed again: every ended job is seen ending again
    client.store = client.store.__class__(client.store.root)
    client.store.delete(DISPATCH_STATE)
    again = Dispatcher(client.store, Environment(dispatch_high_water=8), broker)
    again.round()
    again.scan()
    assert client.status("counted") == counts
    assert [line["status"] for line in client.manifest("counted")] == \
        [outcome(i)[0] for i in range(6)] + ["pending", "pending"]


def test_export_command_from_outside_the_repository(tmp_path, broker, small_chunks, monkeypatch):
    finished(tmp_path, monkeypatch, broker, 4, "cli")
    amodal = Path(sys.executable).parent / "amodal"
    env = {**os.environ}
    done = subprocess.run([str(amodal), "export", "--dataset", "cli", "--format", "webdataset", "--out",
                           str(tmp_path / "shards"), "-q"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["shards_written"] == 1
    bad = subprocess.run([str(amodal), "export", "--dataset", "nope", "--format", "parquet", "--out",
                          str(tmp_path / "x")], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no dataset named 'nope'" in bad.stderr
