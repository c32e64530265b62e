"""A static results page: per row the input, the visible and amodal masks, the RGBA completion over a
checkerboard, the status, the message and the flags (``OUT/index.html`` of ``amodal run``, and
``amodal status --report DIR``). The page and its image files need no server."""
from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from amodal.annotations import resolve_input
from amodal.images import InvalidInput

THUMBNAIL = 512  # longest side of the input images copied beside the page
RESULT_FILES = {"visible": "visible_mask.png", "amodal": "amodal_mask.png", "completion": "amodal_completion.png"}

STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: left; }
img { max-width: 220px; max-height: 220px; display: block; }
.checker { background-color: #fff; background-image: conic-gradient(#ccc 25%, #fff 0 50%, #ccc 0 75%, #fff 0);
           background-size: 16px 16px; }
.status-completed, .status-unoccluded { color: #17692a; }
.status-failed, .status-invalid { color: #a11; }
.flag { background: #fde68a; border-radius: 3px; padding: 0 4px; margin-right: 4px; }
"""


@dataclass
class ReportRow:
    """One row of the page; ``images`` maps a column (input, visible, amodal, completion) to PNG or JPEG bytes."""

    line: int
    image: str
    query: str
    status: str
    message: str
    flags: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_files(cls, line: dict, files: dict[str, bytes]) -> "ReportRow":
        """From a manifest line and ``{file name: bytes}`` of its result folder (``input``: the input image)."""
        images = {column: files[name] for column, name in RESULT_FILES.items() if name in files}
        if "input" in files:
            images["input"] = files["input"]
        return cls(line["line"], line["image"], line["query"], line["status"], line.get("message", ""),
                   list(line.get("flags") or []), images)


def _thumbnail(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def write_report(folder: Path, title: str, rows: Iterable[ReportRow]) -> Path:
    """Write ``folder/index.html`` with its images under ``folder/report/``; returns the page's path."""
    images = folder / "report"
    images.mkdir(parents=True, exist_ok=True)
    body = []
    for row in rows:
        cells = []
        for column in ("input", "visible", "amodal", "completion"):
            data = row.images.get(column)
            if data is None:
                cells.append("<td>-</td>")
                continue
            name = f"{row.line:06d}_{column}." + ("jpg" if column == "input" else "png")
            try:
                (images / name).write_bytes(_thumbnail(data) if column == "input" else data)
            except (UnidentifiedImageError, OSError):
                cells.append("<td>unreadable</td>")
                continue
            css = ' class="checker"' if column == "completion" else ""
            cells.append(f'<td{css}><img src="report/{name}" alt="{column} of line {row.line}"></td>')
        flags = "".join(f'<span class="flag">{html.escape(f)}</span>' for f in row.flags)
        body.append(
            f"<tr><td>{row.line}</td><td>{html.escape(row.image)}<br><b>{html.escape(row.query)}</b></td>"
            f'{"".join(cells)}<td class="status-{html.escape(row.status)}">{html.escape(row.status)}</td>'
            f"<td>{html.escape(row.message)}<br>{flags}</td></tr>")
    page = folder / "index.html"
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><table>"
        "<tr><th>line</th><th>image and query</th><th>input</th><th>visible mask</th><th>amodal mask</th>"
        "<th>completion (RGBA)</th><th>status</th><th>message and flags</th></tr>"
        f"{''.join(body)}</table></body></html>")
    return page


def write_local_report(out: Path, images: Path, outcomes: Iterable) -> Path:
    """The page of an ``amodal run``: its manifest outcomes, their result folders and the inputs."""
    rows = []
    for outcome in outcomes:
        line = json.loads(outcome.to_json())
        files = {}
        if outcome.result:
            files = {name: (Path(outcome.result) / name).read_bytes() for name in RESULT_FILES.values()
                     if (Path(outcome.result) / name).exists()}
        if outcome.status != "invalid":
            try:
                files["input"] = resolve_input(images.resolve(), outcome.image).read_bytes()
            except InvalidInput:
                pass  # the row's image went missing after its run: its cell stays empty
        rows.append(ReportRow.from_files(line, files))
    return write_report(out, f"amodal run: {out.name}", rows)
