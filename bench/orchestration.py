"""Per-job orchestration overhead of the distributed path (broker + storage + stage hops), tiny models.

The same jobs run twice, one at a time: in one process (``run_job`` on a local folder) and through
Redis, an S3 server and the five stage workers. The difference of the per-job latencies is what the
distribution costs; divided by the job's stage hops, what one hop costs. Ratios from one run.

    python bench/orchestration.py --jobs 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amodal.settings import PRESETS  # noqa: E402
from bench.tinycluster import tiny_cluster, with_workers  # noqa: E402
from tests.synthetic import synthetic_dataset  # noqa: E402

SETTINGS = {**PRESETS["robust"], "num_inference_steps": 2, "fixed_passes": 1}  # the robust preset: no row skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "orchestration.json"))
    args = ap.parse_args()

    from amodal.annotations import read_annotations
    from amodal.jobstore import latest_state
    from amodal.models.registry import ModelSet
    from amodal.runner import LocalRunner
    from amodal.settings import Settings

    settings = Settings(**SETTINGS)
    with tiny_cluster(args.redis, SETTINGS, "orch") as cluster:
        images, annotations = synthetic_dataset(cluster.work, args.jobs, given=args.jobs)
        rows = read_annotations(annotations)

        # in one process
        runner = LocalRunner(images, cluster.work / "local", ModelSet(cluster.models, settings), settings)
        runner.run_row(rows[0], {})  # load and warm the models
        runner = LocalRunner(images, cluster.work / "local2", runner.ctx.models, settings)
        local = []
        for row in rows:
            t0 = time.perf_counter()
            runner.run_row(row, {})
            local.append(time.perf_counter() - t0)

        # through the queues, one job at a time
        from producer import Client

        with_workers(cluster)
        client = Client(settings=settings)
        distributed, hops = [], []
        for row in rows:
            t0 = time.perf_counter()
            job = client.submit(images / row.image, row.query, "orch", visible_mask=images / row.visible_mask)
            while latest_state(client.store, job).stage != "done":
                time.sleep(0.005)
            distributed.append(time.perf_counter() - t0)
            hops.append(latest_state(client.store, job).version)
    overhead = statistics.median(distributed) - statistics.median(local)
    record = {
        "jobs": args.jobs, "settings": SETTINGS, "broker": "Redis (local)", "storage": "S3 protocol (moto server)",
        "median_job_seconds_in_process": statistics.median(local),
        "median_job_seconds_distributed": statistics.median(distributed),
        "median_overhead_seconds_per_job": overhead,
        "stage_hops_per_job": statistics.median(hops),
        "overhead_seconds_per_hop": overhead / statistics.median(hops),
        "ratio_distributed_to_in_process": statistics.median(distributed) / statistics.median(local),
        "note": "status is polled every 5 ms; one job in flight at a time, so no batching helps",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
