"""Where one SD2 inpainting call's time goes, with the VAE eager and compiled.

Full-size random weights in bf16 (bench/fullsize.py), 16 requests of 512x512 with their own seeds, 50 steps,
the UNet compiled, as an inpaint worker runs them. Each variant runs in a process of its own (compiled
graphs and attention settings are per process): a few calls to compile and warm up, then timed calls,
each split on the device into the text encoder, the VAE's encoding, the denoising loop (UNet and
scheduler, from the VAE's encoding to its decoding) and the VAE's decoding; the rest of a call's wall
time is host work. Each variant's output of its first call is compared with the first variant's.

    python bench/inpaint_call.py --out bench/results/inpaint_call.json
    python bench/inpaint_call.py --tiny --out /tmp/inpaint_call.json   # tiny models on the CPU

Variants: ``eager_vae``, and ``compiled_vae`` (``compile_vae``, as the settings run it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNET_TFLOP_PER_SAMPLE_STEP = 0.80  # SD2 UNet, one 512 px sample (bench/gpu_throughput.py)
VARIANTS = {"eager_vae": {"compile_vae": False}, "compiled_vae": {"compile_vae": True}}


class PhaseClock:
    """Device time of the pipeline's phases in one call: events recorded around the text encoder and the
    VAE's ``encode`` and ``decode`` (wrapped on the instance), without synchronising."""

    def __init__(self, pipeline, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: dict[str, list] = {}
        pipeline.encode_prompt = self._wrap("text", pipeline.encode_prompt)
        pipeline.vae.encode = self._wrap("vae_encode", pipeline.vae.encode)
        pipeline.vae.decode = self._wrap("vae_decode", pipeline.vae.decode)

    def _mark(self):
        import torch

        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _wrap(self, phase: str, method):
        def timed(*args, **kwargs):
            start = self._mark()
            out = method(*args, **kwargs)
            self.marks.setdefault(phase, []).append((start, self._mark()))
            return out

        return timed

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def phases(self) -> dict[str, float]:
        """Seconds of each phase of the call just made (the device is done: its output is on the host)."""
        out = {phase: sum(self._seconds(a, b) for a, b in spans) for phase, spans in self.marks.items()}
        out["loop"] = self._seconds(self.marks["vae_encode"][-1][1], self.marks["vae_decode"][0][0])
        self.marks = {}
        return out


def run_variant(models: Path, options: dict, calls: int, warmup: int, save: Path, tiny: bool) -> dict:
    """Time ``calls`` calls after ``warmup`` of the inpainter built with ``options`` (its UNet compiled on a GPU);
    its first output saved."""
    import numpy as np
    import torch

    from amodal.models.base import InpaintRequest
    from amodal.models.registry import SD_INPAINT_DIR
    from amodal.models.sd_inpaint import StableDiffusionInpainter

    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    steps = 2 if tiny else 50
    inpainter = StableDiffusionInpainter.from_pretrained(
        models / SD_INPAINT_DIR, device=device, dtype=torch.bfloat16 if cuda else torch.float32,
        num_inference_steps=steps, guidance_scale=7.5, compile_unet=cuda, **options)
    clock = PhaseClock(inpainter.pipeline, cuda)
    rng = np.random.default_rng(1)
    size = 64 if tiny else 512
    mask = np.zeros((size, size), bool)
    mask[size // 5:size * 4 // 5, size * 2 // 5:size * 9 // 10] = True
    requests = [InpaintRequest(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), mask, "a ball", seed=i)
                for i in range(2 if tiny else 16)]
    timed = []
    for i in range(warmup + calls):
        start = time.perf_counter()
        images = inpainter.inpaint(requests)
        wall = time.perf_counter() - start
        phases = clock.phases()
        if i == 0:
            np.save(save, np.stack(images))
        if i >= warmup:
            timed.append({"wall_s": wall, **phases})
    median = {key: sorted(t[key] for t in timed)[len(timed) // 2] for key in timed[0]}
    median["host"] = median["wall_s"] - sum(median[k] for k in ("text", "vae_encode", "loop", "vae_decode"))
    forwards = len(requests) * 2 * (steps + 1)  # PNDM's steps + 1 forwards, doubled by guidance
    return {"options": options, "requests": len(requests), "steps": steps, "calls": timed, "median_s": median,
            "unet_tflops_in_loop": forwards * UNET_TFLOP_PER_SAMPLE_STEP / median["loop"] if cuda else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calls", type=int, default=3, help="timed calls of each variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (compiling)")
    ap.add_argument("--models", help="model folder (SD2 inpainting written there if absent)")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a child process
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "inpaint_call.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amodal-inpaint-call-"))
    models = Path(args.models) if args.models else work / "models"
    if args.variant:
        print(json.dumps(run_variant(models, VARIANTS[args.variant], args.calls, args.warmup, Path(args.save),
                                     args.tiny)))
        return

    import numpy as np
    import torch

    from amodal.models.registry import SD_INPAINT_DIR

    if not (models / SD_INPAINT_DIR / "unet").exists():
        if args.tiny:
            from amodal.models.sd_inpaint import write_tiny

            write_tiny(models / SD_INPAINT_DIR)
        else:
            from bench.fullsize import write_full_size_inpainter

            torch.manual_seed(0)
            with torch.device("cuda"):
                write_full_size_inpainter(models / SD_INPAINT_DIR)
    record: dict = {"device": "cpu" if args.tiny else torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "models": "tiny random" if args.tiny else "full-size random (published configs), bf16",
                    "command": "python bench/inpaint_call.py " + " ".join(sys.argv[1:]), "variants": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    for name in names:
        save = work / f"{name}.npy"
        command = [sys.executable, __file__, "--variant", name, "--save", str(save), "--models", str(models),
                   "--calls", str(args.calls), "--warmup", str(args.warmup), *(["--tiny"] if args.tiny else [])]
        res = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode or not lines:
            record["variants"][name] = {"error": (res.stderr or res.stdout)[-2000:]}
        else:
            record["variants"][name] = json.loads(lines[-1])
            if name != names[0] and (work / f"{names[0]}.npy").exists():
                a, b = np.load(work / f"{names[0]}.npy").astype(int), np.load(save).astype(int)
                record["variants"][name][f"vs_{names[0]}_uint8"] = {
                    "max_abs": int(abs(a - b).max()), "mean_abs": float(abs(a - b).mean()),
                    "pixels_differing": float((a != b).any(-1).mean())}
        out.write_text(json.dumps(record, indent=2))
        print(name, json.dumps({k: v for k, v in record["variants"][name].items() if k != "calls"}), flush=True)


if __name__ == "__main__":
    main()
