"""LISA adapter against the reference implementation, on the tiny random-weight checkpoint.

``fixtures/lisa_parity.json`` holds what the reference LISA code (dvlab-research/LISA, ``model/LISA.py``
and ``chat.py``; its description says how it was run) computed on the checkpoint that
``write_tiny`` writes (deterministic) for one photo and query, fed the prompt's ids followed by
``[SEG]``. Here the same quantities come from the project's code only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amodal.models.lisa import Generation, LisaGrounder, encode_prompt, prompt_text, write_tiny
from amodal.models.registry import LISA_DIR
from tests.lisascript import scripted
from tests.paths import EXAMPLES

IMAGES = EXAMPLES / "images"
PARITY = Path(__file__).parent / "fixtures" / "lisa_parity.json"
CPU = torch.device("cpu")
ATOL = RTOL = 1e-4  # float32, different LLaMA/CLIP implementations (transformers 4.31 there)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(PARITY.read_text())


@pytest.fixture(scope="module")
def image(reference) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / reference["image"]).convert("RGB"))


@pytest.fixture(scope="module")
def grounder(tmp_path_factory) -> LisaGrounder:
    folder = tmp_path_factory.mktemp("models") / LISA_DIR
    write_tiny(folder)
    return LisaGrounder.from_pretrained(folder, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def generation(grounder, image, reference) -> Generation:
    """The answer ``[SEG]``: its hidden state is the one at the prompt's last position, as in the reference."""
    seg, eos = grounder.seg_token_id, grounder.tokenizer.eos_token_id
    with scripted(grounder, [seg, eos]):
        (generation,) = grounder.generate([image], [reference["query"]])
    assert generation.ids.tolist() == [seg, eos]
    return generation


def _close(actual, expected, what: str) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def test_prompt_and_ids_match_the_reference(grounder, reference):
    assert prompt_text(reference["query"]) == reference["prompt"]
    assert encode_prompt(grounder.tokenizer, reference["prompt"]) == reference["prompt_ids"]
    assert grounder.seg_token_id == reference["seg_token_id"]


def test_image_features_match_the_reference(grounder, image, reference):
    assert list(image.shape) == reference["image_shape"]
    features = grounder.image_features([image])[0].double()
    assert list(features.shape) == reference["image_features_shape"]
    flat = features.ravel()
    _close(flat[:: reference["image_features_stride"]], reference["image_features_sample"], "image features")
    np.testing.assert_allclose(flat.sum().item(), reference["image_features_sum"], rtol=RTOL, atol=1e-3)
    np.testing.assert_allclose(flat.abs().sum().item(), reference["image_features_abs_sum"], rtol=RTOL)


def test_seg_prompt_matches_the_reference(grounder, generation, reference):
    _close(generation.hidden[0], reference["hidden"], "hidden state before [SEG]")
    _close(grounder.seg_prompt(generation), reference["embedding"], "[SEG] prompt embedding")


def test_mask_logits_match_the_reference(grounder, generation, image, reference, monkeypatch):
    sam = grounder.sam.model
    captured = {}
    postprocess = sam.postprocess_masks

    def keep_logits(*args, **kwargs):
        captured["logits"] = postprocess(*args, **kwargs)
        return captured["logits"]

    monkeypatch.setattr(sam, "postprocess_masks", keep_logits)
    handle = sam.mask_decoder.register_forward_hook(lambda module, inputs, out: captured.update(low_res=out[0]))
    try:
        (mask,) = grounder.masks_from_generations([image], [generation])
    finally:
        handle.remove()
    assert list(grounder.sam.encode([image])[0].input_size) == reference["sam_input_size"]
    low_res = captured["low_res"][0, 0]
    assert list(low_res.shape) == reference["low_res_logits_shape"]
    _close(low_res.ravel(), reference["low_res_logits"], "low-res mask logits")
    logits = captured["logits"][0, 0].double()
    assert list(logits.shape) == reference["logits_shape"]
    stride = reference["logits_stride"]
    _close(logits[::stride, ::stride].ravel(), reference["logits_sample"], "mask logits")
    for stat in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(getattr(logits, stat)().item(), reference[f"logits_{stat}"], rtol=RTOL, atol=ATOL)
    # pixels within ATOL of the threshold may flip; the rest of the mask is the reference's
    assert mask is not None and mask.shape == image.shape[:2]
    assert abs(int(mask.sum()) - reference["mask_pixels"]) <= reference["near_threshold_pixels"]
