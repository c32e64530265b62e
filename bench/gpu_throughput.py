"""Images per hour through the real distributed path vs. the reference implementation's way, in one run.

On a GPU host: writes full-size random-weight models of every stage in the published formats (the
arithmetic is the real one; LISA-13B included), starts one real worker process per stage on GPU 0
(finalize on the CPU) and the dispatcher, and submits two datasets of N synthetic images each with the
number of inpainting passes fixed (``fixed_passes``), timing each to its last outcome:

- ``default``: the paper's default stack: no masks given, so LISA-13B grounds each query (batched across
  jobs), then RAM++, Grounding DINO, SAM, InstaOrder and SD2 inpainting;
- ``masks_given``: the visible masks come with the jobs, so grounding only reads them.

In the same run, the reference-structured baseline on each: one process, one image at a time (LISA at
batch 1), SAM rebuilt from its checkpoint file on every call, SAM and G-DINO in fp32, diffusion with
attention slicing at batch 1; its resident models are loaded before it is timed. One JSON record under
``bench/results/``.

Benchmark-only decoding: LISA's random weights would not say ``[SEG]``, so every LISA answer is made
32 tokens long with ``[SEG]`` before its end (``bench/lisa_answer.py``: the tests' scripted decoding
replaces the logits LLaMA's output layer has computed, so each of the 32 decoding steps runs in full).
Its masks come from the random SAM decoder, so some grounded jobs may end early (``no_target``,
``unoccluded``) and the others' scenes differ from the masks-given ones: the record gives the outcomes
and the images per hour of completed jobs too. Each model call in the workers is timed
(``bench/model_clock.py``): per stage, model seconds against the step's seconds.

The broker is a Redis server started here from ``--redis-server`` (a binary carried to the host),
else kombu's filesystem transport (slow: it polls); storage is a local folder. ``--mps`` runs the workers as
clients of a CUDA MPS daemon, as ``amodal launch --mps`` does. ``--tiny`` runs the
same path with tiny models on the CPU, to check the script.

    python bench/gpu_throughput.py --images 80 --baseline-images 1 --mps --redis-server PATH
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amodal.images import encode_png  # noqa: E402
from amodal.settings import Settings  # noqa: E402
from amodal.config import Environment  # noqa: E402
from amodal.stages import BATCHED_STAGES  # noqa: E402
from workers.launch import WorkerGroup  # noqa: E402
from workers.mps import MpsDaemon  # noqa: E402
from workers.placement import plan  # noqa: E402
from bench import lisa_answer, model_clock, site_hooks  # noqa: E402

UNET_TFLOP_PER_FORWARD = 0.80  # SD2 UNet, one 512 px sample (64x64 latent)
STAGES = ("ground", "segment", "occlusion", "inpaint", "finalize")


def synthetic_images(folder: Path, count: int, size=(480, 640), masks: bool = True, name: str = "rows") -> Path:
    """``count`` noisy scenes, each with a target disc cut by the left border and half hidden; with its
    visible mask given, or to be grounded from the query."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    rows = []
    for i in range(count):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        cy, r = h // 2 + int(rng.integers(-40, 40)), 120
        disc = (xx - 30) ** 2 + (yy - cy) ** 2 < r**2
        box = (xx > 90) & (xx < 200) & (abs(yy - cy) < 160)
        image[disc] = (200, 40, 40)
        image[box] = (40, 60, 200)
        (folder / f"img{i:04d}.png").write_bytes(encode_png(image))
        row = {"image": f"img{i:04d}.png", "query": "red ball"}
        if masks:
            (folder / f"img{i:04d}_mask.png").write_bytes(encode_png(disc & ~box))
            row["visible_mask"] = f"img{i:04d}_mask.png"
        rows.append(row)
    annotations = folder / f"{name}.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return annotations


class GpuMemory:
    """Peak memory used on the card (all processes) and by each process, polled with nvidia-smi."""

    def __init__(self, interval: float = 0.5) -> None:
        self.peak_mib = 0
        self.process_peak_mib: dict[int, int] = {}  # pid -> peak
        self.parents: dict[int, int] = {}  # pid -> parent pid (a worker's pool processes are its children)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)

    def _poll(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, int(out.split()[0]))
                apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            for line in apps.splitlines():
                pid, used = (int(x) for x in line.split(","))
                self.process_peak_mib[pid] = max(self.process_peak_mib.get(pid, 0), used)
                if pid not in self.parents:
                    try:
                        self.parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, ValueError, IndexError):
                        self.parents[pid] = 0
            self._stop.wait(interval)

    def per_worker_gib(self, workers: dict[str, int]) -> dict[str, float]:
        """Peak GiB of each worker's pool processes (each pool process separately), by worker name."""
        names = {pid: name for name, pid in workers.items()}
        out: dict[str, float] = {}
        for pid, peak in sorted(self.process_peak_mib.items()):
            name = names.get(self.parents.get(pid, 0), names.get(pid, str(pid)))
            key = name if name not in out else f"{name}#{sum(k.startswith(name) for k in out)}"
            out[key] = peak / 1024
        return out

    def __enter__(self) -> "GpuMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_redis(binary: str, port: int = 6390) -> subprocess.Popen:
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc


