"""A static results page: a summary with the counts, a legend of the flags, then per row the input with
the visible and amodal masks drawn over it, the RGBA completion over a checkerboard, the status, the
message, the flags and a link to the job's ``job.json`` (``OUT/index.html`` of ``amodal run``, and
``amodal status --report DIR``). It fits a 1,400 px window; past :data:`ROWS_PER_PAGE` rows it goes on in
``page-2.html``, ``page-3.html``, ... The pages and their image files need no server."""
from __future__ import annotations

import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from amodal.annotations import resolve_input
from amodal.images import InvalidInput
from amodal.keys import AMODAL_MASK, COMPLETION, JOB_RECORD, OFFSETS, VISIBLE_MASK

THUMBNAIL = 512  # longest side of the images copied beside the page
ROWS_PER_PAGE = 100
RESULT_FILES = {"visible": VISIBLE_MASK, "amodal": AMODAL_MASK, "completion": COMPLETION}
VISIBLE_TINT, HIDDEN_TINT = (40, 200, 80), (240, 80, 40)  # over the input: the visible mask, the amodal mask past it
# What each flag of job.json means (amodal.quality raises them; their thresholds are settings).
FLAG_MEANINGS = {
    "target_lost": "a pass lost the target and kept the mask it had",
    "runaway_growth": "the amodal mask grew past flag_growth_ratio times the visible mask",
    "window_edge": "the amodal mask touches the window's edge: the completion may be cut",
    "stopped_at_limit": "the loop stopped at max_passes, not because the object was whole",
    "low_clip_similarity": "the completion matches its prompt less than flag_clip_similarity (CLIP)",
}

STYLE = """
body { font-family: sans-serif; margin: 1em; max-width: 1360px; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
td, th { border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: left; overflow-wrap: anywhere; }
col.line { width: 4em; } col.what { width: 14em; } col.picture { width: 330px; } col.status { width: 7em; }
img { max-width: 100%; max-height: 320px; display: block; }
.checker { background-color: #fff; background-image: conic-gradient(#ccc 25%, #fff 0 50%, #ccc 0 75%, #fff 0);
           background-size: 16px 16px; }
.status-completed, .status-unoccluded { color: #17692a; }
.status-failed, .status-invalid { color: #a11; }
.flag { background: #fde68a; border-radius: 3px; padding: 0 4px; margin-right: 4px; display: inline-block; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; }
nav a { margin-right: 0.6em; }
dl.legend { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; }
dl.legend dd { margin: 0; }
"""


@dataclass
class ReportRow:
    """One row of the page. ``images`` maps input, visible, amodal and completion to PNG or JPEG bytes;
    ``offsets`` places the result's frame in the input (``offsets.json``); ``job_json`` is the record's
    path relative to the page, if there is one."""

    line: int
    image: str
    query: str
    status: str
    message: str
    flags: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    offsets: dict | None = None
    job_json: str | None = None

    @classmethod
    def from_files(cls, line: dict, files: dict[str, bytes], job_json: str | None = None) -> "ReportRow":
        """From a manifest line and ``{file name: bytes}`` of its result folder (``input``: the input image)."""
        images = {column: files[name] for column, name in RESULT_FILES.items() if name in files}
        if "input" in files:
            images["input"] = files["input"]
        offsets = json.loads(files[OFFSETS]) if OFFSETS in files else None
        return cls(line["line"], line["image"], line["query"], line["status"], line.get("message", ""),
                   list(line.get("flags") or []), images, offsets, job_json)


def _jpeg(image: Image.Image) -> bytes:
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=85)
    return out.getvalue()


def masks_over_input(row: ReportRow) -> bytes:
    """The input (thumbnail, JPEG) with the visible mask and the rest of the amodal mask tinted over it
    where they fall inside it, placed by the result's offsets; the plain input without them."""
    image = np.asarray(Image.open(io.BytesIO(row.images["input"])).convert("RGB")).astype(np.float32)
    if row.offsets is not None:
        x, y = int(row.offsets["x"]), int(row.offsets["y"])
        masks = {column: np.asarray(Image.open(io.BytesIO(row.images[column])).convert("L")) > 127
                 for column in ("visible", "amodal") if column in row.images}
        if "visible" in masks and "amodal" in masks and masks["visible"].shape == masks["amodal"].shape:
            masks["amodal"] = masks["amodal"] & ~masks["visible"]  # its hidden part only
        for column, tint in (("amodal", HIDDEN_TINT), ("visible", VISIBLE_TINT)):
            if column not in masks:
                continue
            mask = masks[column]
            # the part of the mask's frame that lies inside the input
            top, left = max(y, 0), max(x, 0)
            bottom, right = min(y + mask.shape[0], image.shape[0]), min(x + mask.shape[1], image.shape[1])
            if bottom <= top or right <= left:
                continue
            inside = mask[top - y:bottom - y, left - x:right - x]
            region = image[top:bottom, left:right]
            region[inside] = 0.45 * region[inside] + 0.55 * np.array(tint, np.float32)
    return _jpeg(Image.fromarray(image.clip(0, 255).astype(np.uint8)))


