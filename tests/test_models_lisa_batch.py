"""LISA grounds many jobs in one call: each row's answer, hidden states and mask are the ones it gets alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from amodal.models.lisa import LisaGrounder, encode_prompt, prompt_text, write_tiny
from amodal.models.registry import LISA_DIR
from tests.lisascript import scripted
from tests.paths import EXAMPLES

CPU = torch.device("cpu")
QUERIES = ["what is the mammal in this image?", "the bird", "segment the thing that a person would sit on, please"]


@pytest.fixture(scope="module")
def grounder(tmp_path_factory) -> LisaGrounder:
    folder = tmp_path_factory.mktemp("models") / LISA_DIR
    write_tiny(folder)
    return LisaGrounder.from_pretrained(folder, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    names = ["cat-7875506_640_cat.jpg", "bird-8951872_640_bird.jpg", "camera-8031914_640_camera.jpg"]
    return [np.asarray(Image.open(EXAMPLES / "images" / n).convert("RGB")) for n in names]


@pytest.fixture(scope="module")
def scripts(grounder) -> list[list[int]]:
    """Answers of different lengths: "the [SEG]", "[SEG]", and "the the" (no mask)."""
    word, seg, eos = (grounder.tokenizer.convert_tokens_to_ids("▁the"), grounder.seg_token_id,
                      grounder.tokenizer.eos_token_id)
    return [[word, seg, eos], [seg, eos], [word, word, eos]]


def test_prompts_of_different_lengths_are_padded_together(grounder):
    lengths = {len(encode_prompt(grounder.tokenizer, prompt_text(q))) for q in QUERIES}
    assert len(lengths) == 3  # so the batch below pads two of its rows


def test_batched_generation_matches_each_row_alone(grounder, images, scripts):
    with scripted(grounder, scripts):
        batch = grounder.generate(images, QUERIES)
    for image, query, script, got in zip(images, QUERIES, scripts, batch):
        with scripted(grounder, [script]):
            (alone,) = grounder.generate([image], [query])
        assert got.ids.tolist() == alone.ids.tolist() == script  # each answer cut at its own end
        torch.testing.assert_close(got.hidden, alone.hidden, atol=1e-4, rtol=1e-4)


def test_batched_grounding_matches_each_row_alone(grounder, images, scripts):
    with scripted(grounder, scripts):
        batch = grounder.ground_batch(images, QUERIES)
    alone = []
    for image, query, script in zip(images, QUERIES, scripts):
        with scripted(grounder, [script]):
            alone.append(grounder.ground(image, query))
    assert [g.text for g in batch] == [g.text for g in alone] == ["the[SEG]", "[SEG]", "the the"]
    assert batch[2].mask is None and alone[2].mask is None
    for got, want, image in zip(batch[:2], alone[:2], images):
        assert got.mask.shape == image.shape[:2] and 0 < want.mask.mean() < 1
        assert np.mean(got.mask != want.mask) < 1e-3  # only pixels at the threshold may flip
    assert not np.array_equal(batch[0].mask[:100, :100], batch[1].mask[:100, :100])


def test_a_batch_is_checked_row_by_row(grounder, images):
    with pytest.raises(ValueError, match="queries"):
        grounder.ground_batch(images, QUERIES[:2])
    with pytest.raises(ValueError, match="empty query"):
        grounder.ground_batch(images[:2], [QUERIES[0], " "])
    assert grounder.ground_batch([], []) == []