def ensure_console_script() -> None:
    """The workers start the ``amodal`` console script beside this interpreter (``workers.launch``); on a
    host where the project is not installed, write one that runs this tree's command (``PYTHONPATH``
    below puts the tree first)."""
    from workers.launch import AMODAL

    script = Path(AMODAL[0])
    if not script.exists():
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom amodal.cli import main\nsys.exit(main())\n")
        script.chmod(0o755)


def run_distributed(work: Path, models: Path, datasets: dict[str, tuple[Path, Path, int]], settings: Settings,
                    batch: int, segment_batch: int, ground_batch: int, broker_url: str, gpus: int = 1,
                    replicas: int = 1, concurrency: dict[str, int] | None = None,
                    mps: MpsDaemon | None = None, keep_logs: Path | None = None) -> dict[str, dict]:
    """Start the workers and the dispatcher once (the GPU workers as clients of ``mps``, a started daemon,
    when given), then time each dataset (name -> images folder, annotations, count) through them in turn;
    the workers' logs are copied to ``keep_logs`` once they stop."""
    broker, store = work / "broker", work / "store"
    for folder in (broker, broker / "control", store):
        folder.mkdir(parents=True, exist_ok=True)
    site = site_hooks.sitecustomize(work / "site")
    env = dict(os.environ, AMODAL_BROKER_URL=broker_url, AMODAL_BROKER_FOLDER=str(broker),
               AMODAL_STORAGE_URL=f"file://{store}", AMODAL_MODEL_DIR=str(models),
               AMODAL_SETTINGS=json.dumps(settings.to_dict()), AMODAL_INPAINT_BATCH=str(batch),
               AMODAL_INPAINT_FLUSH="2.0", AMODAL_SEGMENT_BATCH=str(segment_batch),
               AMODAL_GROUND_BATCH=str(ground_batch), AMODAL_DISPATCH_INTERVAL="0.5", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")])),
               **(mps.env if mps else {}))
    os.environ.update({k: env[k] for k in ("AMODAL_BROKER_URL", "AMODAL_BROKER_FOLDER", "AMODAL_STORAGE_URL")})
    ensure_console_script()
    group = WorkerGroup(env, work / "logs")
    slots = [slot for slot in plan(gpus) for _ in range(replicas if slot.gpu is not None else 1)]
    for slot in slots:
        group.start(slot, concurrency=(concurrency or {}).get(slot.stage))
    group.start_dispatcher()
    start = time.perf_counter()
    records: dict[str, dict] = {}
    try:
        group.wait_ready(timeout=900)
        warm = time.perf_counter() - start
        for name, (images, annotations, count) in datasets.items():
            records[name] = time_dataset(group, settings, name, images, annotations, count)
            records[name]["warmup_seconds"] = warm
            records[name]["workers"] = [f"{s.stage}@{'cpu' if s.gpu is None else f'gpu{s.gpu}'}" for s in slots]
            records[name]["processes_per_worker"] = {k: v for k, v in group.pools.items()}
            print(json.dumps({name: records[name]}, indent=2), flush=True)
    finally:
        group.stop()
        if keep_logs:
            shutil.copytree(work / "logs", keep_logs, dirs_exist_ok=True)
    return records


