"""SAM ViT-H's image encoder on the GPU: its relative-position index built on the host at every block
(``segment_anything``'s own) against kept on the device (``amodal.models.sam.device_rel_pos``), and
eager against ``torch.compile``, at the segment stage's encoder batch (full-size random weights, bf16).

    python bench/sam_encoder.py --out bench/results/sam_encoder.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amodal.models import sam  # noqa: E402
from segment_anything.modeling import image_encoder  # noqa: E402


def timed(fn, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn(x)`` over ``repeats`` calls after one warm-up, and the last output."""
    out = fn(x)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=sam.ENCODER_BATCH)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sam_encoder.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        encoder = sam.build_sam(sam.VIT_H).image_encoder.to(torch.bfloat16).eval()
        x = torch.randn(args.batch, 3, 1024, 1024, dtype=torch.bfloat16)
    record: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": args.batch,
                    "dtype": "bfloat16", "repeats": args.repeats}
    image_encoder.get_rel_pos = sam._host_rel_pos
    record["eager_host_index_s"], reference = timed(encoder, x, args.repeats)
    image_encoder.get_rel_pos = sam.device_rel_pos
    record["eager_device_index_s"], out = timed(encoder, x, args.repeats)
    record["device_index_max_abs_diff"] = float((out.float() - reference.float()).abs().max())
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")  # the eager figures, before the slow compile
    start = time.perf_counter()
    compiled = torch.compile(encoder)
    compiled(x)
    torch.cuda.synchronize()
    record["compile_s"] = time.perf_counter() - start
    record["compiled_s"], out = timed(compiled, x, args.repeats)
    record["compiled_max_abs_diff"] = float((out.float() - reference.float()).abs().max())
    record["reference_max_abs"] = float(reference.float().abs().max())
    # ViT-H at 64x64 tokens: 2 FLOP per multiply-add over its parameters per token, plus attention
    flop = 2 * sum(p.numel() for p in encoder.parameters()) * 64 * 64 * args.batch
    record["tflops_by_parameters"] = {k: flop / record[k] / 1e12
                                      for k in ("eager_host_index_s", "eager_device_index_s", "compiled_s")}
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
