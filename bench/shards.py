"""Datasets in and out at scale, against a real SeaweedFS (``weed server -s3``) and Redis on loopback, no workers.

1. Submission of ``--rows`` rows from WebDataset tar shards (``--queries`` queries per sample, in each sample's
   .json), and of the same rows as a folder of images with a JSONL annotation file (``bench/submit.py``'s
   path), each in its own process: rows/s and peak RSS.
2. Export of those rows, every one given a finished result (its three PNGs and a record page per rows chunk,
   as finalize and the dispatcher leave them), into WebDataset shards on the same S3 server: rows/s, shard sizes.
3. ``status`` and the manifest of a dataset of ``--million`` finished rows (its rows, merged record pages and
   counts written as a submission and the dispatcher leave them), in a fresh process: seconds, rows/s, RSS.

Writes ``bench/results/shards_<rows>.json``.

    nice python bench/shards.py --rows 100000
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.submit import SAMPLE_RECORD, write_dataset  # noqa: E402
from tests.seaweed import seaweedfs  # noqa: E402

TARGETS = {"submit_rows_per_s": 1500, "submit_peak_rss_mb": 300, "export_rows_per_s": 1000, "status_s": 5,
           "manifest_rows_per_s": 50000}
SAMPLES_PER_SHARD = 1000


def write_shards(folder: Path, rows: int, queries: int) -> str:
    """``rows // queries`` samples of a distinct small PNG (17x17, unlike write_dataset's) and a .json naming ``queries`` queries, in tar shards
    of ``SAMPLES_PER_SHARD``; returns their brace pattern."""
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    samples = -(-rows // queries)
    shards = -(-samples // SAMPLES_PER_SHARD)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(shard * SAMPLES_PER_SHARD, min(samples, (shard + 1) * SAMPLES_PER_SHARD)):
                buffer = io.BytesIO()
                Image.new("RGB", (17, 17), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buffer, "PNG")
                sink.write({"__key__": f"{i:08d}", "png": buffer.getvalue(),
                            "json": json.dumps({"query": [f"object {q}" for q in range(queries)]}).encode()})
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- the measured processes ------------------------------------------------------------------------
def child_submit(images: str, annotations: str, dataset: str) -> dict:
    from producer import Client

    client = Client()
    start = time.perf_counter()
    report = client.submit_dataset(images, annotations or None, dataset, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "rows": report.rows, "rows_per_s": round(report.rows / seconds),
            "enqueued": report.enqueued, "invalid": len(report.invalid), "peak_rss_mb": peak_rss_mb()}


def child_export(dataset: str, out: str) -> dict:
    from producer import Client
    from producer.export import export_dataset

    client = Client()
    start = time.perf_counter()
    report = export_dataset(client, dataset, "webdataset", out, shard_rows=SAMPLES_PER_SHARD, progress=False)
    seconds = time.perf_counter() - start
    sizes = report.shard_bytes
    return {"seconds": round(seconds, 2), "rows": report.rows_written,
            "rows_per_s": round(report.rows_written / seconds), "shards": report.shards_written,
            "shard_mb": {"min": round(min(sizes) / 2**20, 2), "mean": round(sum(sizes) / len(sizes) / 2**20, 2),
                         "max": round(max(sizes) / 2**20, 2)} if sizes else None,
            "peak_rss_mb": peak_rss_mb()}


def child_read(dataset: str) -> dict:
    from producer import Client

    client = Client()
    start = time.perf_counter()
    counts = client.status(dataset)
    status_s = time.perf_counter() - start
    start = time.perf_counter()
    lines = collections.Counter(line["status"] for line in client.manifest(dataset))
    manifest_s = time.perf_counter() - start
    return {"status_s": round(status_s, 3), "status": counts, "manifest_s": round(manifest_s, 2),
            "manifest_rows": sum(lines.values()), "manifest_statuses": dict(lines),
            "manifest_rows_per_s": round(sum(lines.values()) / manifest_s), "peak_rss_mb": peak_rss_mb()}


CHILDREN = {"submit": child_submit, "export": child_export, "read": child_read}


def measure(env: dict, what: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, *args], env=env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- what workers and the dispatcher leave -----------------------------------------------------------
def finish_all(client, dataset: str) -> int:
    """Give every recorded job of ``dataset`` a finished result: its completion and masks (64x64 PNGs) and, per
    rows chunk, the record page and counts the dispatcher writes. Returns the jobs."""
    import numpy as np
    from PIL import Image

    from amodal.jobstore import read_row_chunks, write_counts, write_record_page
    from amodal.keys import result_prefix

    def png(array) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    files = {"amodal_completion.png": png(rgba), "amodal_mask.png": png(rgba[..., 3] > 127),
             "visible_mask.png": png(rgba[..., 3] > 200)}
    record = {**SAMPLE_RECORD, "prompt": "a object", "offsets": {"x": -3, "y": 5, "width": 64, "height": 64}}
    counts, jobs = {"generation": 0, "chunks": {}}, 0
    with ThreadPoolExecutor(32) as pool:
        for generation, index, rows in read_row_chunks(client.store, dataset):
            ids = [row["job_id"] for row in rows if not row.get("status")]
            list(pool.map(lambda job: [client.store.put(f"{result_prefix(dataset, job)}/{name}", data)
                                       for name, data in files.items()], ids))
            write_record_page(client.store, dataset, generation, index, {job: record for job in ids})
            counts["generation"] = generation
            counts["chunks"][str(index)] = {"completed": len(ids), "flagged": 0}
            jobs += len(ids)
    write_counts(client.store, dataset, counts)
    return jobs


def warm_up(server, objects: int = 2000) -> None:
    """Small writes into the bench's bucket until SeaweedFS has grown its volumes: the first writes of a new
    bucket wait on volume allocation, which would count against whichever run came first."""
    client = server.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket="bench", Key=f"warmup/{i}", Body=b"x" * 1000), range(objects)))


def get_rate(client, dataset: str, count: int = 6000) -> int:
    """Plain GETs per second of result files, 32 at a time: the ceiling of an export that reads 3 per row."""
    from amodal.jobstore import read_rows
    from amodal.keys import result_prefix

    keys = []
    for row in read_rows(client.store, dataset):
        keys += [f"{result_prefix(dataset, row['job_id'])}/{name}" for name in
                 ("amodal_completion.png", "amodal_mask.png", "visible_mask.png")]
        if len(keys) >= count:
            break
    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(client.store.get, keys))
    return round(len(keys) / (time.perf_counter() - start))


def write_finished(client, dataset: str, rows: int) -> None:
    """A dataset of ``rows`` finished rows as a submission, the dispatcher and its merged pages leave it: the
    rows chunks, the submission record, one record page and the counts per chunk, the dispatcher's cursor."""
    from amodal.jobstore import ROWS_PER_CHUNK, write_counts, write_record_page, write_rows_chunk, write_submission
    from amodal.keys import DISPATCH_STATE
    from producer.dispatch import Progress

    record = {**SAMPLE_RECORD, "prompt": "a object", "offsets": {"x": -3, "y": 5, "width": 64, "height": 64}}
    chunks = -(-rows // ROWS_PER_CHUNK)

    def chunk(index: int) -> int:
        lines = range(index * ROWS_PER_CHUNK + 1, min(rows, (index + 1) * ROWS_PER_CHUNK) + 1)
        records = [{"line": n, "image": f"{n // 10:07d}.png", "query": f"object {n % 10}",
                    "job_id": hashlib.sha256(str(n).encode()).hexdigest()[:24],
                    "image_key": f"inputs/{n // 10:064d}.png"} for n in lines]
        write_rows_chunk(client.store, dataset, 0, index, records)
        write_record_page(client.store, dataset, 0, index, {r["job_id"]: record for r in records})
        return len(records)

    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(chunk, range(chunks)))
    write_counts(client.store, dataset, {"generation": 0, "chunks": {str(i): {"completed": n, "flagged": 0}
                                                                     for i, n in enumerate(sizes)}})
    write_submission(client.store, dataset, {"dataset": dataset, "generation": 0, "rows": rows, "sent": rows,
                                             "jobs": rows, "invalid": 0, "complete": True, "images": "", "inputs": "",
                                             "annotations": "", "settings": {}, "job_settings": {}})
    client.store.put(DISPATCH_STATE, Progress({dataset: [0, rows]}, {}, time.time()).to_json())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=5, help="queries per sample (and per image on the folder path)")
    ap.add_argument("--million", type=int, default=1_000_000, help="finished rows for status and the manifest")
    ap.add_argument("--skip-folder", action="store_true", help="do not run the folder path's submission")
    ap.add_argument("--skip-export", action="store_true", help="do not write results and export them")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return
    record: dict = {"rows": args.rows, "queries_per_sample": args.queries, "finished_rows_for_status": args.million,
                    "storage": "SeaweedFS (weed server -s3) on loopback", "samples_per_shard": SAMPLES_PER_SHARD}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pattern = write_shards(folder / "shards", args.rows, args.queries)
        annotations = None if args.skip_folder else write_dataset(folder / "folder", args.rows, args.queries)
        with seaweedfs(folder / "s3", buckets=["bench"]) as server:
            env = {**os.environ, **server.env, "AMODAL_STORAGE_URL": "s3://bench/data"}
            os.environ.update(env)
            warm_up(server)
            # 1. submissions
            record["submit_webdataset"] = measure(env, "submit", pattern, "", "shards")
            if annotations is not None:
                record["submit_folder"] = measure(env, "submit", str(folder / "folder" / "images"), str(annotations),
                                                  "folder")
            from producer import Client

            client = Client()
            # 2. export of every row, finished
            if not args.skip_export:
                start = time.perf_counter()
                jobs = finish_all(client, "shards")
                record["results_written"] = {"jobs": jobs, "seconds": round(time.perf_counter() - start, 1)}
                record["s3_gets_per_s"] = get_rate(client, "shards")
                record["export_webdataset"] = measure(env, "export", "shards", "s3://bench/exports")
                rerun = measure(env, "export", "shards", "s3://bench/exports")
                record["export_rerun"] = {"seconds": rerun["seconds"], "shards_written": rerun["shards"]}
            # 3. status and the manifest at a million finished rows
            start = time.perf_counter()
            write_finished(client, "million", args.million)
            record["million_written_s"] = round(time.perf_counter() - start, 1)
            record["million"] = measure(env, "read", "million")
    record["targets"] = TARGETS
    figures = {"submit_rows_per_s": record["submit_webdataset"]["rows_per_s"],
               "submit_peak_rss_mb": record["submit_webdataset"]["peak_rss_mb"],
               "export_rows_per_s": record.get("export_webdataset", {}).get("rows_per_s"),
               "status_s": record["million"]["status_s"], "manifest_rows_per_s": record["million"]["manifest_rows_per_s"]}
    record["missed"] = {k: v for k, v in figures.items() if v is not None
                        and (v > TARGETS[k] if k in ("submit_peak_rss_mb", "status_s") else v < TARGETS[k])}
    record["machine"] = f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
    out = args.out or ROOT / "bench" / "results" / f"shards_{args.rows}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