def time_dataset(group: WorkerGroup, settings: Settings, dataset: str, images: Path, annotations: Path,
                 count: int) -> dict:
    """Submit one dataset to running workers and time it to its last outcome; what the workers logged meanwhile."""
    from amodal.jobstore import latest_state
    from producer import Client

    client = Client(storage_url=os.environ["AMODAL_STORAGE_URL"], settings=settings)
    with GpuMemory() as memory:
        t0, started = time.perf_counter(), time.time()
        client.submit_dataset(images, annotations, dataset, progress=False)
        progress = [(0.0, 0)]  # (seconds since submitting, outcomes known)
        while pending := client.status(dataset)["pending"]:
            progress.append((time.perf_counter() - t0, count - pending))
            time.sleep(0.5)
        wall, finished = time.perf_counter() - t0, time.time()
        progress.append((wall, count))
    lines = list(client.manifest(dataset))
    logs = [group.log(name) for name in group.procs]
    calls = {stage: [n for log in logs for when, n in step_calls(log, stage) if started < when <= finished]
             for stage in BATCHED_STAGES}
    loops = [loop for log in logs for loop in denoising_loops(log) if started < loop[0] <= finished]
    clock = {name: model_calls(group.log(name), started, finished) for name in group.procs}
    states = [latest_state(client.store, line["job_id"]) for line in lines]
    statuses: dict[str, int] = {}
    for state in states:
        statuses[state.status] = statuses.get(state.status, 0) + 1
    busy = {s: sum(state.timings.get(s, 0.0) for state in states) for s in STAGES}
    tags = [len(state.tags) for state in states]
    return {"images": count, "wall_seconds": wall, "images_per_hour": 3600 * count / wall,
            "first_outcome_seconds": first_outcome_seconds(progress),
            "completed_per_hour": 3600 * statuses.get("completed", 0) / wall,
            "statuses": statuses, "passes": sorted({state.passes for state in states}),
            "stage_seconds_per_image": {s: busy[s] / count for s in STAGES},
            "stage_busy_fraction": {s: busy[s] / wall for s in STAGES},
            "tags_per_image": {"mean": float(np.mean(tags)), "max": int(max(tags))} if tags else None,
            "peak_gpu_memory_gib": memory.peak_mib / 1024,
            "peak_gpu_memory_gib_per_process": memory.per_worker_gib({n: p.pid for n, p in group.procs.items()}),
            "jobs_per_call": {s: {"calls": len(n), "mean": sum(n) / len(n) if n else 0.0} for s, n in calls.items()},
            "model_calls": {name: calls for name, calls in clock.items() if calls},
            "model_seconds_per_image": {s: sum(c["seconds"] for name, calls in clock.items() if name.startswith(s)
                                               for c in calls.values()) / count for s in STAGES},
            "denoising": {"calls": len(loops), "forwards_per_pass": max((s + 1 for _, _, s, _ in loops), default=0),
                          "timed_sample_steps": sum(n * s for _, n, s, _ in loops),
                          "timed_seconds": sum(x for *_, x in loops),
                          "seconds_any_running": busy_union([(end - x, end) for end, _, _, x in loops])}}


def first_outcome_seconds(progress: list[tuple[float, int]]) -> float:
    """Seconds from submitting to the first sample with an outcome known. The stages take each job's passes
    in step with the others', so a short run's outcomes all come in its last part: a rate read between them
    is not the pipeline's."""
    return next(t for t, done in progress if done > 0)


def _stamp(line: str) -> float | None:
    found = re.match(r"\[?(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+)", line)
    return datetime.strptime(found.group(1).replace("T", " ").replace(".", ","), "%Y-%m-%d %H:%M:%S,%f").timestamp() \
        if found else None


def model_calls(log: str, start: float, end: float) -> dict[str, dict]:
    """Calls and seconds of each clocked model method (bench/model_clock.py) logged between two times."""
    out: dict[str, dict] = {}
    for line in log.splitlines():
        found = model_clock.LINE.search(line)
        when = _stamp(line) if found else None
        if when is not None and start < when <= end:
            entry = out.setdefault(found.group(1), {"calls": 0, "seconds": 0.0})
            entry["calls"] += 1
            entry["seconds"] += float(found.group(2))
    return out


def step_calls(log: str, stage: str) -> list[tuple[float, int]]:
    """(time, jobs) of each "<stage> step of N job(s)" line (tasks.batching)."""
    calls = []
    for line in log.splitlines():
        if f"{stage} step of " in line and (when := _stamp(line)) is not None:
            calls.append((when, int(line.split(f"{stage} step of ", 1)[1].split()[0])))
    return calls


