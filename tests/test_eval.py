"""``amodal eval``: rows with known truth, the method run on them beside the reference methods, scores that
move the right way, and a report that says how every number was made."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from amodal.cli.evaluate import evaluate, run_in_process
from amodal.evaluation.generator import (SYNTHETIC_SIZE, Sample, coco_objects, coco_samples, shape_mask, stripes_at,
                                         synthetic_samples)
from amodal.evaluation.metrics import Prediction, Scorer, amodal_iou
from amodal.evaluation.options import MetricOptions
from amodal.evaluation.references import mean_fill, nothing, write_result
from amodal.images import encode_png
from amodal.settings import Settings
from tests.cluster import outside_repository
from tests.flowerproc import AMODAL
from tests.synthetic import BACKGROUND, Oracle, Scene, Shape, colour_mask

METRIC_CLIP = MetricOptions().clip_model


class PerSampleOracle:
    """The stand-in models of ``tests.synthetic``, one scene per synthetic row, picked by the colour most of
    the image has of the rows' targets (every object of a few rows has a colour of its own; stripes and edges
    stay within the colour tolerance). Each scene lists its shapes by label, so the stand-in CLIP's text axes
    are the same in every scene. Inpainting paints the target's true stripes."""

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
        out = []
        for r in requests:
            oracle = self._oracle(r.image)
            target = oracle.scene.shape(r.prompt.removeprefix("a "))
            x0, y0, x1, _ = r.window
            size = r.image.shape[0]
            scale = (x1 - x0) / size
            gx, gy = np.meshgrid(x0 + (np.arange(size) + 0.5) * scale, y0 + (np.arange(size) + 0.5) * scale)
            full = target.mask(x0, y0, size, size, scale=scale)
            painted = r.image.copy()
            painted[r.mask] = BACKGROUND
            painted[r.mask & full] = stripes_at(target.colour, gx, gy)[r.mask & full]
            out.append(painted)
        return out


def oracle_run(samples_by_seed: dict[int, list[Sample]]):
    """Runs the method with each seed's own stand-ins (colours repeat across seeds)."""
    def run(images, annotations, folder, seed):
        return run_in_process(images, annotations, folder, PerSampleOracle(samples_by_seed[seed]), Settings(seed=seed),
                              progress=False)
    return run


def page_links(out: Path) -> list[Path]:
    return [out / src for src in re.findall(r'<img src="([^"]+)"', (out / "index.html").read_text())]


def test_synthetic_rows_know_their_truth():
    fractions = []
    for sample in synthetic_samples(30, seed=3):
        height, width = sample.full.shape
        target, occluder = (shape_mask(d, height, width) for d in sample.shapes)
        np.testing.assert_array_equal(target, sample.full)
        np.testing.assert_array_equal(occluder, sample.occluder)
        fractions.append(sample.hidden_fraction)
        np.testing.assert_array_equal(sample.image[~sample.occluder], sample.original[~sample.occluder])
        # striped: the hidden part is more than one colour, so a flat fill cannot match it
        assert len(np.unique(sample.original[sample.hidden], axis=0)) == 2
    assert 0.1 <= min(fractions) and max(fractions) <= 0.9 and max(fractions) > 0.6


