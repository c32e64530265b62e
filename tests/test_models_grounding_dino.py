"""Grounding DINO adapter: tiny random-weight model in the grounding-dino-tiny folder layout.

Random weights give random boxes, so these tests check the plumbing; thresholds are lowered so
that boxes exist at all.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from amodal.models.base import Detection, MissingCheckpointError
from amodal.models.grounding_dino import (
    GroundingDino,
    chunk_labels,
    match_label,
    normalize_label,
    write_tiny,
)
from amodal.models.registry import GROUNDING_DINO_DIR
from tests.paths import EXAMPLES

PHOTO = EXAMPLES / "images" / "cat-7875506_640_cat.jpg"
CPU = torch.device("cpu")
LABELS = ["cat", "Dog", "tabby cat", "background"]
WORDS = ["cat", "dog", "tree", "car", "person", "the", "mammal"]
# Too many tokens for one prompt of the text encoder.
LONG_LABELS = [f"{a} {b}ish" for a in WORDS for b in ["red", "green", "blue", "small", "large", "striped", "spotted"]]
LONG_LABELS = LONG_LABELS + [f"{w}zz" for w in LONG_LABELS]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / GROUNDING_DINO_DIR
    write_tiny(path)
    return path


@pytest.fixture(scope="module")
def detector(folder) -> GroundingDino:
    return GroundingDino.from_pretrained(folder, device=CPU, dtype=torch.float32, box_threshold=0.0, text_threshold=0.3)


@pytest.fixture(scope="module")
def detections(detector, image) -> list[Detection]:
    return detector.detect([image], [LABELS])[0]


def tiny(folder: Path, **kwargs) -> GroundingDino:
    settings = dict(device=CPU, dtype=torch.float32, box_threshold=0.0, text_threshold=0.3) | kwargs
    return GroundingDino.from_pretrained(folder, **settings)


def count_forwards(detector: GroundingDino) -> list[dict]:
    """The keyword inputs of every forward call of the detector's model from now on."""
    calls: list[dict] = []
    detector.model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


def assert_same_detections(got: Sequence[Detection], want: Sequence[Detection]) -> None:
    assert [d.label for d in got] == [d.label for d in want]
    assert np.allclose([d.box for d in got], [d.box for d in want], rtol=0, atol=1e-3)
    assert np.allclose([d.score for d in got], [d.score for d in want], rtol=0, atol=1e-5)