def denoising_loops(log: str) -> list[tuple[float, int, int, float]]:
    """(end, images, timed steps, seconds) of each "denoised N image(s) at HxW: S steps in X s" line
    (amodal.models.sd_inpaint); the end is the line's time, just after the call returned."""
    loops = []
    for line in log.splitlines():
        found = re.match(r"(\S+ \S+) .*denoised (\d+) image\(s\) at \d+x\d+: (\d+) steps in ([\d.]+) s", line)
        if found:
            stamp, n, steps, seconds = found.groups()
            end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            loops.append((end, int(n), int(steps), float(seconds)))
    return loops


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one interval."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def run_baseline(work: Path, models: Path, datasets: dict[str, tuple[Path, Path, int]], settings: Settings,
                 count: int) -> dict[str, dict]:
    """The reference implementation's way: one process, one image at a time, nothing batched; the first
    ``count`` rows of each dataset."""
    import torch

    from amodal.models.registry import SAM_FILES, GROUNDING_DINO_DIR, ModelSet
    from amodal.models.sam import SamSegmenter
    from amodal.runner import run_local

    class ReferenceModels(ModelSet):
        @property
        def segmenter(self):  # rebuilt from the checkpoint file on every call, fp32
            return SamSegmenter.from_checkpoint(self.path(SAM_FILES["vit_h"]), device=self.device, dtype=torch.float32)

        @property
        def detector(self):
            from amodal.models.grounding_dino import GroundingDino

            if not hasattr(self, "_detector"):
                self._detector = GroundingDino.from_pretrained(
                    self.path(GROUNDING_DINO_DIR), device=self.device, dtype=torch.float32,
                    box_threshold=self.settings.box_threshold, text_threshold=self.settings.text_threshold,
                    max_detections=self.settings.max_instances)
            return self._detector

    lisa_answer.install()
    models_set = ReferenceModels(models, settings.replace(compile_unet=False, compile_vae=False, compile_sam=False))
    torch.set_num_threads(os.cpu_count() or 1)  # the reference runs alone: every core for its CPU work
    models_set.inpainter.pipeline.enable_attention_slicing()
    for resident in ("grounder", "tagger", "detector", "prompt_chooser", "clip", "occlusion"):  # loaded, as the
        getattr(models_set, resident)  # reference keeps them; SAM is read from its file at every call
    records = {}
    for name, (images, rows_file, _) in datasets.items():
        rows = [json.loads(x) for x in rows_file.read_text().splitlines()[:count]]
        subset = work / f"baseline_{name}.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        t0 = time.perf_counter()
        outcomes = run_local(images, subset, work / f"baseline_{name}", models_set, settings, progress=False)
        wall = time.perf_counter() - t0
        records[name] = {"images": len(rows), "wall_seconds": wall, "images_per_hour": 3600 * len(rows) / wall,
                         "statuses": [o.status for o in outcomes]}
        print(json.dumps({f"baseline_{name}": records[name]}), flush=True)
    return records


def unet_rates(record: dict, passes: int, steps: int) -> dict:
    """The UNet's arithmetic rate over the inpaint processes' busy time and over its denoising loops."""
    loops = record["denoising"]
    # PNDM runs steps + 1 UNet forwards per pass; classifier-free guidance doubles the samples
    unet_tflop = passes * (loops["forwards_per_pass"] or steps + 1) * 2 * UNET_TFLOP_PER_FORWARD
    # the inpaint processes' busy times overlap on the GPU: per image, busy seconds / processes
    processes = max([n for w, n in record["processes_per_worker"].items() if w.startswith("inpaint")] or [1])
    inpaint_s = record["stage_seconds_per_image"]["inpaint"] / processes
    return {"unet_tflops_over_inpaint_busy_time": unet_tflop / inpaint_s if inpaint_s else None,
            # the UNet's arithmetic over the time at least one worker process was in its denoising loop
            "unet_tflops_in_denoising_loops": (loops["timed_sample_steps"] * 2 * UNET_TFLOP_PER_FORWARD
                                               / loops["seconds_any_running"]) if loops["seconds_any_running"] else None,
            "arithmetic_floor_images_per_hour_at_280_tflops": 3600 * 280 / unet_tflop}


