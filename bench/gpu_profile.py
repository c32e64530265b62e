"""Where the segment stage's GPU time goes, and the UNet's rate, alone and beside a running UNet.

On a GPU host, each part in its own process (so a part runs with or without CUDA MPS, and the
orchestrating process holds no CUDA context):

- ``probe``: Grounding DINO and SAM ViT-H (full-size random weights, bf16) on 4 images of 640x480: the
  CPU preprocessing, the forward alone, the whole call; kernels launched, GPU time inside them and host
  synchronisations per forward; the same forward replayed from a CUDA graph where it can be captured;
- ``unet``: SD2 inpainting (compiled UNet) in a loop of 16-image calls, 50 steps, printing the UNet's
  rate in each denoising loop; ``--channels-last`` for that variant (its output on fixed seeds is saved
  to compare with the default's);
- the orchestrator runs the probe alone, then beside a UNet loop (GPU time-slicing between processes),
  then, where ``nvidia-cuda-mps-control`` exists, beside a UNet loop under MPS; and times the UNet alone.

    python bench/gpu_profile.py --out /tmp/profile.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amodal.errors import UsageError  # noqa: E402
from workers.mps import MpsDaemon  # noqa: E402

UNET_TFLOP_PER_SAMPLE_STEP = 0.80  # SD2 UNet, one 512 px sample (bench/gpu_throughput.py)


def _images(count: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        image[120:360, :150] = (200, 40, 40)
        out.append(image)
    return out


def median_seconds(fn, repeats: int = 5) -> tuple[float, object]:
    """Median seconds of ``fn()`` (the GPU, where there is one, synchronised before and after), and its
    last result."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times, result = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def _kernels(fn) -> dict:
    """Kernels launched by one ``fn()``, the GPU time inside them, and the host synchronisations it made."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    torch.cuda.set_sync_debug_mode("default")
    return {"kernels": len(events), "kernel_seconds": sum(e.time_range.elapsed_us() for e in events) / 1e6,
            "host_syncs": sum("synchroniz" in str(w.message) for w in caught)}


def _graphed(fn, static_inputs: dict):
    """``fn(**static_inputs)`` captured in a CUDA graph: a replay function, or the capture's error."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(**static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn(**static_inputs)
    except Exception as err:  # noqa: BLE001 - the profile reports why a model cannot be captured
        return f"{type(err).__name__}: {str(err)[:300]}"

    def replay():
        graph.replay()
        return out

    return replay


def probe(models_dir: Path) -> dict:
    """Grounding DINO's and SAM's pieces on 4 images."""
    import torch
    from PIL import Image

    from amodal.models.registry import ModelSet
    from amodal.settings import Settings

    models = ModelSet(models_dir, Settings())
    det, seg = models.detector, models.segmenter
    images = _images(4)
    out: dict = {"transformers_processor": type(det.processor.image_processor).__name__}
    with torch.inference_mode():
        for name, labels in (("gdino_1_label", ["red ball"]),
                             ("gdino_40_labels", [f"thing{i} object" for i in range(39)] + ["red ball"])):
            det.detect(images, [labels] * 4)
            prompts = det.prompts(labels)
            part: dict = {"prompts_per_image": len(prompts)}
            part["detect_s"], _ = median_seconds(lambda: det.detect(images, [labels] * 4))
            part["preprocess_s"], pixels = median_seconds(lambda: [dict(det.processor.image_processor(
                Image.fromarray(im), return_tensors="pt")) for im in images])
            text = det.processor.tokenizer([". ".join(prompts[0]) + "."] * 4, padding=True, truncation=True,
                                           max_length=det.max_text_len, return_tensors="pt").to(det.device)
            inputs = {k: torch.cat([p[k] for p in pixels]).to(det.device) for k in pixels[0]}
            inputs["pixel_values"] = inputs["pixel_values"].to(det.dtype)
            inputs.update(text)
            part["pixel_shape"] = list(inputs["pixel_values"].shape)
            part["text_tokens"] = int(text["input_ids"].shape[1])
            part["forward_s"], _ = median_seconds(lambda: det.model(**inputs))
            part.update(_kernels(lambda: det.model(**inputs)))
            replay = _graphed(det.model, inputs)
            if isinstance(replay, str):
                part["graph_error"] = replay
            else:
                part["graph_replay_s"], _ = median_seconds(replay)
            out[name] = part
            torch.cuda.empty_cache()
        boxes = [[(0.0, 100.0, 160.0, 380.0), (200.0, 50.0, 400.0, 300.0), (300.0, 200.0, 600.0, 470.0)]] * 4
        part = {}
        seg.segment(images, boxes)
        part["segment_s"], _ = median_seconds(lambda: seg.segment(images, boxes))
        part["encode_s"], embeddings = median_seconds(lambda: seg.encode(images))
        part["decode_s"], _ = median_seconds(lambda: [seg.decode(e, b) for e, b in zip(embeddings, boxes)])
        part["decode_kernels"] = _kernels(lambda: [seg.decode(e, b) for e, b in zip(embeddings, boxes)])
        batch = torch.randn(4, 3, 1024, 1024, device=seg.device, dtype=seg.dtype)
        part["encoder_forward_s"], _ = median_seconds(lambda: seg.model.image_encoder(batch))
        part["encoder_kernels"] = _kernels(lambda: seg.model.image_encoder(batch))
        replay = _graphed(lambda x: seg.model.image_encoder(x), {"x": batch})
        if isinstance(replay, str):
            part["encoder_graph_error"] = replay
        else:
            part["encoder_graph_replay_s"], _ = median_seconds(replay)
        out["sam_vit_h"] = part
    return out


