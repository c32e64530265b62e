"""Submission at scale: N rows against a real SeaweedFS (``weed server -s3``) and Redis on loopback, no workers.

Rows share images (``--queries`` queries per image). Measures the submission (rows/s, peak RSS of its
process, S3 requests per row), one dispatcher round (the messages it queues and their Redis memory),
``status`` and the manifest; then runs ``--finished`` jobs to their end as workers and the dispatcher do
(``job.json``, the last state, the dispatcher's scan) and measures ``status`` and the manifest again, and
``status`` once more with every row's outcome marker written. Writes ``bench/results/submit_<rows>.json``.

    python bench/submit.py --rows 100000
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.seaweed import seaweedfs  # noqa: E402

DATASET = "bench"
TARGETS = {"rows_per_s": 1000, "peak_rss_mb": 300, "redis_mb": 100, "status_s": 5, "manifest_rows_per_s": 5000}


def write_dataset(folder: Path, rows: int, queries: int) -> Path:
    """``rows // queries`` distinct small PNGs and a JSONL file of ``rows`` rows naming them."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    count = -(-rows // queries)
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buffer, "PNG")
        (images / f"{i:07d}.png").write_bytes(buffer.getvalue())
    annotations = folder / "rows.jsonl"
    with open(annotations, "w") as f:
        for r in range(rows):
            f.write(json.dumps({"image": f"{r // queries:07d}.png", "query": f"object {r % queries}"}) + "\n")
    return annotations


def child(images: str, annotations: str) -> None:
    """In the measured process: submit, counting every S3 request; print the figures as JSON."""
    from producer import Client

    client = Client()
    requests = {"n": 0}
    client.store.client.meta.events.register("before-call.s3", lambda **_: requests.__setitem__("n", requests["n"] + 1))
    start = time.perf_counter()
    report = client.submit_dataset(images, annotations, DATASET, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "s3_requests": requests["n"], "enqueued": report.enqueued,
                      "invalid": len(report.invalid)}))


def submit(env: dict, images: Path, annotations: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, __file__, "--child", str(images), str(annotations)], env=env, check=True,
                         capture_output=True, text=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: the largest waited-for child
    figures["peak_rss_mb"] = round(max(peak, before) / 1024, 1)
    return figures


# a finished job's job.json, as large as a completed job's of three passes
SAMPLE_RECORD = {
    "status": "completed", "message": "", "query": "object 0", "stop": "converged", "flags": [],
    "quality": {"visible_px": 41230, "amodal_px": 52311, "growth_ratio": 1.2688, "window_edge": False,
                "clip_similarity": 0.8123,
                "passes": [{"pass": i, "occluders": 2, "inpainted_px": 8123, "redetected": True, "iou_prev": 0.91,
                            "clip_similarity": 0.81} for i in range(3)]},
}


