"""Real amodal datasets: COCOA, KINS and COCO-style files with both masks, read from small files in each
format (tests/fixtures/amodal), scored on masks; a malformed file ends in one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from amodal.cli.evaluate import evaluate
from amodal.evaluation.datasets import amodal_samples
from amodal.evaluation.masks import MalformedDataset
from amodal.evaluation.references import write_result
from amodal.settings import Settings
from tests.test_eval import eval_command

FIXTURES = Path(__file__).parent / "fixtures" / "amodal"
FORMATS = {"cocoa.json": "cocoa", "kins.json": "kins", "coco_amodal.json": "coco_amodal"}


def drawn_truth() -> tuple[np.ndarray, np.ndarray]:
    """The book's amodal and visible masks as the fixture scene was drawn (the cup, a disc, hides its right part)."""
    gy, gx = np.mgrid[0:72, 0:96]
    book = (gx >= 16) & (gx < 60) & (gy >= 14) & (gy < 54)
    cup = (gx - 60) ** 2 + (gy - 38) ** 2 <= 17 ** 2
    return book, book & ~cup


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_gives_the_occluded_object_with_its_visible_and_amodal_masks(name):
    kind, samples = amodal_samples(FIXTURES / name, FIXTURES, limit=10)
    assert kind == FORMATS[name]
    assert [s.label for s in samples] == ["book"]  # the cup is whole: no hidden part, not a row
    sample = samples[0]
    book, visible = drawn_truth()
    assert iou(sample.full, book) > 0.95 and iou(sample.visible, visible) > 0.9
    assert 0.1 < sample.hidden_fraction < 0.3 and not sample.appearance
    assert (sample.visible <= sample.full).all()


@pytest.mark.parametrize("document, message", [
    ("not json", "cannot read"),
    ({"images": [], "annotations": [{"segmentation": [[0, 0, 1, 0, 1, 1]]}]}, "no amodal annotations"),
    ({"images": [], "annotations": [{"a_segm": [[0, 0, 1, 0, 1, 1]], "image_id": 7}]}, "not a valid kins file"),
    ({"images": [{"id": 7, "height": 72, "width": 96, "file_name": "scene.png"}], "annotations": [
        {"image_id": 7, "regions": [{"segmentation": [1, 1, 9, 1, 9, 9], "name": "x",
                                     "visible_mask": {"size": [72, 96], "counts": 5}}]}]}, "bad mask"),
    ([1, 2], "not a COCO-style file"),
])
def test_a_malformed_file_is_refused_in_one_line(tmp_path, document, message):
    path = tmp_path / "bad.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(MalformedDataset, match=message) as raised:
        amodal_samples(path, FIXTURES, limit=10)
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def test_the_command_refuses_a_malformed_file_in_one_line(tmp_path, eval_models):
    kins = json.loads((FIXTURES / "kins.json").read_text())
    del kins["annotations"][1]["i_segm"]
    (tmp_path / "kins.json").write_text(json.dumps(kins))
    done = eval_command("--amodal", str(tmp_path / "kins.json"), "--images", str(FIXTURES), "--out",
                        str(tmp_path / "o"), "--models", str(eval_models))
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("amodal: ") and "i_segm" in done.stderr


@pytest.mark.parametrize("name", list(FORMATS))
def test_real_occlusions_are_scored_on_masks_beside_the_references(tmp_path, scorer, name):
    _, samples = amodal_samples(FIXTURES / name, FIXTURES, limit=10)

    def knows_the_truth(images, annotations, folder, seed):
        """A method whose result is the true amodal mask over the input's pixels."""
        lines = {}
        for sample in samples:
            write_result(folder / sample.name, sample.image, sample.full)
            lines[f"{sample.name}.png"] = {"status": "completed", "message": "", "result": str(folder / sample.name)}
        return lines

    report = evaluate({0: samples}, tmp_path, knows_the_truth, scorer, Settings(), None, progress=False)
    ours, nothing = report["methods"]["ours"], report["methods"]["nothing"]
    assert ours["iou"]["mean"] == 1.0 and ours["hidden_iou"]["mean"] == 1.0 and ours["failure_rate"]["mean"] == 0.0
    assert nothing["hidden_iou"]["mean"] == 0.0 and nothing["failure_rate"]["mean"] == 1.0
    assert nothing["iou"]["mean"] == pytest.approx(1 - samples[0].hidden_fraction)
    assert "ssim" not in ours and "lpips" not in ours  # the hidden pixels of a real occlusion are unknown
    assert (tmp_path / "index.html").is_file()
    shutil.rmtree(tmp_path / "seed-0")
