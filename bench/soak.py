"""Soak: many queued jobs with tiny models; throughput, peak RSS per worker, Redis keys before/after.

Worker memory is bounded because each worker holds one set of models and one task (prefetch 1;
the inpaint worker one batch), and job data lives in storage, never in the broker. Redis keys must
not grow with the number of jobs: results are not stored in Redis (``task_ignore_result``), and a
finished job leaves nothing there.

    python bench/soak.py --jobs 1000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amodal.settings import PRESETS  # noqa: E402
from bench.tinycluster import tiny_cluster, with_workers  # noqa: E402
from tests.synthetic import synthetic_dataset  # noqa: E402

SETTINGS = {**PRESETS["robust"], "num_inference_steps": 1, "max_passes": 1, "max_instances": 2}  # the robust preset: no row skipped


class RssPeaks:
    """Peak resident memory of each worker's process tree, sampled every second."""

    def __init__(self, group) -> None:
        self.group = group
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for name, proc in list(self.group.procs.items()):
                try:
                    root = psutil.Process(proc.pid)
                    rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)

    def __enter__(self) -> "RssPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = ap.parse_args()

    import redis

    broker = redis.Redis.from_url(args.redis)
    with tiny_cluster(args.redis, SETTINGS, "soak") as cluster:
        images, annotations = synthetic_dataset(cluster.work, args.jobs, given=args.jobs)
        from amodal.settings import Settings
        from producer import Client

        group = with_workers(cluster)
        keys_idle = broker.dbsize()
        client = Client(settings=Settings(**SETTINGS))  # the workers' settings, so they warm the right models
        with RssPeaks(group) as rss:
            t0 = time.perf_counter()
            client.submit_dataset(images, annotations, "soak", progress=False)
            keys_queued = broker.dbsize()
            while (counts := client.status("soak"))["pending"]:
                time.sleep(5)
            wall = time.perf_counter() - t0
            time.sleep(5)
            keys_after = broker.dbsize()
        sizes = [int(line.split("inpaint step of ", 1)[1].split()[0])
                 for line in group.log("inpaint-gpu0").splitlines() if "inpaint step of " in line]
    record = {
        "jobs": args.jobs, "settings": SETTINGS, "cores": os.cpu_count(), "wall_seconds": wall,
        "jobs_per_hour": 3600 * args.jobs / wall, "outcomes": counts,
        "peak_rss_mib_per_worker": {k: v / 2**20 for k, v in rss.peaks.items()},
        "redis_keys": {"workers_idle": keys_idle, "after_submit": keys_queued, "after_completion": keys_after},
        "diffusion_calls": len(sizes), "mean_jobs_per_diffusion_call": sum(sizes) / max(len(sizes), 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
