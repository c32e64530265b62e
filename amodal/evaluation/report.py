"""The benchmark's outputs: ``report.json`` and a static page (``index.html``) with the methods' scores side by
side and, per row, the truth beside our result. Figures are rounded; the page fits 1,400 px."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from amodal.evaluation.generator import Sample
from amodal.evaluation.metrics import FILL, Prediction, over_fill
from amodal.evaluation.summary import APPEARANCE_SCORES, MASK_SCORES, OURS
from amodal.geometry import bbox
from amodal.images import encode_png

PAGE_DIR = "page"
MARGIN = 8  # pixels around the object in the page's crops
# green: found, red: missed, blue: extra
OVERLAY = {"found": (40, 180, 60), "missed": (220, 40, 40), "extra": (40, 90, 230)}
SUMMARY_FIGURES = ("failure_rate", *MASK_SCORES, *APPEARANCE_SCORES, "visible_iou")
ROW_SCORES = ("hidden_iou", "iou", "ssim", "lpips", "feature_similarity")


def write_report(report: dict, samples: dict[int, list[Sample]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / PAGE_DIR).mkdir(exist_ok=True)
    cells = [_row_html(row, sample, seed, out) for seed, rows in samples.items()
             for row, sample in zip(report["rows"][str(seed)][OURS], rows, strict=True)]
    (out / "index.html").write_text(_page(report, cells))


def figure(value: float | int | None) -> str:
    """A number as the page shows it: three decimals (integers as they are); - for none."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _row_html(row: dict, sample: Sample, seed: int, out: Path) -> str:
    """Write the row's pictures (input, truth, result, masks, cropped alike) and return its table row."""
    prediction = Prediction.from_folder(Path(row["result"]), sample.full.shape) if row["result"] else None
    x0, y0, x1, y1 = _crop(sample, prediction)
    truth_pixels = sample.original if sample.original is not None else sample.image
    pictures = {"input": sample.image, "truth": np.where(sample.full[..., None], truth_pixels, np.array(FILL, np.uint8))}
    if prediction is not None:
        pictures["result"] = over_fill(prediction.rgba)
        pictures["masks"] = _overlay(sample.full, prediction.mask)
    links = {}
    for kind, picture in pictures.items():
        relative = f"{PAGE_DIR}/s{seed}_{sample.name}_{kind}.png"
        (out / relative).write_bytes(encode_png(np.ascontiguousarray(picture[y0:y1, x0:x1])))
        links[kind] = f'<img src="{html.escape(relative)}" alt="{kind}">'
    scores = "".join(f"<td>{figure(row.get(m))}</td>" for m in ROW_SCORES)
    failure = ' class="failure"' if row["failure"] else ""
    return (f"<tr{failure}><td>{seed}/{html.escape(sample.name)}<br>{html.escape(sample.label)}<br>"
            f"hidden {row['hidden_fraction']:.0%}<br>{html.escape(row['status'])}<br>{html.escape(', '.join(row['flags']))}</td>"
            + "".join(f"<td>{links.get(kind, '-')}</td>" for kind in ("input", "truth", "result", "masks"))
            + scores + "</tr>")


def _crop(sample: Sample, prediction: Prediction | None) -> tuple[int, int, int, int]:
    """The box of the true object and the result, with a margin, inside the frame."""
    union = sample.full | (prediction.mask if prediction is not None else False)
    x0, y0, x1, y1 = bbox(union)
    height, width = union.shape
    return max(0, x0 - MARGIN), max(0, y0 - MARGIN), min(width, x1 + MARGIN), min(height, y1 + MARGIN)


def _overlay(full: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    picture = np.zeros((*full.shape, 3), np.uint8)
    picture[full & predicted] = OVERLAY["found"]
    picture[full & ~predicted] = OVERLAY["missed"]
    picture[~full & predicted] = OVERLAY["extra"]
    return picture


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _with_interval(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return figure(entry["mean"]) + (f" &plusmn; {figure(entry['ci95'])}" if entry["ci95"] is not None else "")


def _page(report: dict, rows: list[str]) -> str:
    methods = report["methods"]
    figures = [f for f in SUMMARY_FIGURES if any(f in m for m in methods.values())]
    summary = _table(["method", *figures], [[html.escape(name), *(_with_interval(m.get(f)) for f in figures)]
                                            for name, m in methods.items()])
    bins = _table(["method", "hidden", "rows", "failure rate", "hidden IoU", "SSIM"],
                  [[html.escape(name), b["hidden"], figure(b["rows"]), figure(b["failure_rate"]),
                    figure(b["hidden_iou"]), figure(b["ssim"])] for name, m in methods.items() for b in m["bins"]])
    flags = _table(["flag", "flagged", "failures", "hits", "precision", "recall"],
                   [[html.escape(flag), figure(f["flagged"]), figure(f["failures"]), figure(f["hits"]),
                     figure(f["precision"]), figure(f["recall"])] for flag, f in report["flags"].items()])
    p = report["provenance"]
    facts = _table(["version", "commit", "grounding", "seeds", "metric choices"],
                   [[html.escape(p["version"]), html.escape(str(p["commit"])[:12]), html.escape(p["grounding"]),
                     html.escape(", ".join(map(str, report["seeds"]))),
                     html.escape(", ".join(f"{k}={v}" for k, v in p["metrics"].items()))]])
    legend = ", ".join(f"{name}: rgb{colour}" for name, colour in OVERLAY.items())
    header = "".join(f"<th>{h}</th>" for h in ("row", "input", "truth", "result", f"masks ({legend})", *ROW_SCORES))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>amodal eval</title>
<style>body{{font-family:sans-serif;max-width:1380px;margin:0 auto}} td,th{{border:1px solid #ccc;padding:3px;
vertical-align:top;font-size:13px;overflow-wrap:anywhere}} table{{border-collapse:collapse;margin-bottom:12px;max-width:100%}}
img{{max-width:150px;max-height:150px}} tr.failure{{background:#fde8e8}}</style></head>
<body><h1>amodal eval</h1>
<p>{html.escape(report["failure_rule"])} Means over seeds &plusmn; the half-width of a 95% interval. nothing: the
visible cut-out; mean_fill: the visible mask's convex hull in the mean visible colour.</p>
{facts}
<h2>Methods</h2>{summary}
<h2>By hidden fraction</h2>{bins}
<h2>Flags as failure detectors (ours)</h2>{flags}
<h2>Rows (ours)</h2>
<table><tr>{header}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