def test_oracle_beats_both_references_over_three_seeds(tmp_path, scorer):
    seeds = {seed: synthetic_samples(5, seed) for seed in (0, 1, 2)}
    report = evaluate(seeds, tmp_path, oracle_run(seeds), scorer, Settings(), None, progress=False)
    ours, nothing_, fill = (report["methods"][m] for m in ("ours", "nothing", "mean_fill"))
    assert ours["failure_rate"]["mean"] == 0.0 and nothing_["failure_rate"]["mean"] == 1.0
    assert nothing_["hidden_iou"]["mean"] == 0.0 and ours["hidden_iou"]["mean"] > 0.9
    assert ours["ssim"]["mean"] > fill["ssim"]["mean"] + 0.2 > nothing_["ssim"]["mean"] + 0.2
    assert ours["lpips"]["mean"] < fill["lpips"]["mean"] and ours["lpips"]["mean"] < nothing_["lpips"]["mean"]
    assert len(ours["ssim"]["seeds"]) == 3 and ours["ssim"]["ci95"] is not None
    assert sum(b["rows"] for b in ours["bins"]) == 15
    assert set(report["flags"]) >= {"runaway_growth", "low_clip_similarity"}
    assert "hidden_iou" in report["failure_rule"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["methods"] == report["methods"]
    assert saved["provenance"]["metrics"] == MetricOptions().to_dict()
    assert re.fullmatch(r"[0-9a-f]{40}", saved["provenance"]["commit"])
    assert saved["provenance"]["version"]
    links = page_links(tmp_path)
    assert len(links) == 4 * 15 and all(link.is_file() for link in links)
    page = (tmp_path / "index.html").read_text()
    assert "mean_fill" in page and "nothing" in page
    assert not re.search(r"\d\.\d{4,}", page)  # rounded figures


def dark_sample(striped: bool = True) -> Sample:
    """A dark disc (striped, or flat near-black), part hidden by a light box."""
    height, width = 96, 128
    full = shape_mask({"kind": "disc", "cx": 64, "cy": 48, "rx": 36, "ry": 30}, height, width)
    occluder = shape_mask({"kind": "rect", "cx": 90, "cy": 48, "rx": 20, "ry": 40}, height, width)
    gx, gy = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    original = np.full((height, width, 3), 200, np.uint8)
    original[full] = stripes_at((20, 20, 20), gx, gy)[full] if striped else (4, 4, 4)
    image = original.copy()
    image[occluder] = (230, 230, 120)
    return Sample("dark", "ball", image, original, full, occluder)


def test_leaving_the_hidden_part_empty_never_scores_well(tmp_path, eval_models):
    """On a flat dark object black crops scored an empty hidden part nearly as the truth; the context crop
    shows an empty pixel as the inverse of the truth."""
    sample = dark_sample(striped=False)
    write_result(tmp_path / "nothing", *nothing(sample))
    write_result(tmp_path / "true", np.where(sample.full[..., None], sample.original, 0), sample.full)
    scores = {}
    for crop in ("context", "black"):
        scorer = Scorer.from_model_dir(eval_models, torch.device("cpu"), MetricOptions(crop=crop))
        scores[crop] = [scorer.score(sample, Prediction.from_folder(tmp_path / name, sample.full.shape))
                        for name in ("nothing", "true")]
    empty, exact = scores["context"]
    assert empty["hidden_iou"] == 0.0 and empty["repainted"] == 0.0 and exact["hidden_iou"] == 1.0
    assert exact["lpips"] == pytest.approx(0.0, abs=1e-6) and exact["ssim"] == pytest.approx(1.0)
    assert empty["ssim"] < 0.2 and empty["lpips"] > 0.05
    assert empty["feature_similarity"] < exact["feature_similarity"] - 0.01
    black_empty = scores["black"][0]
    assert black_empty["lpips"] < empty["lpips"] / 3  # the older policy's blind spot


def test_the_trivial_fill_is_the_visible_hull_in_the_mean_colour():
    sample = dark_sample()
    pixels, mask = mean_fill(sample)
    assert (mask >= sample.visible).all() and mask.sum() > sample.visible.sum()
    added = mask & ~sample.visible
    assert len(np.unique(pixels[added], axis=0)) == 1
    np.testing.assert_array_equal(pixels[sample.visible], sample.image[sample.visible])


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


def write_rgba(folder: Path, rgba: np.ndarray, x: int, y: int) -> Path:
    folder.mkdir()
    (folder / "amodal_completion.png").write_bytes(encode_png(rgba))
    (folder / "amodal_mask.png").write_bytes(encode_png(np.where(rgba[..., 3] > 0, 255, 0).astype(np.uint8)))
    (folder / "offsets.json").write_text(json.dumps({"x": x, "y": y, "width": rgba.shape[1], "height": rgba.shape[0]}))
    return folder


def test_true_hidden_pixels_score_perfectly_and_scrambled_ones_worse(tmp_path, scorer):
    sample = textured_sample()
    rgba = np.dstack([sample.original, np.where(sample.full, 255, 0).astype(np.uint8)])
    exact = scorer.score(sample, Prediction.from_folder(write_rgba(tmp_path / "a", rgba, 0, 0), sample.full.shape))
    assert exact["iou"] == 1.0 and exact["hidden_iou"] == 1.0 and exact["repainted"] == 1.0
    assert exact["ssim"] == pytest.approx(1.0)
    assert exact["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert exact["feature_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= exact["clip_score"] <= 100.0

    scrambled = rgba.copy()
    hidden = np.argwhere(sample.hidden)
    shuffled = hidden[np.random.default_rng(1).permutation(len(hidden))]
    scrambled[hidden[:, 0], hidden[:, 1], :3] = rgba[shuffled[:, 0], shuffled[:, 1], :3]
    worse = scorer.score(sample, Prediction.from_folder(write_rgba(tmp_path / "b", scrambled, 0, 0), sample.full.shape))
    assert worse["iou"] == 1.0
    assert worse["ssim"] < exact["ssim"] - 0.3
    assert worse["lpips"] > exact["lpips"] + 1e-3
    assert worse["feature_similarity"] < exact["feature_similarity"]


def test_a_result_is_placed_by_its_offsets_and_pixels_past_the_frame_count_against_it(tmp_path):
    full = np.zeros((20, 30), bool)
    full[0:10, 0:10] = True
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 3] = 255  # a 10 x 20 result whose left half lies past the frame's left border
    prediction = Prediction.from_folder(write_rgba(tmp_path / "r", rgba, -10, 0), full.shape)
    np.testing.assert_array_equal(prediction.mask, full)
    assert prediction.area == 200
    assert amodal_iou(prediction, full) == pytest.approx(100 / 200)
    assert Prediction.from_folder(tmp_path / "none", full.shape) is None  # a row that wrote no images


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
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [20, 20, 60, 50],
         "segmentation": [[20, 20, 80, 20, 80, 70, 20, 70]]},  # no "area": computed from the mask
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
        assert 0.1 <= sample.hidden_fraction <= 0.9
        np.testing.assert_array_equal(sample.original, pixels)
        np.testing.assert_array_equal(sample.image[~sample.occluder], pixels[~sample.occluder])


