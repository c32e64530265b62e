"""CLIP adapters on a tiny random-weight checkpoint in the published folder format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPTokenizer

from amodal.models.clip import Clip, ClipPromptChooser, ClipTagger, default_vocabulary, write_tiny
from amodal.models.tokenizers import write_tiny_clip_tokenizer
from tests.paths import EXAMPLES

IMAGES = EXAMPLES / "images"
CPU = torch.device("cpu")
COCO = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / name).convert("RGB"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip-vit-base-patch32")
    write_tiny(path)
    return path


@pytest.fixture(scope="module")
def clip(folder) -> Clip:
    return Clip.from_pretrained(folder, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return photo("cat-7875506_640_cat.jpg")


def test_tiny_checkpoint_has_published_layout(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    assert "model.safetensors" in names or "pytorch_model.bin" in names


def test_tiny_tokenizer_loads_through_every_entry_point(tmp_path):
    write_tiny_clip_tokenizer(tmp_path)
    for tokenizer in (CLIPTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        ids = tokenizer("a photo of a Hot-Dog ünï!")["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "photo</w>", "of</w>"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a hot - dog ünï !"


def test_image_features_are_unit_vectors_and_deterministic(clip, cat):
    bird = photo("bird-8951872_640_bird.jpg")
    features = clip.image_features([cat, bird])
    assert features.shape == (2, clip.model.config.projection_dim)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(clip.image_features([bird])[0], features[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features[0], features[1])


def test_text_features_are_cached_per_text(clip):
    batch_sizes = []
    hook = clip.model.text_model.register_forward_hook(lambda m, args, kwargs, out: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        first = clip.text_features(["a photo of a zebra"])
        both = clip.text_features(["a photo of a giraffe", "a photo of a zebra", "a photo of a giraffe"])
    finally:
        hook.remove()
    assert batch_sizes == [1, 1]  # the zebra prompt and the repeated giraffe prompt are encoded once
    assert both.shape == (3, clip.model.config.projection_dim)
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(both[1], first[0])
    torch.testing.assert_close(both[0], both[2])
    assert not torch.allclose(both[0], both[1])


def test_half_precision_matches_float32(folder, clip, cat):
    half = Clip.from_pretrained(folder, device=CPU, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    image = half.image_features([cat])
    text = half.text_features(["a photo of a cat"])
    assert image.dtype == text.dtype == torch.float32
    assert (image @ clip.image_features([cat]).T).item() > 0.99
    assert (text @ clip.text_features(["a photo of a cat"]).T).item() > 0.99


def test_prompt_chooser_scores_the_visible_cutout(clip, cat, monkeypatch):
    visible = np.zeros(cat.shape[:2], bool)
    visible[80:300, 150:450] = True
    seen = []
    original = clip.image_features
    monkeypatch.setattr(clip, "image_features", lambda images: seen.extend(images) or original(images))
    (choice,) = ClipPromptChooser(clip).choose([cat], [visible], [["background", "cat", "dog", "bench", "person"]])
    monkeypatch.undo()
    candidates = ["cat", "dog", "bench", "person"]
    assert choice in candidates
    (cutout,) = seen
    np.testing.assert_array_equal(cutout[visible], cat[visible])
    assert not cutout[~visible].any()
    cosines = clip.image_features([cutout]) @ clip.text_features([f"a photo of a {c}" for c in candidates]).T
    assert choice == candidates[int(cosines.argmax())]


def test_prompt_chooser_never_returns_background(clip, cat):
    visible = np.ones(cat.shape[:2], bool)
    chooser = ClipPromptChooser(clip)
    assert chooser.choose([cat], [visible], [["background", "cat", "Background"]]) == ["cat"]
    with pytest.raises(ValueError):
        chooser.choose([cat], [visible], [[]])
    with pytest.raises(ValueError):
        chooser.choose([cat], [visible], [["background"]])
    with pytest.raises(ValueError):
        chooser.choose([cat], [visible[:10]], [["cat"]])
    assert chooser.choose([], [], []) == []


def test_prompt_chooser_batch_equals_single_calls(clip, cat, monkeypatch):
    chooser = ClipPromptChooser(clip)
    left, right = np.zeros(cat.shape[:2], bool), np.zeros(cat.shape[:2], bool)
    left[:, : cat.shape[1] // 2], right[:, cat.shape[1] // 2 :] = True, True
    jobs = [(cat, left, ["cat", "dog", "bench"]), (cat[::-1].copy(), right, ["person", "car"]), (cat, right, ["cat", "dog", "bench"])]
    single = [chooser.choose([image], [mask], [names])[0] for image, mask, names in jobs]
    calls = []
    original = clip.image_features
    monkeypatch.setattr(clip, "image_features", lambda images: calls.append(len(images)) or original(images))
    assert chooser.choose(*map(list, zip(*jobs))) == single
    assert calls == [3]  # one image-tower call for the batch
    assert single[1] in ("person", "car")


def test_vocabulary_file():
    words = default_vocabulary()
    assert 200 <= len(words) <= 1000
    assert len(set(words)) == len(words)
    assert all(w == w.strip().lower() and w for w in words)
    assert "background" not in words
    assert len(set(COCO)) == 80 and set(COCO) <= set(words)


def test_tagger_returns_vocabulary_words_by_descending_probability(clip, cat):
    tagger = ClipTagger(clip, top_k=10, min_prob=0.0)
    assert tagger.name == "clip" and tagger.vocabulary == default_vocabulary()
    (tags,) = tagger.tag([cat])
    assert len(tags) == 10 and len(set(tags)) == 10 and set(tags) <= set(tagger.vocabulary)
    prompts = [f"a photo of a {w}" for w in tagger.vocabulary]
    probs = (100 * clip.image_features([cat]) @ clip.text_features(prompts).T).softmax(-1)[0]
    expected = [tagger.vocabulary[i] for i in probs.argsort(descending=True)[:10]]
    assert tags == expected
    assert tagger.tag([cat[::-1].copy(), cat])[1] == tags


def test_tagger_threshold_and_vocabulary_dedup(clip, cat):
    assert ClipTagger(clip, min_prob=1.0).tag([cat]) == [[]]
    (default,) = ClipTagger(clip).tag([cat])
    assert len(default) <= 10
    tagger = ClipTagger(clip, vocabulary=["cat", " cat", "dog", "", "cat", "bench"], top_k=5, min_prob=0.0)
    assert tagger.vocabulary == ["cat", "dog", "bench"]
    assert sorted(tagger.tag([cat])[0]) == ["bench", "cat", "dog"]
    assert tagger.tag([]) == []
    with pytest.raises(ValueError):
        ClipTagger(clip, vocabulary=["", " "])
