"""``amodal run``: one outcome per row, bad rows invalid with their reason, good rows with results."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

from amodal.annotations import read_annotations
from amodal.images import encode_png
from amodal.models.registry import ModelSet
from amodal.runner import run_local
from amodal.settings import Settings
from amodal.state import OUTCOMES
from amodal.report import FLAG_MEANINGS
from tests.browser import page_facts
from tests.cluster import AMODAL, outside_repository
from tests.badinputs import LIMITS, write_bad_corpus
from tests.lisascript import scripted
from tests.synthetic import Oracle, occluded_scene

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_inference_steps": 2, "max_passes": 2}


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def check_result_folder(folder: Path) -> None:
    rgba = Image.open(folder / "amodal_completion.png")
    assert rgba.mode == "RGBA"
    alpha = np.array(rgba)[..., 3]
    amodal_mask = np.array(Image.open(folder / "amodal_mask.png")) > 127
    visible = np.array(Image.open(folder / "visible_mask.png")) > 127
    assert alpha.shape == amodal_mask.shape == visible.shape
    assert amodal_mask.any() and (alpha > 0)[amodal_mask].all()  # alpha: the amodal mask, and the visible
    assert not ((alpha > 0) & ~amodal_mask & ~visible).any()  # pixels pasted where the paper's code pastes them
    offsets = json.loads((folder / "offsets.json").read_text())
    assert (offsets["height"], offsets["width"]) == alpha.shape
    record = json.loads((folder / "job.json").read_text())
    assert record["status"] in ("completed", "unoccluded")
    assert (folder / "prompt.txt").exists()


def amodal_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed ``amodal`` command, from outside the repository."""
    return subprocess.run([*AMODAL, *args], cwd=outside_repository(), capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("AMODAL_")})


def test_bad_corpus_each_row_its_own_outcome(tmp_path):
    """Orchestration with stand-in models: every bad row is invalid with its reason, the rest go on."""
    annotations, expected = write_bad_corpus(tmp_path)
    out = tmp_path / "out"
    outcomes = run_local(tmp_path / "images", annotations, out, Oracle(occluded_scene()), Settings(**LIMITS),
                         progress=False)
    manifest = read_manifest(out)
    assert [m["line"] for m in manifest] == [e["line"] for e in expected] == [o.line for o in outcomes]
    for row, want in zip(manifest, expected):
        if want["kind"] == "invalid":
            assert row["status"] == "invalid", (row, want)
            assert want["message"] in row["message"], (row, want)
            assert row["result"] is None
        else:
            assert row["status"] in OUTCOMES and row["status"] != "invalid", (row, want)
    folders = [m["result"] for m in manifest if m["result"]]
    assert len(folders) == len(set(folders))