def run_stacks(args: argparse.Namespace, work: Path, models: Path, datasets: dict, settings: Settings,
               record: dict) -> dict[str, dict]:
    """Each dataset's figures through the workers, with the broker and the MPS daemon ``args`` ask for."""
    redis = start_redis(args.redis_server) if args.redis_server else None
    mps = MpsDaemon(work / "mps" / "pipe", work / "mps" / "log") if args.mps else None
    record["mps"] = bool(mps)
    try:
        if mps:
            mps.start()
        return run_distributed(work, models, datasets, settings, args.batch, args.segment_batch, args.ground_batch,
                               "redis://127.0.0.1:6390/0" if redis else "filesystem://", args.gpus, args.replicas,
                               {k: int(v) for k, v in (c.split("=") for c in args.concurrency)}, mps,
                               Path(args.keep_logs) if args.keep_logs else None)
    finally:
        if mps:
            mps.stop()
            record["mps_log_tail"] = mps.log_tail(800)
        if redis:
            redis.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48, help="images of each dataset")
    ap.add_argument("--baseline-images", type=int, default=2, help="images of each dataset through the baseline")
    ap.add_argument("--batch", type=int, default=Environment.model_fields["inpaint_batch"].default,
                    help="inpaint batch size")
    ap.add_argument("--segment-batch", type=int, default=Environment.model_fields["segment_batch"].default,
                    help="segment batch size (1: one job per call)")
    ap.add_argument("--ground-batch", type=int, default=Environment.model_fields["ground_batch"].default,
                    help="ground batch size (1: one job per call)")
    ap.add_argument("--datasets", default="default,masks_given",
                    help="which datasets, in this order (the first is the record's main one)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script)")
    ap.add_argument("--models", help="model folder (written there if empty)")
    ap.add_argument("--redis-server", help="a redis-server binary to run the broker with")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs to place workers on (workers/placement.py)")
    ap.add_argument("--replicas", type=int, default=1, help="workers per planned GPU slot (sharing its GPU)")
    ap.add_argument("--concurrency", action="append", default=[], metavar="STAGE=N",
                    help="pool processes of one stage's workers (each holds its models; default: amodal worker's)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the UNet, the VAE and SAM's image encoder in the workers (the default "
                         "settings)")
    ap.add_argument("--mps", action="store_true",
                    help="the workers as clients of a CUDA MPS daemon (amodal launch --mps), started after the models "
                         "are written")
    ap.add_argument("--keep-logs", help="copy the workers' logs to this folder")
    ap.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=True,
                    help="run the stacks through the workers (--no-distributed: the baseline alone)")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the reference-structured baseline")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_throughput_lisa.json"))
    args = ap.parse_args()

    import torch

    from amodal.models.registry import LISA_DIR
    from amodal.models.tiny import write_tiny_models
    from bench.fullsize import write_full_size_lisa, write_full_size_models

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: no CUDA device (use --tiny to check the script on the CPU)")
    work = Path(tempfile.mkdtemp(prefix="amodal-bench-"))
    models = Path(args.models) if args.models else work / "models"
    t0 = time.perf_counter()
    if not (models / "sam").exists():
        if args.tiny:
            write_tiny_models(models, progress=False)
        else:
            write_full_size_models(models)
            write_full_size_lisa(models / LISA_DIR)
    write_seconds = time.perf_counter() - t0
    # the robust preset (bf16, no row skipped), as the throughput records were made
    settings = Settings.preset("robust").replace(
        fixed_passes=args.passes, max_passes=args.passes, num_inference_steps=args.steps, grounder="lisa",
        compile_unet=args.compile, compile_vae=args.compile, compile_sam=args.compile)
    datasets = {name: (work / name, synthetic_images(work / name, args.images, masks=name == "masks_given"),
                       args.images) for name in args.datasets.split(",")}
    record = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "models": "tiny random" if args.tiny else "full-size random (published configs)",
        "broker": "Redis (carried binary)" if args.redis_server else "kombu filesystem transport (local folder)",
        "storage": "local folder",
        "grounding": {"default": f"LISA-13B, bf16, ground batch {args.ground_batch}; answers of "
                                 f"{lisa_answer.ANSWER_TOKENS} tokens with [SEG] (bench/lisa_answer.py)",
                      "masks_given": "visible masks given with the jobs"},
        "settings": {"passes": args.passes, "steps": args.steps, "inpaint_batch": args.batch,
                     "segment_batch": args.segment_batch, "ground_batch": args.ground_batch, "image_size": "640x480",
                     "max_tags": settings.max_tags, "compile_unet": settings.compile_unet,
                     "compile_vae": settings.compile_vae, "compile_sam": settings.compile_sam,
                     "baseline": "same settings, one image at a time, LISA at batch 1, UNet, VAE and SAM not compiled, "
                                 "resident models loaded before timing"},
        "command": "python bench/gpu_throughput.py " + " ".join(sys.argv[1:]),
        "model_write_seconds": write_seconds,
    }
    ours = run_stacks(args, work, models, datasets, settings, record) if args.distributed else {}
    # the first dataset's figures under "ours", "baseline", "speedup" (what `amodal launch --costs` plans
    # from); each other's under the same keys suffixed with its name
    key = {name: "" if i == 0 else f"_{name}" for i, name in enumerate(datasets)}
    for name, figures in ours.items():
        figures.update(unet_rates(figures, args.passes, args.steps))
        record[f"ours{key[name]}"] = figures
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))  # the distributed figures, before the slow baseline
    if args.baseline:
        for name, base in run_baseline(work, models, datasets, settings, args.baseline_images).items():
            record[f"baseline{key[name]}"] = base
            if name in ours:
                record[f"speedup{key[name]}"] = ours[name]["images_per_hour"] / base["images_per_hour"]
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
