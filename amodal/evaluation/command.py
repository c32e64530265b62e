"""``amodal eval``: generate occluded rows with known truth, run the method on them, score and report."""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import TYPE_CHECKING

from amodal.errors import UsageError
from amodal.evaluation import METRICS
from amodal.evaluation.generator import Sample, coco_objects, coco_samples, synthetic_samples, write_rows
# The metrics bring torch: imported where they run, so that `amodal worker`, whose parser holds this
# command too, pins its GPU before anything loads torch.
if TYPE_CHECKING:
    from amodal.evaluation.metrics import Scorer
from amodal.settings import Settings

DEFAULT_IOU_FLOOR = 0.5  # a result whose amodal IoU is under this is a complete failure
# The paper's numbers, for comparison (its own data and models).
PAPER = {"clip_score": 28.18, "lpips": 0.320, "feature_similarity": 0.646, "ssim": 0.731,
         "complete_failure_rate": 0.041}


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``amodal`` command's subparsers."""
    parser = subparsers.add_parser("eval", help="quality benchmark: occluders pasted over whole objects, scored "
                                                "against the hidden truth")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco", help="COCO-style annotation file (polygon or RLE segmentations); needs --images")
    source.add_argument("--synthetic", type=int, metavar="N", help="N generated rows of flat discs and boxes")
    parser.add_argument("--images", help="folder of the COCO file's images")
    parser.add_argument("--limit", type=int, default=200, help="rows drawn from the COCO file (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row generator")
    parser.add_argument("--out", required=True, help="output folder (rows, results, report.json, index.html)")
    parser.add_argument("--models", help="model folder (default: $AMODAL_MODEL_DIR)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--iou-floor", type=float, default=DEFAULT_IOU_FLOOR,
                        help=f"amodal IoU under which a result is a complete failure (default {DEFAULT_IOU_FLOOR})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_eval)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from amodal.cli import _model_dir, _settings
    from amodal.models.registry import ModelSet

    settings, model_dir = _settings(args), _model_dir(args)
    if args.coco:
        if not args.images:
            raise UsageError("--coco needs --images")
        samples = coco_samples(coco_objects(Path(args.coco), Path(args.images)), args.limit, args.seed)
    else:
        samples = synthetic_samples(args.synthetic, args.seed)
    if not samples:
        raise UsageError("no usable objects to evaluate on (objects of 1024 px or more, clear of the border)")
    models = ModelSet(model_dir, settings)
    from amodal.evaluation.metrics import Scorer

    report = evaluate(samples, Path(args.out), models, Scorer.from_model_dir(model_dir, models.device), settings,
                      args.iou_floor, progress=not args.quiet)
    print(json.dumps({**report["summary"], "report": str(Path(args.out) / "report.json")}))
    return 0


def evaluate(samples: list[Sample], out: Path, models, scorer: Scorer, settings: Settings,
             iou_floor: float = DEFAULT_IOU_FLOOR, progress: bool = True) -> dict:
    """Run the method on ``samples`` (in process) and score each result; write the report and page into ``out``."""
    from amodal.runner import run_local

    # 1. The rows: input images with the occluders pasted, their visible masks, one JSONL row each.
    images, annotations = write_rows(samples, out / "data")
    # 2. The method on every row.
    run_local(images, annotations, out / "run", models, settings, progress=progress)
    # 3. Each row's scores against its truth.
    lines = read_manifest(out / "run")
    rows = [score_row(sample, lines[f"{sample.name}.png"], scorer, iou_floor) for sample in samples]
    # 4. The summary, and the report and page.
    report = {"summary": summarize(rows, iou_floor), "paper": PAPER, "settings": settings.to_dict(), "rows": rows}
    from amodal.evaluation.report import write_report

    write_report(report, samples, out)
    return report


def read_manifest(run: Path) -> dict[str, dict]:
    """The manifest's lines by input image."""
    lines = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    return {line["image"]: line for line in lines}


def result_flags(line: dict) -> list[str]:
    """The result's ``flags``: from the manifest line, else its ``job.json``; none where neither has them."""
    if "flags" in line:
        return list(line["flags"] or [])
    if line["result"]:
        record = json.loads((Path(line["result"]) / "job.json").read_text())
        return list(record.get("flags") or [])
    return []


def score_row(sample: Sample, line: dict, scorer: Scorer, iou_floor: float) -> dict:
    row = {"name": sample.name, "label": sample.label, "status": line["status"], "message": line["message"],
           "result": line["result"], "flags": result_flags(line)}
    if line["result"]:
        from amodal.evaluation.metrics import Prediction

        row.update(scorer.score(sample, Prediction.from_folder(Path(line["result"]), sample.full.shape)))
    row["failure"] = row.get("iou", 0.0) < iou_floor
    return row


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], iou_floor: float) -> dict:
    """Means over the rows with a result; ``mean_iou`` counts a row without one as 0."""
    scored = [row for row in rows if "iou" in row]
    return {
        "rows": len(rows),
        "with_result": len(scored),
        "mean_iou": _mean([row.get("iou", 0.0) for row in rows]),
        **{metric: _mean([row[metric] for row in scored]) for metric in METRICS},
        "complete_failure_rate": _mean([float(row["failure"]) for row in rows]),
        "iou_floor": iou_floor,
        "statuses": dict(collections.Counter(row["status"] for row in rows)),
        "flags": dict(collections.Counter(flag for row in rows for flag in row["flags"])),
    }