def test_duplicate_rows_and_rerun(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    scene = occluded_scene()
    (images / "a.png").write_bytes(encode_png(scene.render()))
    rows = [{"image": "a.png", "query": "ball"}, {"image": "a.png", "query": "box"},
            {"image": "a.png", "query": "ball"}]
    annotations = tmp_path / "rows.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run_local(images, annotations, out, Oracle(scene), Settings(), progress=False)
    first = read_manifest(out)
    assert first[0]["status"] == "completed" and first[1]["status"] == "unoccluded"
    assert first[2]["status"] == "invalid" and "duplicate of line 1" in first[2]["message"]
    check_result_folder(Path(first[0]["result"]))
    assert first[1]["result"] is None  # as in the paper's code, an unoccluded target gets no result images
    # a second run over the same folder reuses the finished results without running the models
    oracle = Oracle(scene)
    run_local(images, annotations, out, oracle, Settings(), progress=False)
    assert read_manifest(out) == first
    assert oracle.calls == {}


def readme_run_command() -> list[str]:
    """The arguments of ``amodal run`` in the README's first command."""
    first = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    return shlex.split(first.split(".venv/bin/amodal run ", 1)[1])


def test_readme_first_run_carries_every_row_through_and_its_page_loads(tmp_path, tiny_models, paper_examples):
    """The README's first command, as written (paths pointed at this run's folders): with tiny models
    every example row goes through every step, and ``OUT/index.html`` shows each one in Chromium."""
    args = readme_run_command()
    for option, value in (("--images", paper_examples / "images"), ("--out", tmp_path / "out"),
                          ("--models", tiny_models),
                          ("--annotations", paper_examples / "example_annotation.json")):
        args[args.index(option) + 1] = str(value)
    res = amodal_cli("run", *args, "-q")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 7
    out = tmp_path / "out"
    manifest = read_manifest(out)
    assert [m["line"] for m in manifest] == list(range(1, 8))
    # random weights detect at random: as in the paper's code, a row with nothing detected is skipped, and a
    # query the grounder finds nothing for has no target
    assert all(m["status"] in ("completed", "unoccluded", "skipped", "no_target") for m in manifest), manifest
    for m in manifest:
        record = json.loads((out / m["job_id"] / "job.json").read_text())
        assert record["backends"]["ground"] == "gdino_sam"
        assert m["status"] == "no_target" or record["backends"]["tag"] == "clip"  # tagged once found
        if m["status"] == "completed":
            check_result_folder(Path(m["result"]))
            assert m["quality"]["amodal_px"] > 0 and m["quality"]["visible_px"] > 0
        else:
            assert m["result"] is None and record["message"]
    page = out / "index.html"
    assert summary["report"] == str(page)
    facts = page_facts(page, width=1400)
    images = facts["images"]
    with_completion = sum((Path(m["result"]) / "amodal_completion.png").exists() for m in manifest if m["result"])
    assert len(images) == 7 + with_completion  # the input with its masks over it, and the completion if any
    assert all(i["ok"] for i in images), [i for i in images if not i["ok"]]
    assert facts["scroll_width"] <= facts["client_width"] and facts["right"] <= 1400, facts  # fits 1,400 px
    records = [link for link in facts["links"] if link["text"] == "job.json"]
    assert len(records) == 7 and all(link["exists"] for link in records), facts["links"]
    assert "7 rows" in facts["text"] and all(flag in facts["text"] for flag in FLAG_MEANINGS), facts["text"]


def test_run_grounds_with_lisa_and_tags_with_ram_plus_by_default(tmp_path, tiny_models, paper_examples):
    """The paper's stack, the default: LISA finds the target (its decoding scripted to say ``[SEG]``,
    which random weights rarely do) and RAM++ names the scene; ``job.json`` records both."""
    rows = read_annotations(paper_examples / "example_annotation.json")[:2]
    annotations = tmp_path / "two.jsonl"
    annotations.write_text("".join(json.dumps({"image": r.image, "query": r.query}) + "\n" for r in rows))
    settings = Settings(**TINY)
    models = ModelSet(tiny_models, settings)
    lisa = models.grounder
    with scripted(lisa, [lisa.seg_token_id, lisa.tokenizer.eos_token_id] * len(rows)):
        run_local(paper_examples / "images", annotations, tmp_path / "out", models, settings, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert all(m["result"] or m["status"] in ("unoccluded", "skipped") for m in manifest), manifest
    vocabulary = set(files("amodal.data").joinpath("ram_tag_list.txt").read_text().splitlines())
    for m in manifest:
        if m["result"]:
            check_result_folder(Path(m["result"]))
            record = json.loads((Path(m["result"]) / "job.json").read_text())
            assert record["backends"]["ground"] == "lisa" and record["backends"]["tag"] == "ram_plus", record
            assert record["grounder_text"] == "[SEG]"
            assert set(record["tags"]) <= vocabulary, record["tags"]


def test_cli_run_bad_corpus_with_tiny_models(tmp_path, tiny_models):
    annotations, expected = write_bad_corpus(tmp_path)
    out = tmp_path / "out"
    sets = [f"--set={k}={v}" for k, v in {**LIMITS, **TINY}.items()]
    res = amodal_cli("run", "--images", str(tmp_path / "images"), "--annotations", str(annotations), "--out",
                     str(out), "--models", str(tiny_models), "-q", *sets)
    assert res.returncode == 0, res.stderr
    manifest = read_manifest(out)
    assert len(manifest) == len(expected)
    for row, want in zip(manifest, expected):
        assert row["status"] != "failed", row
        assert (row["status"] == "invalid") == (want["kind"] == "invalid"), (row, want)
        if row["result"]:
            check_result_folder(Path(row["result"]))


def test_cli_missing_models_is_one_clear_error(tmp_path, paper_examples):
    res = amodal_cli("run", "--images", str(paper_examples / "images"), "--annotations",
                     str(paper_examples / "example_annotation.json"), "--out", str(tmp_path / "o"),
                     "--models", str(tmp_path / "nothing"))
    assert res.returncode == 2
    assert "amodal models download" in res.stderr and "Traceback" not in res.stderr