def test_tiny_folder_has_the_published_layout(folder):
    for name in ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json", "vocab.txt"]:
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "grounding-dino"
    assert config["backbone_config"]["model_type"] == "swin"
    assert config["text_config"]["model_type"] == "bert"
    assert config["max_text_len"] == 256
    vocab = (folder / "vocab.txt").read_text().splitlines()
    # Grounding DINO hard-codes these bert-base-uncased ids.
    assert [vocab[i] for i in (0, 100, 101, 102, 1012, 1029)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", "?"]


def test_tokenizer_covers_any_lowercase_word(detector):
    tokenizer = detector.processor.tokenizer
    ids = tokenizer("Zebra crossing. quokka?")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert ids[0] == 101 and ids[-1] == 102 and 1012 in ids and 1029 in ids
    assert tokenizer.decode(tokenizer("zebra crossing", add_special_tokens=False)["input_ids"]) == "zebra crossing"


def test_detections_are_well_formed(detections, image):
    height, width = image.shape[:2]
    assert detections, "box threshold 0 must keep boxes"
    for d in detections:
        assert isinstance(d, Detection)
        assert d.label in LABELS
        assert all(isinstance(v, float) for v in d.box)
        x0, y0, x1, y1 = d.box
        assert 0.0 <= x0 <= x1 <= width and 0.0 <= y0 <= y1 <= height
        assert 0.0 <= d.score <= 1.0
    scores = [d.score for d in detections]
    assert scores == sorted(scores, reverse=True)


def test_detect_is_deterministic(detector, image, detections):
    assert detector.detect([image], [LABELS]) == [detections]


def test_box_threshold_filters(folder, image, detections):
    cut = float(np.median([d.score for d in detections]))
    strict = GroundingDino.from_pretrained(folder, device=CPU, dtype=torch.float32, box_threshold=cut, text_threshold=0.3)
    kept = strict.detect([image], [LABELS])[0]
    assert len(kept) < len(detections)
    assert all(d.score > cut for d in kept)


def test_only_the_best_queries_are_post_processed(folder, image, detections):
    assert len(detections) > 2
    capped = GroundingDino.from_pretrained(folder, device=CPU, dtype=torch.float32, box_threshold=0.0,
                                           text_threshold=0.3, max_detections=2)
    assert capped.detect([image], [LABELS]) == [detections[:2]]


def test_boxes_without_a_matching_phrase_are_dropped(folder, image):
    # No token can pass a text threshold of 1, so no phrase names any label.
    mute = GroundingDino.from_pretrained(folder, device=CPU, dtype=torch.float32, box_threshold=0.0, text_threshold=1.0)
    assert mute.detect([image], [LABELS]) == [[]]


def test_labels_are_returned_as_given_once_per_normal_form(detector, image):
    [found] = detector.detect([image], [["Cat", "cat.", "CAT"]])
    assert found and {d.label for d in found} == {"Cat"}
    assert detector.detect([image], [[]]) == [[]]
    assert detector.detect([image], [[" ", "."]]) == [[]]
    assert detector.detect([], []) == []


def test_long_label_lists_are_split_to_fit_the_text_encoder(detector, image):
    labels = LONG_LABELS
    prompts = detector.prompts(labels)
    assert len(prompts) > 1
    assert [label for p in prompts for label in p] == [normalize_label(x) for x in labels]
    tokenizer = detector.processor.tokenizer
    for p in prompts:
        assert len(tokenizer(". ".join(p) + ".")["input_ids"]) <= 256
    [found] = detector.detect([image], [labels])
    assert found and all(d.label in labels for d in found)


def test_detect_needs_one_label_list_per_image(detector, image):
    with pytest.raises(ValueError):
        detector.detect([image, image], [LABELS])


@pytest.mark.parametrize("max_detections", [900, 2])  # 2 < num_queries: the top-k must be taken per row
def test_batch_of_mixed_sizes_and_labels_matches_one_image_at_a_time(folder, image, max_detections):
    detector = tiny(folder, max_detections=max_detections)
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    images = [image, image[:300, :300], noise, image[:, ::-1].copy(), np.ascontiguousarray(image[:100].repeat(2, 1))]
    labels = [LABELS, ["cat"], [], LONG_LABELS, ["dog", "tree"]]
    assert len(detector.prompts(LONG_LABELS)) > 1
    shapes = {tuple(detector.processor.image_processor(Image.fromarray(i), return_tensors="pt")["pixel_values"].shape)
              for i, names in zip(images, labels) if names}
    alone = [detector.detect([i], [names])[0] for i, names in zip(images, labels)]
    calls = count_forwards(detector)
    batched = detector.detect(images, labels)
    # One forward per pixel shape: the image without labels costs nothing, the rest of a shape share one.
    assert len(calls) == len(shapes) == 3
    assert len(batched) == len(images) and batched[2] == []
    assert all(alone[i] for i in (0, 1, 3, 4))
    for got, want in zip(batched, alone):
        assert_same_detections(got, want)


def test_rows_are_chunked_by_batch_size(folder, image):
    detector = tiny(folder, batch_size=2)
    images = [np.ascontiguousarray(image[:, 40 * k:40 * k + 400]) for k in range(5)]
    labels = [LABELS, ["cat"], ["tree", "car"], LABELS, ["person"]]
    alone = [detector.detect([i], [names])[0] for i, names in zip(images, labels)]
    calls = count_forwards(detector)
    batched = detector.detect(images, labels)
    assert len(calls) == math.ceil(len(images) / 2)
    assert [len(c["input_ids"]) for c in calls] == [2, 2, 1]
    assert all(alone)
    for got, want in zip(batched, alone):
        assert_same_detections(got, want)


def test_padded_text_rows_match_unpadded_ones(detector, image):
    short, long = ["cat"], LABELS + ["tree", "car", "person"]
    alone = [detector.detect([image], [names])[0] for names in (short, long)]
    calls = count_forwards(detector)
    batched = detector.detect([image, image], [short, long])
    [call] = calls
    assert not call["attention_mask"][0].all() and call["attention_mask"][1].all()  # the short prompt was padded
    assert all(alone)
    for got, want in zip(batched, alone):
        assert_same_detections(got, want)


def test_bfloat16_model_detects(folder, image):
    half = GroundingDino.from_pretrained(folder, device=CPU, dtype=torch.bfloat16, box_threshold=0.0, text_threshold=0.3)
    assert half.model.dtype == torch.bfloat16
    [found] = half.detect([image], [LABELS])
    assert found and all(d.label in LABELS and 0.0 <= d.score <= 1.0 for d in found)


def test_missing_folder_raises_missing_checkpoint_error(tmp_path):
    with pytest.raises(MissingCheckpointError):
        GroundingDino.from_pretrained(
            tmp_path / GROUNDING_DINO_DIR, device=CPU, dtype=torch.float32, box_threshold=0.35, text_threshold=0.35
        )


def test_normalize_label():
    assert normalize_label("  Tabby   Cat. ") == "tabby cat"
    assert normalize_label("st.bernard") == "st bernard"


def test_match_label():
    labels = ["cat", "tabby cat", "traffic light", "dog"]
    assert match_label("cat", labels) == 0
    assert match_label("tabby cat", labels) == 1
    assert match_label("light", labels) == 2  # a part of one label
    assert match_label("cat. dog.", labels) == 0  # spans two labels: the first best one
    assert match_label("tree", labels) is None
    assert match_label("", labels) is None


def test_chunk_labels():
    assert chunk_labels([100, 100, 100], 256) == [range(0, 2), range(2, 3)]
    assert chunk_labels([1] * 10, 256) == [range(0, 10)]
    assert chunk_labels([300, 1], 256) == [range(0, 1), range(1, 2)]
    assert chunk_labels([], 256) == []
    # A prompt of n labels of c tokens is 2 + n * (c + 1) tokens.
    assert chunk_labels([126, 126], 256) == [range(0, 2)]
    assert chunk_labels([126, 127], 256) == [range(0, 1), range(1, 2)]


@pytest.mark.parametrize("threshold", [0.35, 0.05])
def test_post_processing_matches_transformers(detector, threshold):
    """The batched post-processing gives transformers' scores, boxes and phrases, row by row."""
    from types import SimpleNamespace

    rows, queries = 3, 7
    text = detector.processor.tokenizer(["cat. dog.", "person. tree. car.", "the cat."], padding=True,
                                        return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, queries, detector.max_text_len, generator=generator)
    logits[..., text["input_ids"].shape[1]:] = float("-inf")  # as the model pads past the text
    boxes = torch.rand(rows, queries, 4, generator=generator)
    sizes = [(120, 160), (90, 200), (64, 64)]
    want = detector.processor.post_process_grounded_object_detection(
        SimpleNamespace(logits=logits, pred_boxes=boxes), text["input_ids"], threshold=threshold,
        text_threshold=threshold, target_sizes=sizes)
    detector_at = GroundingDino(detector.model, detector.processor, detector.device, detector.dtype,
                                box_threshold=threshold, text_threshold=threshold)
    got = detector_at._post_process(logits, boxes, text["input_ids"], sizes)
    for g, w in zip(got, want, strict=True):
        assert g["scores"].tolist() == w["scores"].tolist()
        assert g["boxes"].tolist() == w["boxes"].tolist()
        assert g["text_labels"] == w["text_labels"]
    assert sum(len(g["scores"]) for g in got) > 0
