"""Rows scored per method, and what a report says of them: means over seeds with a 95% interval, the
failure rate, results binned by hidden fraction, each quality flag as a detector of failures, and the
provenance of every number (settings, metric choices, weight fingerprints, package version, commit)."""
from __future__ import annotations

import collections
import importlib.metadata
import json
import math
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from amodal.evaluation.generator import Sample
from amodal.evaluation.options import MetricOptions
from amodal.keys import OFFSETS, VISIBLE_MASK
from amodal.provenance import checkpoint_fingerprint, weight_fingerprints
from amodal.quality import FLAGS
from amodal.settings import Settings

if TYPE_CHECKING:
    from amodal.evaluation.metrics import Scorer

OURS = "ours"
FAILURE_RULE = ("A row fails when the method gives no result or its hidden_iou is under the floor "
                "(--hidden-iou-floor, default 0.5).")
MASK_SCORES = ("iou", "hidden_iou", "repainted")
APPEARANCE_SCORES = ("ssim", "lpips", "feature_similarity", "clip_score")
BIN_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)  # hidden fraction; synthetic pastes hide 10% to 90%
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def score_method(samples: list[Sample], lines: dict[str, dict | None], scorer: Scorer, grounding: str,
                 progress: bool = True) -> list[dict]:
    """One scored row per sample from its manifest line (``None``: the method has no line for it)."""
    from amodal.evaluation.metrics import Prediction

    rows = []
    for sample in tqdm(samples, desc="scoring", unit="row", disable=not progress):
        line = lines.get(sample.name) or {"status": "missing", "message": "no result line", "result": None}
        row = {"name": sample.name, "label": sample.label, "hidden_fraction": round(sample.hidden_fraction, 4),
               "status": line["status"], "message": line.get("message", ""), "result": line.get("result"),
               "flags": list(line.get("flags") or []), "growth_ratio": (line.get("quality") or {}).get("growth_ratio")}
        folder = Path(line["result"]) if line.get("result") else None
        prediction = Prediction.from_folder(folder, sample.full.shape)
        if prediction is not None:
            row.update(scorer.score(sample, prediction))
            if grounding == "text":
                row["visible_iou"] = _visible_iou(folder, sample)
        row["has_result"] = prediction is not None
        row["failure"] = prediction is None or row["hidden_iou"] < scorer.options.hidden_iou_floor
        rows.append(row)
    return rows


def _visible_iou(folder: Path, sample: Sample) -> float | None:
    """IoU of the visible mask the method grounded (``visible_mask.png`` in the result's box) with the true one."""
    path = folder / VISIBLE_MASK
    if not path.is_file():
        return None
    with Image.open(path) as file:
        mask = np.asarray(file.convert("L")) > 127
    offsets = json.loads((folder / OFFSETS).read_text())
    frame = np.zeros(sample.full.shape, bool)
    height, width = frame.shape
    x, y = offsets["x"], offsets["y"]
    fx0, fy0, fx1, fy1 = max(x, 0), max(y, 0), min(x + mask.shape[1], width), min(y + mask.shape[0], height)
    if fx1 > fx0 and fy1 > fy0:
        frame[fy0:fy1, fx0:fx1] = mask[fy0 - y:fy1 - y, fx0 - x:fx1 - x]
    truth = sample.visible
    return float((frame & truth).sum() / max((frame | truth).sum(), 1))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict]) -> dict:
    """One seed of one method: means over the rows with a result (the mask scores count a row without one as
    0), the failure rate, statuses and flags."""
    scored = [row for row in rows if row["has_result"]]
    summary = {"rows": len(rows), "with_result": len(scored),
               "failure_rate": _mean([float(row["failure"]) for row in rows])}
    for metric in MASK_SCORES:
        summary[metric] = _mean([row.get(metric, 0.0) for row in rows])
    for metric in (*APPEARANCE_SCORES, "visible_iou"):
        values = [row[metric] for row in scored if row.get(metric) is not None]
        if values:
            summary[metric] = _mean(values)
    summary["statuses"] = dict(collections.Counter(row["status"] for row in rows))
    summary["flags"] = dict(collections.Counter(flag for row in rows for flag in row["flags"]))
    return summary