def eval_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed ``amodal eval``, run from outside the repository."""
    return subprocess.run([AMODAL, "eval", *args], cwd=outside_repository(), capture_output=True, text=True,
                          timeout=900, env=env)


def test_help_names_every_metric_and_how_to_force_inpainting():
    shown = eval_command("--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    for metric in ("iou", "hidden_iou", "repainted", "ssim", "lpips", "feature_similarity", "clip_score"):
        assert re.search(rf"\b{metric}\b", text), metric
    assert "--set fixed_passes=N" in text and "unoccluded" in text
    assert "clip-vit-large-patch14" in text and "1.5" in text


def test_tiny_models_forced_through_inpainting_and_results_scored_again(tmp_path, eval_models):
    out = tmp_path / "out"
    settings = ("grounder=gdino_sam", "tagger=clip", "num_inference_steps=2", "fixed_passes=1", "device=cpu")
    done = eval_command("--synthetic", "2", "--out", str(out), "--models", str(eval_models), "-q",
                        *[f"--set={s}" for s in settings])
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]["0"]["ours"]
    assert [row["name"] for row in rows] == ["row00000", "row00001"]
    assert {row["status"] for row in rows} == {"completed"}  # inpainting ran: not `unoccluded`
    for row in rows:
        assert row["failure"] == (not row["has_result"] or row["hidden_iou"] < 0.5)
    assert report["provenance"]["weights"] and "missing" not in report["provenance"]["weights"].values()
    assert set(report["provenance"]["metric_weights"]) == {METRIC_CLIP, "lpips"}
    links = page_links(out)
    assert len(links) >= 2 * 2 and all(link.is_file() for link in links)

    # another method's results, laid out as ours (here: the visible cut-outs), scored on the same rows
    scored = tmp_path / "scored"
    again = eval_command("score", "--data", str(out / "seed-0" / "data"), "--results",
                         str(out / "seed-0" / "references" / "nothing"), "--out", str(scored),
                         "--models", str(eval_models), "-q", "--set=device=cpu")
    assert again.returncode == 0, again.stderr
    rescored = json.loads((scored / "report.json").read_text())
    assert rescored["methods"]["ours"]["failure_rate"]["mean"] == 1.0
    assert rescored["methods"]["ours"]["hidden_iou"] == rescored["methods"]["nothing"]["hidden_iou"]


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "1", "--clip-model", "no-such-clip"], "no metric CLIP model at"),
    (["--synthetic", "1", "--clip-prompt", "a photo"], "--clip-prompt must hold {}"),
    (["score", "--data", "/nonexistent"], "eval score needs --data"),
    (["--coco", "x.json"], "--coco needs --images"),
])
def test_bad_eval_arguments_end_in_one_line(tmp_path, eval_models, args, message):
    done = eval_command(*args, "--out", str(tmp_path / "o"), "--models", str(eval_models))
    assert done.returncode == 2
    assert done.stderr.startswith("amodal: ") and message in done.stderr and len(done.stderr.splitlines()) == 1
