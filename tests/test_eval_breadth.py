"""``amodal eval`` beyond the given visible mask and this process: the query path, the distributed path,
and the page as a browser shows it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from amodal.cli.evaluate import evaluate
from amodal.evaluation.generator import synthetic_samples
from amodal.settings import Settings
from tests.browser import CHROMEDRIVER, CHROMIUM, FLAGS
from tests.cluster import cluster_env, start_workers
from tests.test_eval import eval_command, oracle_run

PAGE_WIDTH = 1400


def page_layout(page: Path) -> dict:
    """The page in headless Chromium at ``PAGE_WIDTH`` px: its scroll width and whether every image decoded."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver (infra/test.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--window-size={PAGE_WIDTH},900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(page.resolve().as_uri())
        driver.execute_async_script(
            "const done = arguments[0];"
            "Promise.all([...document.images].map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })))"
            ".then(() => done());")
        return driver.execute_script(
            "return {width: document.documentElement.scrollWidth, viewport: window.innerWidth,"
            " images: [...document.images].map(i => i.complete && i.naturalWidth > 0),"
            " text: document.body.innerText};")
    finally:
        driver.quit()


def test_the_page_fits_1400_pixels_and_shows_the_references(tmp_path, scorer):
    seeds = {seed: synthetic_samples(3, seed) for seed in (0, 1)}
    evaluate(seeds, tmp_path, oracle_run(seeds), scorer, Settings(), None, progress=False)
    layout = page_layout(tmp_path / "index.html")
    assert layout["viewport"] <= PAGE_WIDTH and layout["width"] <= layout["viewport"]
    assert len(layout["images"]) == 4 * 6 and all(layout["images"])
    for shown in ("nothing", "mean_fill", "ours", "runaway_growth", "±"):
        assert shown in layout["text"]


def test_text_grounding_is_evaluated_against_the_visible_mask(tmp_path, scorer):
    seeds = {0: synthetic_samples(3, 0)}
    report = evaluate(seeds, tmp_path, oracle_run(seeds), scorer, Settings(), None, grounding="text",
                      progress=False)
    rows = [json.loads(line) for line in (tmp_path / "seed-0/data/rows.jsonl").read_text().splitlines()]
    assert rows and all("visible_mask" not in row for row in rows)  # the method grounds the query itself
    ours = report["methods"]["ours"]
    assert ours["visible_iou"]["mean"] > 0.95 and ours["failure_rate"]["mean"] == 0.0
    assert report["provenance"]["grounding"] == "text"


def test_through_queue_scores_what_the_workers_stored(tmp_path, redis_url, eval_models):
    settings = {"grounder": "gdino_sam", "tagger": "clip", "num_inference_steps": 2, "fixed_passes": 1,
                "device": "cpu"}
    env = cluster_env(redis_url, (tmp_path / "store").as_uri(), eval_models, settings)
    group = start_workers(env, tmp_path / "logs")
    try:
        out = tmp_path / "out"
        done = eval_command("--synthetic", "2", "--through-queue", "bench", "--out", str(out), "-q",
                            *[f"--set={k}={v}" for k, v in settings.items()], env=env)
    finally:
        group.stop()
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]["0"]["ours"]
    assert [row["status"] for row in rows] == ["completed", "completed"]
    for row in rows:
        assert row["has_result"] and Path(row["result"]).is_relative_to(out / "seed-0" / "run")
        assert row["failure"] == (row["hidden_iou"] < 0.5)
    assert report["provenance"]["source"]["through_queue"] == "bench"
