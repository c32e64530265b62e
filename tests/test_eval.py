"""``amodal eval``: rows with known truth, the method run on them, scores that move the right way."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from amodal.evaluation.command import add_eval_command, evaluate
from amodal.evaluation.generator import (SYNTHETIC_SIZE, Sample, coco_objects, coco_samples, shape_mask,
                                         synthetic_samples)
from amodal.evaluation.metrics import Prediction, Scorer, amodal_iou
from amodal.images import encode_png
from amodal.settings import Settings
from tests.synthetic import Oracle, Scene, Shape, colour_mask


class PerSampleOracle:
    """The stand-in models of ``tests.synthetic``, one scene per synthetic row, picked by the colour most of
    the image has of the rows' targets (every object of a few rows has a colour of its own; edges blend). Each scene lists its shapes by label, so the
    stand-in CLIP's text axes are the same in every scene."""

    name = "oracle"

    def __init__(self, samples: list[Sample]) -> None:
        height, width = SYNTHETIC_SIZE
        self.oracles = [(s.shapes[0]["colour"], Oracle(Scene(width, height, [
            Shape(d["label"], d["colour"], d["kind"], d["cx"], d["cy"], d["rx"], d["ry"], d["depth"])
            for d in sorted(s.shapes, key=lambda d: d["label"])
        ]))) for s in samples]

    def __getattr__(self, role: str):  # grounder, tagger, detector, ...: all of them are this object
        if role in ("grounder", "tagger", "detector", "segmenter", "prompt_chooser", "occlusion", "inpainter", "clip"):
            return self
        raise AttributeError(role)

    def _oracle(self, image: np.ndarray) -> Oracle:
        return max(self.oracles, key=lambda pair: np.count_nonzero(colour_mask(image, pair[0])))[1]

    def ground(self, image, query):
        return self._oracle(image).ground(image, query)

    def ground_batch(self, images, queries):
        return [self.ground(i, q) for i, q in zip(images, queries, strict=True)]

    def tag(self, images):
        return [self._oracle(i).tag([i])[0] for i in images]

    def detect(self, images, labels):
        return [self._oracle(i).detect([i], [w])[0] for i, w in zip(images, labels, strict=True)]

    def segment(self, images, boxes):
        return [self._oracle(i).segment([i], [b])[0] for i, b in zip(images, boxes, strict=True)]

    def choose(self, images, visibles, candidates):
        return [self._oracle(i).choose([i], [v], [c])[0] for i, v, c in zip(images, visibles, candidates, strict=True)]

    def occluders_of(self, images, targets, others):
        return [self._oracle(i).occluders_of([i], [t], [o])[0] for i, t, o in zip(images, targets, others, strict=True)]

    def image_features(self, images):
        return np.concatenate([self._oracle(i).image_features([i]) for i in images])

    def text_features(self, texts):
        return self.oracles[0][1].text_features(texts)

    def inpaint(self, requests):
        return [self._oracle(r.image).inpaint([r])[0] for r in requests]


@pytest.fixture(scope="module")
def scorer(tiny_models) -> Scorer:
    return Scorer.from_model_dir(tiny_models, torch.device("cpu"))


def page_links(out: Path) -> list[Path]:
    return [out / src for src in re.findall(r'<img src="([^"]+)"', (out / "index.html").read_text())]


def test_synthetic_rows_know_their_truth():
    for sample in synthetic_samples(6, seed=3):
        height, width = sample.full.shape
        target, occluder = (shape_mask(d, height, width) for d in sample.shapes)
        np.testing.assert_array_equal(target, sample.full)
        np.testing.assert_array_equal(occluder, sample.occluder)
        assert 0.15 <= sample.hidden.sum() / sample.full.sum() <= 0.6
        np.testing.assert_array_equal(sample.image[~sample.occluder], sample.original[~sample.occluder])
        assert (sample.image[sample.hidden] == sample.shapes[1]["colour"]).all()


def test_oracle_models_recover_the_whole_objects(tmp_path, scorer):
    samples = synthetic_samples(6)
    report = evaluate(samples, tmp_path, PerSampleOracle(samples), scorer, Settings(), progress=False)
    summary = report["summary"]
    assert summary["statuses"] == {"completed": 6}
    assert summary["mean_iou"] >= 0.95
    assert summary["complete_failure_rate"] == 0.0
    assert summary["ssim"] > 0.9 and summary["feature_similarity"] > 0.9
    assert json.loads((tmp_path / "report.json").read_text())["summary"] == summary
    links = page_links(tmp_path)
    assert len(links) == 4 * 6 and all(link.is_file() for link in links)


