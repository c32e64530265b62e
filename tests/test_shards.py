"""Submitting sharded datasets: WebDataset tar shards (local and on S3), Parquet, Hugging Face datasets."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from producer import Client
from producer.shards import ShardOptions


def png(value: int, size: int = 8, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def stored_inputs(client: Client) -> list[str]:
    return sorted(client.store.list("inputs/"))


@pytest.fixture
def local_store(tmp_path, monkeypatch) -> str:
    url = (tmp_path / "store").as_uri()
    monkeypatch.setenv("AMODAL_STORAGE_URL", url)
    return url


def test_webdataset_shards_with_queries_masks_and_broken_parts(tmp_path, local_store):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", [
        {"__key__": "a", "png": png(10), "json": json.dumps({"query": ["cat", "dog"]}).encode()},
        {"__key__": "b", "jpg": b"not an image at all", "json": json.dumps({"query": "cup"}).encode()},
        {"__key__": "c", "png": png(30), "mask.png": png(255, mode="L"), "json": json.dumps({"query": "vase"}).encode()},
    ])
    write_shard(shards / "00001.tar", [{"__key__": f"d{i}", "png": png(40 + i), "json": json.dumps({"query": "pot"}).encode()}
                                       for i in range(3)])
    whole = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(whole[:6144 + 600])  # cut inside the second sample's image
    (shards / "00002.tar").write_bytes(b"\0garbage" * 100)
    write_shard(shards / "00003.tar", [{"__key__": "e", "png": png(10), "json": json.dumps({"query": "cat"}).encode()}])

    client = Client()
    report = client.submit_dataset(str(shards / "{00000..00003}.tar"), None, "wds", progress=False)
    lines = list(client.manifest("wds"))
    assert [line["line"] for line in lines] == list(range(1, len(lines) + 1))
    by_image = {(line["image"], line["query"]): line for line in lines}
    assert by_image[("00000.tar/a", "cat")]["status"] == "pending"
    assert by_image[("00000.tar/a", "dog")]["status"] == "pending"
    assert by_image[("00000.tar/b", "cup")]["status"] == "invalid"
    assert "cannot be decoded" in by_image[("00000.tar/b", "cup")]["message"]
    assert by_image[("00001.tar/d0", "pot")]["status"] == "pending"
    broken = [line for line in lines if line["image"] in ("00001.tar", "00002.tar")]
    assert [line["image"] for line in broken] == ["00001.tar", "00002.tar"]
    assert all(line["status"] == "invalid" and "cannot be read" in line["message"] for line in broken)
    # the same image bytes in two shards: stored once, and a duplicate (same image, query) is refused
    assert "duplicate of line 1" in by_image[("00003.tar/e", "cat")]["message"]
    rows = {row["image"]: row for row in __import__("amodal.jobstore").jobstore.read_rows(client.store, "wds")}
    assert rows["00000.tar/c"]["mask_key"].startswith("inputs/")
    assert len(stored_inputs(client)) == 4  # a, c, c's mask, d0
    assert report.rows == len(lines) and report.enqueued == 4 and len(report.invalid) == len(lines) - 4
    assert client.status("wds")["invalid"] == len(lines) - 4

    # submitting again finds every row recorded and every input stored: nothing written
    writes = []
    put = client.store.put_if_absent
    client.store.put_if_absent = lambda key, data: writes.append(key) or put(key, data)
    again = client.submit_dataset(str(shards / "{00000..00003}.tar"), None, "wds", progress=False)
    assert again.enqueued == 0 and writes == []


def test_webdataset_on_s3_by_prefix_with_one_query(tmp_path, s3_bucket, s3_admin, monkeypatch):
    monkeypatch.setenv("AMODAL_STORAGE_URL", f"s3://{s3_bucket}/store")
    for index in range(2):
        path = tmp_path / f"{index}.tar"
        write_shard(path, [{"__key__": f"s{index}-{i}", "png": png(index * 10 + i)} for i in range(3)])
        s3_admin.upload_file(str(path), s3_bucket, f"shards/part-{index}.tar")
    client = Client()
    report = client.submit_dataset(f"s3://{s3_bucket}/shards", None, "s3wds", progress=False,
                                   shards=ShardOptions(query="a bird"))
    assert report.rows == 6 and report.enqueued == 6
    lines = list(client.manifest("s3wds"))
    assert [line["image"] for line in lines] == [f"part-{i}.tar/s{i}-{k}" for i in range(2) for k in range(3)]
    assert {line["query"] for line in lines} == {"a bird"}


def test_webdataset_queries_from_an_annotation_file(tmp_path, local_store):
    write_shard(tmp_path / "0.tar", [{"__key__": k, "png": png(i)} for i, k in enumerate(["x", "y", "z"])])
    annotations = tmp_path / "queries.jsonl"
    annotations.write_text("".join(json.dumps(row) + "\n" for row in [
        {"image": "z", "query": "lamp"}, {"image": "x", "query": "chair"}, {"image": "x", "query": "rug"},
        {"image": "w", "query": "nothing"}]))
    client = Client()
    client.submit_dataset(str(tmp_path / "0.tar"), annotations, "joined", progress=False)
    lines = [(line["image"], line["query"], line["status"]) for line in client.manifest("joined")]
    assert lines == [("0.tar/x", "chair", "pending"), ("0.tar/x", "rug", "pending"), ("0.tar/z", "lamp", "pending"),
                     ("w", "nothing", "invalid")]


def test_parquet_folder_with_bytes_paths_and_masks_read_in_row_groups(tmp_path, local_store):
    folder = tmp_path / "table"
    (folder / "pics").mkdir(parents=True)
    (folder / "pics" / "p.png").write_bytes(png(77))
    first = pa.table({"image": [png(1), png(2), b"\x89PNG broken"], "caption": ["cat", "dog", "cow"],
                      "mask": [png(255, mode="L"), None, None]})
    pq.write_table(first, folder / "a.parquet", row_group_size=2)
    second = pa.table({"image": ["pics/p.png", "../outside.png"], "caption": ["owl", "bee"], "mask": [None, None]})
    pq.write_table(second, folder / "b.parquet")
    (folder / "c.parquet").write_bytes(b"PAR1 not really")
    client = Client()
    client.submit_dataset(str(folder), None, "table", progress=False,
                          shards=ShardOptions(query_field="caption", mask_field="mask"))
    lines = list(client.manifest("table"))
    summary = [(line["image"], line["query"], line["status"]) for line in lines]
    assert summary[:5] == [("a.parquet/0", "cat", "pending"), ("a.parquet/1", "dog", "pending"),
                           ("a.parquet/2", "cow", "invalid"), ("b.parquet/0", "owl", "pending"),
                           ("b.parquet/1", "bee", "invalid")]
    assert "must not contain '..'" in lines[4]["message"]
    assert summary[5][0] == "c.parquet/0" and summary[5][2] == "invalid" and "cannot be read" in lines[5]["message"]
    rows = list(__import__("amodal.jobstore").jobstore.read_rows(client.store, "table"))
    assert "mask_key" in rows[0] and "mask_key" not in rows[1]


def test_hugging_face_dataset_saved_to_disk(tmp_path, local_store):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(5)],
                                        "query": [f"thing {i}" for i in range(5)]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "query": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "saved"))
    client = Client()
    report = client.submit_dataset(str(tmp_path / "saved"), None, "hf", progress=False)
    assert report.enqueued == 5
    assert [(line["image"], line["query"]) for line in client.manifest("hf")] == [(str(i), f"thing {i}")
                                                                                  for i in range(5)]


def test_submit_command_reads_shards_from_outside_the_repository(tmp_path, local_store, redis_url):
    import os
    import subprocess
    import sys

    for index in range(2):
        write_shard(tmp_path / f"part-{index}.tar", [{"__key__": f"k{index}{i}", "jpg": png(index * 3 + i)}
                                                     for i in range(3)])
    amodal = str(Path(sys.executable).parent / "amodal")
    env = {**os.environ, "AMODAL_BROKER_URL": redis_url}

    def submit(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run([amodal, "submit", "--dataset", "cli", "-q", *words], env=env, cwd=tmp_path,
                              capture_output=True, text=True)

    done = submit("--images", "part-{0..1}.tar", "--query", "a teapot")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"rows": 6, "recorded": 6, "finished": 0, "invalid": 0}
    (tmp_path / "plain").mkdir()
    for words, message in ((["--images", "missing.parquet"], "--images: no such file or folder"),
                           (["--images", "plain", "--query", "cat"], "give --annotations FILE")):
        bad = submit(*words)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr


def test_run_command_over_shards_gives_each_row_an_outcome(tmp_path, tiny_models):
    import os
    import subprocess
    import sys

    write_shard(tmp_path / "0.tar", [{"__key__": "bad", "jpg": b"\xff\xd8 not a jpeg",
                                      "json": json.dumps({"query": ["cat", "dog"]}).encode()}])
    (tmp_path / "1.tar").write_bytes(b"broken" * 300)
    done = subprocess.run([str(Path(sys.executable).parent / "amodal"), "run", "--images", "{0..1}.tar", "--out", "out",
                           "--models", str(tiny_models), "-q"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "AMODAL_STORAGE_URL": ""})
    assert done.returncode == 0, done.stderr
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(m["line"], m["image"], m["query"], m["status"]) for m in manifest] == [
        (1, "0.tar__bad", "cat", "invalid"), (2, "0.tar__bad", "dog", "invalid"), (3, "1.tar", "", "invalid")]
    assert "cannot be read" in manifest[2]["message"]
