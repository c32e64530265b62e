"""Time and peak GPU memory of RAM++ tagging at full size, with random weights.

Builds the published RAM++ (Swin-L at 384 px, 4585 x 51 tag descriptions of width 512, the 2-layer
tagging head of width 768) directly on the GPU, no checkpoint file, and tags the paper's example
photos through ``RamPlusTagger``: one image, then a batch of 8, in bfloat16 (the runtime default on
CUDA) and in float32. Times include preprocessing and reading the scores back.

    python bench/ram_plus_full_size.py [--repeats 10] [--images DIR]

Writes ``bench/results/ram_plus_full_size.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from amodal.models.ram_plus import RamPlusTagger
from amodal.models.ram_plus_net import PUBLISHED, RamPlusNet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ram_plus_full_size.json"
PHOTOS = ROOT.parent / "shared" / "paper-examples" / "images"
BATCH = 8


def build(device: torch.device, dtype: torch.dtype) -> RamPlusTagger:
    """A random-weight full-size RAM++, initialised on the GPU; tag descriptions are unit vectors."""
    torch.manual_seed(0)
    with torch.device(device), torch.no_grad():
        net = RamPlusNet(PUBLISHED)
        net.label_embed.copy_(F.normalize(torch.randn_like(net.label_embed), dim=-1))
    return RamPlusTagger(net, device=device, dtype=dtype, batch_size=BATCH)


def timed(fn) -> tuple[object, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def measure(tagger: RamPlusTagger, images: list[np.ndarray], repeats: int) -> dict:
    """Median seconds and peak memory of tagging one image, then a batch of ``len(images)``."""
    result = {}
    for name, batch in (("single", images[:1]), (f"batch_{len(images)}", images)):
        for _ in range(3):  # warm-up: kernels chosen, clocks up
            tagger.tag(batch)
        torch.cuda.reset_peak_memory_stats()
        seconds = [timed(lambda: tagger.tag(batch))[1] for _ in range(repeats)]
        median = statistics.median(seconds)
        result[name] = {
            "images": len(batch),
            "seconds": [round(s, 4) for s in seconds],
            "median_s": round(median, 4),
            "per_image_s": round(median / len(batch), 4),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--images", type=Path, default=PHOTOS, help="folder of .jpg photos")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/ram_plus_full_size.py needs a CUDA GPU; none is visible to torch on this machine")
    device = torch.device("cuda")
    photos = sorted(args.images.glob("*.jpg"))
    if not photos:
        sys.exit(f"no .jpg photos in {args.images}")
    images = [np.asarray(Image.open(photos[i % len(photos)]).convert("RGB")) for i in range(BATCH)]

    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.cuda.empty_cache()
        tagger, build_s = timed(lambda: build(device, dtype))
        weights_gib = torch.cuda.memory_allocated() / 2**30
        runs[str(dtype).removeprefix("torch.")] = {
            "build_s": round(build_s, 3),
            "weights_gib": round(weights_gib, 3),
            **measure(tagger, images, args.repeats),
        }
        del tagger

    with torch.device("meta"):
        parameters = sum(p.numel() for p in RamPlusNet(PUBLISHED).parameters())
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "RAM++ Swin-L 384, random weights (published architecture)",
        "parameters": parameters,
        "image_hw": [list(image.shape[:2]) for image in images],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