def finish(client, broker, count: int) -> tuple[float, int]:
    """Run the jobs in flight to their end as workers and the dispatcher do, after a dispatcher whose mark
    is ``count`` has started up to that many: each gets its ``job.json`` and its last state, ``done``, and
    one scan writes their outcome markers and record pages. Returns the scan's seconds and the jobs."""
    from amodal.config import Environment
    from amodal.jobstore import commit_state, load_state
    from producer.dispatch import Dispatcher

    dispatcher = Dispatcher(client.store, Environment(dispatch_high_water=count), broker)
    dispatcher.round()
    broker.delete(*broker.keys("ground*"))
    body = json.dumps(SAMPLE_RECORD, indent=2).encode()

    def one(job: str) -> None:
        state = load_state(client.store, job, 0)
        client.store.put(f"{state.result_prefix}/job.json", body)
        state.version, state.stage, state.status = 1, "done", "completed"
        commit_state(client.store, state)

    jobs = list(dispatcher.progress.flights)
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, jobs))
    seconds, _ = timed(dispatcher.scan)
    return seconds, len(jobs)


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def redis_bytes(client) -> int:
    """Memory of every key in the bench's database (MEMORY USAGE), not the whole server's."""
    return sum(client.memory_usage(key, samples=0) or 0 for key in client.scan_iter(count=1000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=5, help="queries per image")
    ap.add_argument("--finished", type=int, default=20_000, help="jobs given an outcome before status is timed again")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9", help="a database of the bench's own: flushed first")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    import redis

    broker = redis.Redis.from_url(args.redis)
    broker.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        annotations = write_dataset(folder, args.rows, args.queries)
        with seaweedfs(folder / "s3", buckets=["bench"]) as server:
            env = {**os.environ, **server.env, "AMODAL_BROKER_URL": args.redis, "AMODAL_STORAGE_URL": "s3://bench/data"}
            os.environ.update(env)
            # 1. the submission, in its own process
            sub = submit(env, folder / "images", annotations)
            from amodal.keys import outcome_key, records_prefix
            from producer import Client
            from producer.dispatch import Dispatcher

            client = Client()
            # 2. one dispatcher round: the first stage fed up to the high-water mark
            dispatcher = Dispatcher(client.store, redis_client=broker)
            round_s, _ = timed(dispatcher.round)
            queued = broker.llen("ground")
            redis_mb = redis_bytes(broker) / 2**20
            # 3. status and manifest
            status_s, counts = timed(lambda: client.status(DATASET))
            manifest_s, lines = timed(lambda: sum(1 for _ in client.manifest(DATASET)))
            # 4. the same submission again: nothing to record
            again = submit(env, folder / "images", annotations)
            # 5. status and manifest with finished jobs
            scan_s, finished = finish(client, broker, args.finished)
            finished_status_s, finished_counts = timed(lambda: client.status(DATASET))
            finished_manifest_s, finished_lines = timed(lambda: sum(1 for _ in client.manifest(DATASET)))
            client.store.delete_prefix(records_prefix(DATASET))  # each finished row reads its job.json
            unpaged_manifest_s, _ = timed(lambda: sum(1 for _ in client.manifest(DATASET)))
            # 6. status with every row finished: the outcome markers of the other jobs (all status lists)
            rest = [line["job_id"] for line in client.manifest(DATASET) if line["status"] == "pending"]
            with ThreadPoolExecutor(32) as pool:
                list(pool.map(lambda job: client.store.put(outcome_key(DATASET, "completed", job), b""), rest))
            all_status_s, all_counts = timed(lambda: client.status(DATASET))
    record = {
        "rows": args.rows, "images": -(-args.rows // args.queries), "queries_per_image": args.queries,
        "storage": "SeaweedFS (weed server -s3) on loopback", "broker": "Redis on loopback",
        "submit_s": round(sub["seconds"], 2), "rows_per_s": round(args.rows / sub["seconds"]),
        "peak_rss_mb": sub["peak_rss_mb"], "s3_requests": sub["s3_requests"],
        "storage_calls_per_row": round(sub["s3_requests"] / args.rows, 4),
        "dispatch_round_s": round(round_s, 2), "messages_queued": queued, "high_water": dispatcher.mark,
        "redis_mb": round(redis_mb, 2), "status_s": round(status_s, 3), "status": counts,
        "manifest_rows": lines, "manifest_rows_per_s": round(lines / manifest_s),
        "resubmit_s": round(again["seconds"], 2), "resubmit_s3_requests": again["s3_requests"],
        "finished": {"jobs": finished, "dispatcher_scan_s": round(scan_s, 2), "status_s": round(finished_status_s, 3),
                     "status": finished_counts, "manifest_rows_per_s": round(finished_lines / finished_manifest_s),
                     "manifest_rows_per_s_without_record_pages": round(finished_lines / unpaged_manifest_s)},
        "all_finished": {"status_s": round(all_status_s, 3), "completed": all_counts["completed"],
                         "pending": all_counts["pending"]},
        "targets": TARGETS, "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
    }
    record["missed"] = {k: record[k] for k, v in TARGETS.items()
                        if (record[k] > v if k in ("peak_rss_mb", "redis_mb", "status_s") else record[k] < v)}
    done = record["finished"]
    for name, seconds in (("finished", done["status_s"]), ("all_finished", record["all_finished"]["status_s"])):
        if seconds > TARGETS["status_s"]:
            record["missed"][f"{name}.status_s"] = seconds
    if done["manifest_rows_per_s"] < TARGETS["manifest_rows_per_s"]:
        record["missed"]["finished.manifest_rows_per_s"] = done["manifest_rows_per_s"]
    out = args.out or ROOT / "bench" / "results" / f"submit_{args.rows}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