def interval(values: list[float]) -> dict:
    """Mean over seeds and the half-width of its 95% Student-t interval (None with one seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "seeds": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    t = T_975.get(len(values) - 1, 1.96)
    return {"mean": mean, "ci95": t * sd / math.sqrt(len(values)), "seeds": values}


def bins(rows: list[dict]) -> list[dict]:
    """Rows of all seeds binned by hidden fraction: count, failure rate, mean hidden IoU and SSIM."""
    found = []
    for lo, hi in zip(BIN_EDGES, BIN_EDGES[1:]):
        inside = [r for r in rows if lo <= r["hidden_fraction"] < hi or (hi == 1.0 and r["hidden_fraction"] == 1.0)]
        if inside:
            ssim = [r["ssim"] for r in inside if r.get("ssim") is not None]
            found.append({"hidden": f"{lo:.0%}-{hi:.0%}", "rows": len(inside),
                          "failure_rate": _mean([float(r["failure"]) for r in inside]),
                          "hidden_iou": _mean([r.get("hidden_iou", 0.0) for r in inside]), "ssim": _mean(ssim)})
    return found


def flag_detection(rows: list[dict]) -> dict[str, dict]:
    """Each quality flag as a detector of failures: flagged rows, hits, precision, recall."""
    failures = sum(row["failure"] for row in rows)
    table = {}
    for flag in FLAGS:
        flagged = [row for row in rows if flag in row["flags"]]
        hits = sum(row["failure"] for row in flagged)
        table[flag] = {"flagged": len(flagged), "failures": failures, "hits": hits,
                       "precision": hits / len(flagged) if flagged else None,
                       "recall": hits / failures if failures else None}
    return table


def combine(scored: dict[int, dict[str, list[dict]]], floor: float) -> dict:
    """The report's numbers: per method, each summary figure's mean over seeds with its interval, bins by
    hidden fraction; our flags against failures."""
    methods: dict[str, dict] = {}
    per_seed = {seed: {method: summarize(rows) for method, rows in by_method.items()} for seed, by_method in scored.items()}
    for method in next(iter(scored.values())):
        summaries = [per_seed[seed][method] for seed in scored]
        numbers = [k for k, v in summaries[0].items() if isinstance(v, float) or k in ("rows", "with_result")]
        methods[method] = {k: interval([s[k] for s in summaries if s.get(k) is not None]) for k in numbers
                           if all(s.get(k) is not None for s in summaries)}
        methods[method]["bins"] = bins([row for by_method in scored.values() for row in by_method[method]])
    ours = [row for by_method in scored.values() for row in by_method[OURS]]
    return {"failure_rule": f"A row fails when the method gives no result or its hidden_iou is under {floor}.", "seeds": list(scored),
            "methods": methods, "per_seed": {str(seed): s for seed, s in per_seed.items()},
            "flags": flag_detection(ours)}


def git_commit() -> str | None:
    """The commit of the checkout the package runs from (None when installed from elsewhere)."""
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                               text=True, timeout=10)
    except OSError:
        return None
    return found.stdout.strip() if found.returncode == 0 else None


def provenance(settings: Settings, model_dir: Path | None, options: MetricOptions, grounding: str,
               source: dict) -> dict:
    """Every choice behind the report's numbers."""
    from amodal.models.lpips import LPIPS_DIR

    weights = weight_fingerprints(model_dir, settings) if model_dir else {}
    metric_weights = {}
    if model_dir:
        metric_weights = {name: checkpoint_fingerprint(model_dir / name) for name in (options.clip_model, LPIPS_DIR)
                          if (model_dir / name).exists()}
    return {"package": "amodal", "version": importlib.metadata.version("amodal"), "commit": git_commit(),
            "settings": settings.to_dict(), "metrics": options.to_dict(), "grounding": grounding, "source": source,
            "model_dir": str(model_dir) if model_dir else None, "weights": weights, "metric_weights": metric_weights}
