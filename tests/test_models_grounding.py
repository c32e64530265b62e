"""The Grounding DINO + SAM grounder: box choice with stand-ins, then the tiny real models."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from amodal.models import grounding_dino, sam
from amodal.models.base import Detection, Grounding
from amodal.models.grounding import GdinoSamGrounder
from amodal.models.registry import GROUNDING_DINO_DIR, SAM_FILES
from tests.paths import EXAMPLES

PHOTO = EXAMPLES / "images" / "cat-7875506_640_cat.jpg"
CPU = torch.device("cpu")
IMAGE = np.zeros((40, 60, 3), np.uint8)


class StubDetector:
    def __init__(self, detections: list[Detection]) -> None:
        self.detections = detections
        self.calls: list[list[str]] = []

    def detect(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[str]]) -> list[list[Detection]]:
        (image_labels,) = labels
        self.calls.append(list(image_labels))
        return [self.detections]


class BoxFiller:
    """Masks exactly the box (or nothing, when ``empty``)."""

    def __init__(self, empty: bool = False) -> None:
        self.empty = empty
        self.calls: list[list[tuple]] = []

    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[tuple]]) -> list[list[np.ndarray]]:
        (image,), (image_boxes,) = images, boxes
        self.calls.append(list(image_boxes))
        masks = []
        for x0, y0, x1, y1 in image_boxes:
            mask = np.zeros(image.shape[:2], bool)
            if not self.empty:
                mask[int(y0):int(y1), int(x0):int(x1)] = True
            masks.append(mask)
        return [masks]


def test_the_highest_scoring_box_is_segmented():
    detector = StubDetector([
        Detection("cat", (0.0, 0.0, 10.0, 10.0), 0.4),
        Detection("cat", (20.0, 5.0, 50.0, 30.0), 0.9),
        Detection("cat", (1.0, 1.0, 5.0, 5.0), 0.6),
    ])
    segmenter = BoxFiller()
    grounder = GdinoSamGrounder(detector, segmenter)
    result = grounder.ground(IMAGE, "cat")
    assert grounder.name == "gdino_sam"
    assert detector.calls == [["cat"]]
    assert segmenter.calls == [[(20.0, 5.0, 50.0, 30.0)]]
    expected = np.zeros((40, 60), bool)
    expected[5:30, 20:50] = True
    assert result.text == "" and np.array_equal(result.mask, expected)


def test_no_box_means_no_mask_and_no_segmentation():
    segmenter = BoxFiller()
    assert GdinoSamGrounder(StubDetector([]), segmenter).ground(IMAGE, "cat") == Grounding(mask=None)
    assert segmenter.calls == []


def test_an_empty_mask_means_no_mask():
    detector = StubDetector([Detection("cat", (0.0, 0.0, 10.0, 10.0), 0.9)])
    assert GdinoSamGrounder(detector, BoxFiller(empty=True)).ground(IMAGE, "cat").mask is None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    grounding_dino.write_tiny(root / GROUNDING_DINO_DIR)
    sam.write_tiny(root / SAM_FILES["vit_h"])
    detector = grounding_dino.GroundingDino.from_pretrained(
        root / GROUNDING_DINO_DIR, device=CPU, dtype=torch.float32, box_threshold=0.0, text_threshold=0.3
    )
    segmenter = sam.SamSegmenter.from_checkpoint(root / SAM_FILES["vit_h"], device=CPU, dtype=torch.float32)
    return detector, segmenter


def test_tiny_models_ground_the_best_box(models):
    detector, segmenter = models
    image = np.asarray(Image.open(PHOTO).convert("RGB"))
    result = GdinoSamGrounder(detector, segmenter).ground(image, "cat")
    best = detector.detect([image], [["cat"]])[0][0]
    expected = segmenter.segment([image], [[best.box]])[0][0]
    assert expected.any(), "the tiny SAM is written with a fixed seed; its mask here is not empty"
    assert result.mask.dtype == np.bool_ and result.mask.shape == image.shape[:2]
    assert np.array_equal(result.mask, expected)
    detector.text_threshold = 1.0  # no phrase can name the query any more
    try:
        assert GdinoSamGrounder(detector, segmenter).ground(image, "cat") == Grounding(mask=None)
    finally:
        detector.text_threshold = 0.3


def test_a_batch_grounds_each_image_as_it_would_alone(models):
    detector, segmenter = models
    cat = np.asarray(Image.open(PHOTO).convert("RGB"))
    images, queries = [cat, cat[::-1].copy(), cat[:, ::-1].copy()], ["cat", "cat", "dog"]
    grounder = GdinoSamGrounder(detector, segmenter)
    batch = grounder.ground_batch(images, queries)
    alone = [grounder.ground(i, q) for i, q in zip(images, queries)]
    assert len(batch) == 3 and any(g.mask is not None for g in batch)
    for b, a in zip(batch, alone):
        assert (b.mask is None) == (a.mask is None)
        if a.mask is not None:
            assert np.mean(b.mask != a.mask) < 1e-3
    with pytest.raises(ValueError):
        grounder.ground_batch(images, queries[:2])


def test_no_cap_on_instances_keeps_every_query_of_grounding_dino(tiny_models):
    """max_instances 0 (the paper: no cap) post-processes all 900 queries, not none; the preset's cap holds."""
    from amodal.models.registry import ModelSet
    from amodal.settings import Settings

    assert ModelSet(tiny_models, Settings()).detector.max_detections == 900
    assert ModelSet(tiny_models, Settings.preset("robust")).detector.max_detections == 32