def _cell(folder: Path, row: ReportRow, column: str) -> str:
    """The row's picture of ``column`` (``input``: with the masks over it), written under ``folder/report/``."""
    if column not in row.images:
        return "<td>-</td>"
    name = f"{row.line:07d}_{column}.jpg" if column == "input" else f"{row.line:07d}_{column}.png"
    try:
        data = masks_over_input(row) if column == "input" else row.images[column]
        Image.open(io.BytesIO(data)).verify()
        (folder / "report" / name).write_bytes(data)
    except (UnidentifiedImageError, OSError, ValueError, KeyError):
        return "<td>unreadable</td>"
    css = ' class="checker"' if column == "completion" else ""
    what = "input with its masks" if column == "input" else column
    return f'<td{css}><img src="report/{name}" alt="{what} of line {row.line}" loading="lazy"></td>'


def _row_html(folder: Path, row: ReportRow) -> str:
    flags = "".join(f'<span class="flag" title="{html.escape(FLAG_MEANINGS.get(f, ""))}">{html.escape(f)}</span>'
                    for f in row.flags)
    record = f'<br><a href="{html.escape(row.job_json)}">job.json</a>' if row.job_json else ""
    return (f"<tr><td>{row.line}</td><td>{html.escape(row.image)}<br><b>{html.escape(row.query)}</b></td>"
            f"{_cell(folder, row, 'input')}{_cell(folder, row, 'completion')}"
            f'<td class="status-{html.escape(row.status)}">{html.escape(row.status)}</td>'
            f"<td>{html.escape(row.message)}<br>{flags}{record}</td></tr>")


def _page_name(number: int) -> str:
    return "index.html" if number == 1 else f"page-{number}.html"


def _summary_html(counts: dict[str, int], note: str) -> str:
    shown = ", ".join(f"{status} {n}" for status, n in counts.items() if n and status != "total")
    total = counts.get("total", sum(n for s, n in counts.items() if s != "flagged"))
    return f'<p class="summary"><b>{total} rows</b>: {html.escape(shown)}. {html.escape(note)}</p>'


def _legend_html() -> str:
    swatch = '<span class="swatch" style="background: rgb{}"></span>'
    items = "".join(f"<dt><span class=\"flag\">{html.escape(f)}</span></dt><dd>{html.escape(m)}</dd>"
                    for f, m in FLAG_MEANINGS.items())
    return (f"<p>Input: {swatch.format(VISIBLE_TINT)} visible mask, {swatch.format(HIDDEN_TINT)} the amodal mask's "
            "hidden part (where it lies inside the image). Completion: RGBA over a checkerboard.</p>"
            f'<details open><summary>Flags</summary><dl class="legend">{items}</dl></details>')


def write_report(folder: Path, title: str, rows: Iterable[ReportRow], counts: dict[str, int],
                 note: str = "") -> list[Path]:
    """Write ``folder/index.html`` (and ``page-N.html`` past :data:`ROWS_PER_PAGE` rows) with the images under
    ``folder/report/``; ``counts`` (rows per outcome, ``total``) is the summary. Rows are written as they
    come, so only the pages' text is held. Returns the pages' paths."""
    (folder / "report").mkdir(parents=True, exist_ok=True)
    bodies: list[list[str]] = [[]]
    for row in rows:
        if len(bodies[-1]) == ROWS_PER_PAGE:
            bodies.append([])
        bodies[-1].append(_row_html(folder, row))
    shown = sum(len(b) for b in bodies)
    pages = []
    for number, body in enumerate(bodies, 1):
        first = (number - 1) * ROWS_PER_PAGE + 1
        nav = " ".join(f'<a href="{_page_name(n)}">{n}</a>' if n != number else f"<b>{n}</b>"
                       for n in range(1, len(bodies) + 1))
        where = f"Showing rows {first}-{first + len(body) - 1} of the {shown} on these pages" if body \
            else "No row to show"
        page = folder / _page_name(number)
        page.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{_summary_html(counts, note)}{_legend_html()}<p>{where}.</p><nav>Pages: {nav}</nav><table>"
            '<colgroup><col class="line"><col class="what"><col class="picture"><col class="picture">'
            '<col class="status"><col></colgroup>'
            "<tr><th>line</th><th>image and query</th><th>input, masks over it</th><th>completion (RGBA)</th>"
            "<th>status</th><th>message, flags, record</th></tr>"
            f"{''.join(body)}</table><nav>Pages: {nav}</nav></body></html>")
        pages.append(page)
    return pages


def write_local_report(out: Path, images: Path, outcomes: list) -> Path:
    """The page of an ``amodal run``: its manifest outcomes, their result folders and the inputs."""
    def rows() -> Iterable[ReportRow]:
        for outcome in outcomes:
            line = json.loads(outcome.to_json())
            files = {}
            if outcome.result:
                files = {name: (Path(outcome.result) / name).read_bytes()
                         for name in (*RESULT_FILES.values(), OFFSETS) if (Path(outcome.result) / name).exists()}
            if outcome.status != "invalid":
                try:
                    files["input"] = resolve_input(images.resolve(), outcome.image).read_bytes()
                except InvalidInput:
                    pass  # the row's image went missing after its run: its cell stays empty
            record = out / outcome.job_id / JOB_RECORD if outcome.job_id else None
            link = os.path.relpath(record, out) if record is not None and record.exists() else None
            yield ReportRow.from_files(line, files, link)

    counts: dict[str, int] = {"total": len(outcomes)}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    counts["flagged"] = sum(1 for outcome in outcomes if outcome.flags)
    return write_report(out, f"amodal run: {out.name}", rows(), counts)[0]