def test_tiny_models_run_end_to_end(tmp_path, tiny_models):
    parser = argparse.ArgumentParser()
    add_eval_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args([
        "eval", "--synthetic", "2", "--out", str(out), "--models", str(tiny_models), "--iou-floor", "0.4", "-q",
        *[f"--set={s}" for s in ("grounder=gdino_sam", "tagger=clip", "num_inference_steps=2", "max_passes=2",
                                 "device=cpu")],
    ])
    assert args.func(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["rows"] == 2 and report["summary"]["iou_floor"] == 0.4
    assert [row["name"] for row in report["rows"]] == ["row00000", "row00001"]
    for row in report["rows"]:
        assert row["failure"] == (row.get("iou", 0.0) < 0.4)
    links = page_links(out)
    assert len(links) >= 2 * 2 and all(link.is_file() for link in links)


def textured_sample() -> Sample:
    rng = np.random.default_rng(0)
    height, width = 96, 128
    gy, gx = np.mgrid[0:height, 0:width]
    original = np.stack([gx * 2, gy * 2, (gx + gy) % 256], axis=2).astype(np.int64)
    original = np.clip(original + rng.integers(-30, 30, original.shape), 0, 255).astype(np.uint8)
    full = shape_mask({"kind": "disc", "cx": 64, "cy": 48, "rx": 36, "ry": 30}, height, width)
    occluder = shape_mask({"kind": "rect", "cx": 90, "cy": 48, "rx": 20, "ry": 40}, height, width)
    image = original.copy()
    image[occluder] = (0, 0, 255)
    return Sample("row", "ball", image, original, full, occluder)


def write_result(folder: Path, rgba: np.ndarray, x: int, y: int) -> Path:
    folder.mkdir()
    (folder / "amodal_completion.png").write_bytes(encode_png(rgba))
    (folder / "amodal_mask.png").write_bytes(encode_png(np.where(rgba[..., 3] > 0, 255, 0).astype(np.uint8)))
    (folder / "offsets.json").write_text(json.dumps({"x": x, "y": y, "width": rgba.shape[1], "height": rgba.shape[0]}))
    return folder


def test_true_hidden_pixels_score_perfectly_and_scrambled_ones_worse(tmp_path, scorer):
    sample = textured_sample()
    rgba = np.dstack([sample.original, np.where(sample.full, 255, 0).astype(np.uint8)])
    exact = scorer.score(sample, Prediction.from_folder(write_result(tmp_path / "a", rgba, 0, 0), sample.full.shape))
    assert exact["iou"] == 1.0
    assert exact["ssim"] == pytest.approx(1.0)
    assert exact["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert exact["feature_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= exact["clip_score"] <= 100.0

    scrambled = rgba.copy()
    hidden = np.argwhere(sample.hidden)
    shuffled = hidden[np.random.default_rng(1).permutation(len(hidden))]
    scrambled[hidden[:, 0], hidden[:, 1], :3] = rgba[shuffled[:, 0], shuffled[:, 1], :3]
    worse = scorer.score(sample, Prediction.from_folder(write_result(tmp_path / "b", scrambled, 0, 0), sample.full.shape))
    assert worse["iou"] == 1.0
    assert worse["ssim"] < exact["ssim"] - 0.3
    assert worse["lpips"] > exact["lpips"] + 1e-3
    assert worse["feature_similarity"] < exact["feature_similarity"]


def test_a_result_is_placed_by_its_offsets_and_pixels_past_the_frame_count_against_it(tmp_path):
    full = np.zeros((20, 30), bool)
    full[0:10, 0:10] = True
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 3] = 255  # a 10 x 20 result whose left half lies past the frame's left border
    prediction = Prediction.from_folder(write_result(tmp_path / "r", rgba, -10, 0), full.shape)
    np.testing.assert_array_equal(prediction.mask, full)
    assert prediction.area == 200
    assert amodal_iou(prediction, full) == pytest.approx(100 / 200)


def test_coco_objects_decode_polygons_and_rle_and_take_occluders_from_each_other(tmp_path):
    from pycocotools import mask as rle

    height, width = 120, 160
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(encode_png(pixels))
    first, second = np.zeros((height, width), bool), np.zeros((height, width), bool)
    first[20:70, 20:80] = True
    second[50:100, 90:140] = True
    encoded = rle.encode(np.asfortranarray(second.astype(np.uint8)))
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 3000, "bbox": [20, 20, 60, 50],
         "segmentation": [[20, 20, 80, 20, 80, 70, 20, 70]]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 2500, "bbox": [90, 50, 50, 50],
         "segmentation": {"size": [height, width], "counts": encoded["counts"].decode()}},
    ]
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}],
            "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "book"}], "annotations": annotations}
    (tmp_path / "coco.json").write_text(json.dumps(coco))

    objects = coco_objects(tmp_path / "coco.json", tmp_path)
    assert [o.label for o in objects] == ["cup", "book"]
    np.testing.assert_array_equal(objects[0].mask, first)
    np.testing.assert_array_equal(objects[1].mask, second)
    samples = coco_samples(objects, 2)
    assert sorted(s.label for s in samples) == ["book", "cup"]
    for sample in samples:
        assert 0.15 <= sample.hidden.sum() / sample.full.sum() <= 0.6
        np.testing.assert_array_equal(sample.original, pixels)
        np.testing.assert_array_equal(sample.image[~sample.occluder], pixels[~sample.occluder])
