"""SAM ViT-H's image encoder on the GPU: its relative-position index built on the host at every block
(``segment_anything``'s own) against kept on the device (``amodal.models.sam.device_rel_pos``), and
eager against ``torch.compile``, at the segment stage's encoder batch (full-size random weights, bf16);
and how far the compiled encoder moves the masks: each image's masks for fixed boxes, decoded from the
eager and from the compiled features, compared pixel by pixel (IoU). ``--device cpu --tiny
--no-compile`` runs the script on a small encoder in float32, to check it.

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
from bench.gpu_profile import median_seconds  # noqa: E402
from segment_anything.modeling import image_encoder  # noqa: E402


def timed(fn, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn(x)`` over ``repeats`` calls after one warm-up, and the last output."""
    fn(x)
    return median_seconds(lambda: fn(x), repeats)


def mask_agreement(segmenter: sam.SamSegmenter, reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Masks of fixed boxes on a 640x480 image decoded from two batches of encoder features: the IoU of
    each pair (the mean and the lowest) and the share of pixels that differ."""
    size = segmenter.model.image_encoder.img_size
    original, inside = (480, 640), (size * 3 // 4, size)
    boxes = [(x, y, x + w, y + h) for x, y, w, h in ((40, 30, 300, 260), (200, 100, 400, 300), (0, 0, 640, 480),
                                                      (500, 300, 120, 160), (100, 200, 80, 60))]
    ious, differ, pixels = [], 0, 0
    for a, b in zip(reference.float(), other.float()):
        masks = [segmenter.decode(sam.SamEmbedding(f[None], inside, original), boxes) for f in (a, b)]
        for m, n in zip(*masks):
            union = (m | n).sum()
            ious.append(float((m & n).sum() / union) if union else 1.0)
            differ, pixels = differ + int((m ^ n).sum()), pixels + m.size
    return {"masks": len(ious), "mean_iou": sum(ious) / len(ious), "min_iou": min(ious),
            "pixels_differing": differ / pixels}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=sam.ENCODER_BATCH)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small encoder (checks the script)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sam_encoder.json"))
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        arch = sam.TINY if args.tiny else sam.VIT_H
        model = sam.build_sam(arch)
        x = torch.randn(args.batch, 3, arch.img_size, arch.img_size, dtype=dtype)
    segmenter = sam.SamSegmenter(model, torch.device(args.device), dtype)
    encoder = model.image_encoder
    record: dict = {"device": torch.cuda.get_device_name(0) if cuda else args.device, "torch": torch.__version__,
                    "encoder": "tiny" if args.tiny else "vit_h", "batch": args.batch,
                    "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats}
    image_encoder.get_rel_pos = sam._host_rel_pos
    record["eager_host_index_s"], reference = timed(encoder, x, args.repeats)
    image_encoder.get_rel_pos = sam.device_rel_pos
    record["eager_device_index_s"], out = timed(encoder, x, args.repeats)
    record["device_index_max_abs_diff"] = float((out.float() - reference.float()).abs().max())
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")  # the eager figures, before the slow compile
    record["reference_max_abs"] = float(reference.float().abs().max())
    if args.compile:
        start = time.perf_counter()
        compiled = torch.compile(encoder)
        compiled(x)
        if cuda:
            torch.cuda.synchronize()
        record["compile_s"] = time.perf_counter() - start
        record["compiled_s"], out = timed(compiled, x, args.repeats)
        record["compiled_max_abs_diff"] = float((out.float() - reference.float()).abs().max())
        record["compiled_masks"] = mask_agreement(segmenter, reference, out)
    # 2 FLOP per multiply-add over the parameters per token (attention not counted)
    tokens = (arch.img_size // arch.patch_size) ** 2
    flop = 2 * sum(p.numel() for p in encoder.parameters()) * tokens * args.batch
    record["tflops_by_parameters"] = {k: flop / record[k] / 1e12 for k in
                                      ("eager_host_index_s", "eager_device_index_s", "compiled_s") if k in record}
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
