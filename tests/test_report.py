"""The results page's layout: masks drawn over the input where the offsets place them, pages of rows."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from amodal.report import HIDDEN_TINT, ROWS_PER_PAGE, VISIBLE_TINT, ReportRow, masks_over_input, write_report
from tests.browser import page_facts


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def test_masks_are_drawn_over_the_input_where_the_offsets_place_them():
    """A result frame reaching past the input's left border: its masks land shifted by the offsets and
    are cut at the border."""
    visible = np.zeros((80, 80), np.uint8)
    visible[20:40, 48:64] = 255
    amodal = visible.copy()
    amodal[20:40, 8:48] = 255  # the hidden part, partly left of the input
    row = ReportRow(1, "a.png", "thing", "completed", "", images={
        "input": png(np.full((120, 160, 3), 128, np.uint8)), "visible": png(visible), "amodal": png(amodal)},
        offsets={"x": -20, "y": 40, "width": 80, "height": 80})
    drawn = np.asarray(Image.open(io.BytesIO(masks_over_input(row))).convert("RGB")).astype(int)

    def near(pixel, tint):
        return np.abs(pixel - (0.45 * 128 + 0.55 * np.array(tint))).max() < 12

    assert near(drawn[70, 36], VISIBLE_TINT)  # frame (30, 56) -> input (70, 36)
    assert near(drawn[70, 8], HIDDEN_TINT)  # frame (30, 28) -> input (70, 8)
    assert np.abs(drawn[10, 100] - 128).max() < 12  # untouched outside the masks


def test_rows_past_a_page_go_on_to_further_pages(tmp_path):
    rows = (ReportRow(i, f"{i}.png", "thing", "no_target", "nothing found", ["window_edge"] if i % 2 else [])
            for i in range(1, ROWS_PER_PAGE + 31))
    pages = write_report(tmp_path, "many", rows, {"total": ROWS_PER_PAGE + 30, "no_target": ROWS_PER_PAGE + 30})
    assert [p.name for p in pages] == ["index.html", "page-2.html"]
    facts = page_facts(pages[1], width=1400)
    assert {link["href"] for link in facts["links"]} == {"index.html"} and all(link["exists"] for link in facts["links"])
    assert f"Showing rows {ROWS_PER_PAGE + 1}-{ROWS_PER_PAGE + 30}" in facts["text"]
    assert f"{ROWS_PER_PAGE + 30} rows" in facts["text"] and "window_edge" in facts["text"]
    assert facts["scroll_width"] <= facts["client_width"]