def unet_loop(models_dir: Path, channels_last: bool, save: Path | None, seconds: float) -> None:
    """Inpaint 16-image batches for ``seconds`` (or until killed); one JSON line per call."""
    import numpy as np
    import torch

    from amodal.models.base import InpaintRequest
    from amodal.models.registry import ModelSet
    from amodal.settings import Settings

    inpainter = ModelSet(models_dir, Settings()).inpainter
    if channels_last:
        inpainter.pipeline.unet.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(1)
    mask = np.zeros((512, 512), bool)
    mask[100:400, 200:450] = True
    requests = [InpaintRequest(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), mask, "a ball", seed=i)
                for i in range(16)]
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    end = time.time() + seconds
    first = True
    while time.time() < end:
        start = time.perf_counter()
        images = inpainter.inpaint(requests)
        print(json.dumps({"wall_s": time.perf_counter() - start, "at": time.time()}), flush=True)
        if first and save:
            np.save(save, np.stack(images))
            first = False


def _unet_rates(log: str) -> list[float]:
    """TFLOP/s of each logged denoising loop."""
    import re

    rates = []
    for found in re.finditer(r"denoised (\d+) image\(s\) at \d+x\d+: (\d+) steps in ([\d.]+) s", log):
        n, steps, seconds = int(found.group(1)), int(found.group(2)), float(found.group(3))
        rates.append(n * 2 * steps * UNET_TFLOP_PER_SAMPLE_STEP / seconds)
    return rates


class Orchestrator:
    def __init__(self, models: Path, work: Path, out: Path) -> None:
        self.models, self.work, self.out = models, work, out
        self.record: dict = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def save(self) -> None:
        self.out.write_text(json.dumps(self.record, indent=2))

    def child(self, *args: str, log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, *args, "--models", str(self.models)], env=self.env,
                                stdout=open(self.work / log, "w"), stderr=subprocess.STDOUT)

    def run_probe(self, name: str) -> None:
        proc = self.child("--part", "probe", log=f"{name}.log")
        proc.wait()
        text = (self.work / f"{name}.log").read_text()
        lines = [line for line in text.splitlines() if line.startswith("{")]
        self.record[name] = json.loads(lines[-1]) if lines else {"error": text[-2000:]}
        self.save()
        print(name, json.dumps(self.record[name]), flush=True)

    def start_unet(self, name: str, *flags: str) -> subprocess.Popen:
        proc = self.child("--part", "unet", *flags, log=f"{name}.log")
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:  # compiled and past its first call
            if len(_unet_rates((self.work / f"{name}.log").read_text())) >= 2:
                break
            time.sleep(1)
        return proc

    def stop_unet(self, name: str, proc: subprocess.Popen, since: int = 2) -> None:
        proc.terminate()
        proc.wait()
        rates = _unet_rates((self.work / f"{name}.log").read_text())
        self.record[name] = {"tflops_per_call": rates, "tflops_median_after_warmup":
                             sorted(rates[since:])[len(rates[since:]) // 2] if rates[since:] else None}
        self.save()
        print(name, json.dumps(self.record[name]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "probe", "unet"), default="all")
    ap.add_argument("--models", default="/tmp/models")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--save")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--out", default="/tmp/gpu_profile.json")
    args = ap.parse_args()
    models = Path(args.models)
    if args.part == "probe":
        print(json.dumps(probe(models)), flush=True)
        return
    if args.part == "unet":
        unet_loop(models, args.channels_last, Path(args.save) if args.save else None, args.seconds)
        return
    work = Path("/tmp/gpu_profile")
    work.mkdir(parents=True, exist_ok=True)
    run = Orchestrator(models, work, Path(args.out))
    if not (models / "sam").exists():
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); from bench.fullsize import "
                        "write_full_size_models as w; w(%r)" % (str(ROOT), str(models))], check=True)
    run.run_probe("probe_alone")
    unet = run.start_unet("unet_default", "--save", str(work / "default.npy"))
    time.sleep(12)
    run.record["unet_default_alone"] = _unet_rates((work / "unet_default.log").read_text())
    run.run_probe("probe_beside_unet")
    run.stop_unet("unet_default", unet)
    unet = run.start_unet("unet_channels_last", "--channels-last", "--save", str(work / "channels_last.npy"))
    time.sleep(8)
    run.stop_unet("unet_channels_last", unet)
    import numpy as np

    a, b = np.load(work / "default.npy").astype(int), np.load(work / "channels_last.npy").astype(int)
    run.record["channels_last_vs_default_uint8"] = {"max_abs": int(abs(a - b).max()),
                                                    "mean_abs": float(abs(a - b).mean())}
    try:
        mps = MpsDaemon(work / "mps_pipe", work / "mps_log")
    except UsageError:
        mps = None
    run.record["mps_control"] = mps.control if mps else None
    if mps:
        mps.start()
        run.env.update(mps.env)
        try:
            unet = run.start_unet("unet_default_mps")
            time.sleep(8)
            run.run_probe("probe_beside_unet_mps")
            run.stop_unet("unet_default_mps", unet, since=1)
        finally:
            mps.stop()
            run.record["mps_log_tail"] = mps.log_tail(800)
    run.save()
    print(json.dumps(run.record, indent=2))


if __name__ == "__main__":
    main()
