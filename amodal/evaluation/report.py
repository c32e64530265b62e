"""The benchmark's outputs: ``report.json`` and a static page (``index.html``) with the truth beside each result."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from amodal.evaluation import METRICS
from amodal.evaluation.generator import Sample
from amodal.evaluation.metrics import FILL, Prediction, over_fill
from amodal.geometry import bbox
from amodal.images import encode_png

PAGE_DIR = "page"
MARGIN = 8  # pixels around the object in the page's crops
# green: found, red: missed, blue: extra
OVERLAY = {"found": (40, 180, 60), "missed": (220, 40, 40), "extra": (40, 90, 230)}


def write_report(report: dict, samples: list[Sample], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / PAGE_DIR).mkdir(exist_ok=True)
    cells = [_row_html(row, sample, out) for row, sample in zip(report["rows"], samples, strict=True)]
    (out / "index.html").write_text(_page(report["summary"], cells))


def _row_html(row: dict, sample: Sample, out: Path) -> str:
    """Write the row's pictures (input, truth, result, masks, cropped alike) and return its table row."""
    prediction = Prediction.from_folder(Path(row["result"]), sample.full.shape) if row["result"] else None
    x0, y0, x1, y1 = _crop(sample, prediction)
    truth = np.where(sample.full[..., None], sample.original, np.array(FILL, np.uint8))
    pictures = {"input": sample.image, "truth": truth}
    if prediction is not None:
        pictures["result"] = over_fill(prediction.rgba)
        pictures["masks"] = _overlay(sample.full, prediction.mask)
    links = {}
    for kind, picture in pictures.items():
        relative = f"{PAGE_DIR}/{sample.name}_{kind}.png"
        (out / relative).write_bytes(encode_png(np.ascontiguousarray(picture[y0:y1, x0:x1])))
        links[kind] = f'<img src="{html.escape(relative)}" alt="{kind}">'
    scores = "".join(f"<td>{row[m]:.3f}</td>" if m in row else "<td>-</td>" for m in METRICS)
    flags = ", ".join(row["flags"])
    failure = ' class="failure"' if row["failure"] else ""
    return (f"<tr{failure}><td>{html.escape(sample.name)}<br>{html.escape(sample.label)}<br>{html.escape(row['status'])}"
            f"<br>{html.escape(flags)}</td>"
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


def _page(summary: dict, rows: list[str]) -> str:
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in summary.items())
    legend = ", ".join(f"{name}: rgb{colour}" for name, colour in OVERLAY.items())
    header = "".join(f"<th>{h}</th>" for h in ("row", "input", "truth", "result", f"masks ({legend})", *METRICS))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>amodal eval</title>
<style>body{{font-family:sans-serif}} td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}} img{{max-width:220px}} tr.failure{{background:#fde8e8}}</style></head>
<body><h1>amodal eval</h1>
<table>{facts}</table>
<h2>Rows</h2>
<table><tr>{header}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
