"""RAM++ adapter: a tiny random-weight RAM++ in the published ``ram_plus_swin_large_14m.pth`` format."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amodal.models.base import MissingCheckpointError
from amodal.models.ram_plus import TINY, RamPlusTagger, tag_list, tag_thresholds, write_tiny
from amodal.models.ram_plus_net import PUBLISHED, RamPlusNet, checkpoint_state, infer_architecture
from amodal.models.registry import RAM_PLUS_FILE
from tests.paths import EXAMPLES

IMAGES = EXAMPLES / "images"
PARITY = Path(__file__).parent / "fixtures" / "ram_plus_parity.json"
CPU = torch.device("cpu")
PUBLISHED_FILE_BYTES = 3_010_210_801  # ram_plus_swin_large_14m.pth on the Hugging Face hub


def _photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / name).convert("RGB"))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _photo("cat-7875506_640_cat.jpg")


@pytest.fixture(scope="module")
def other_image() -> np.ndarray:
    return _photo("bird-8951872_640_bird.jpg")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / RAM_PLUS_FILE
    write_tiny(path)
    return path


@pytest.fixture(scope="module")
def saved(checkpoint) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tagger(checkpoint) -> RamPlusTagger:
    return RamPlusTagger.from_checkpoint(checkpoint, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def scores(tagger, image) -> np.ndarray:
    return tagger.scores(image)


@pytest.fixture(scope="module")
def other_scores(tagger, other_image) -> np.ndarray:
    return tagger.scores(other_image)


def _with_threshold(tagger: RamPlusTagger, threshold: float | None) -> RamPlusTagger:
    return RamPlusTagger(tagger.net, device=CPU, dtype=torch.float32, threshold=threshold)


def test_tiny_checkpoint_has_the_published_layout(saved):
    assert set(saved) == {"model", "optimizer", "config", "epoch"}
    state = saved["model"]
    assert state["label_embed"].shape == (4585 * 51, 8)  # the full tag list, narrow embeddings
    assert state["reweight_scale"].shape == ()
    assert state["visual_encoder.patch_embed.proj.weight"].shape == (16, 3, 4, 4)
    assert state["visual_encoder.layers.0.blocks.0.mlp.fc1.weight"].shape == (64, 16)
    assert state["visual_encoder.layers.2.blocks.1.attn.relative_position_bias_table"].shape == (121, 2)
    assert state["visual_encoder.layers.0.blocks.0.attn.relative_position_index"].shape == (36, 36)
    assert state["visual_encoder.layers.0.blocks.1.attn_mask"].shape == (256, 36, 36)  # shifted blocks only
    assert "visual_encoder.layers.0.blocks.0.attn_mask" not in state
    assert state["visual_encoder.layers.2.downsample.reduction.weight"].shape == (128, 256)
    assert "visual_encoder.layers.3.downsample.reduction.weight" not in state
    assert state["image_proj.weight"].shape == (8, 128)
    assert state["wordvec_proj.weight"].shape == (32, 8)
    assert state["tagging_head.encoder.layer.1.crossattention.self.key.weight"].shape == (32, 8)
    assert state["tagging_head.encoder.layer.1.output.LayerNorm.weight"].shape == (32,)
    assert state["fc.weight"].shape == (1, 32)
    # the tagging head has no self-attention and no word embeddings
    assert not any(".attention." in k or k.startswith("tagging_head.embeddings") for k in state)
    assert infer_architecture(state) == TINY


def test_full_size_architecture_is_the_published_one():
    with torch.device("meta"):
        state = checkpoint_state(RamPlusNet(PUBLISHED))
    assert infer_architecture(state) == PUBLISHED
    assert state["label_embed"].shape == (233835, 512)
    assert state["visual_encoder.layers.2.blocks.17.attn.relative_position_bias_table"].shape == (529, 24)
    assert state["visual_encoder.layers.0.blocks.1.attn_mask"].shape == (64, 144, 144)
    assert "visual_encoder.layers.3.blocks.1.attn_mask" not in state  # the 12x12 map is one window: no shift
    assert state["image_proj.weight"].shape == (512, 1536)
    assert state["tagging_head.encoder.layer.0.crossattention.self.key.weight"].shape == (768, 512)
    assert state["tagging_head.encoder.layer.0.intermediate.dense.weight"].shape == (3072, 768)
    # the published file is this state dict in float32 plus AdamW's two moments of every trained
    # parameter (all but the frozen label_embed), and a little pickle and config
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    trained = sum(v.numel() for k, v in state.items() if v.is_floating_point() and "attn_mask" not in k) - 233835 * 512
    assert 0 < PUBLISHED_FILE_BYTES - (model_bytes + 2 * 4 * trained) < 1_000_000


def test_every_checkpoint_tensor_is_loaded(tagger, saved):
    net = tagger.net
    assert not any(t.is_meta for t in net.state_dict().values())
    # written back in the published layout, the loaded network is the checkpoint, derived buffers included
    torch.testing.assert_close(checkpoint_state(net), saved["model"], rtol=0, atol=0)
    block = net.visual_encoder.layers[1].blocks[1]
    torch.testing.assert_close(block.mlp[0].weight, saved["model"]["visual_encoder.layers.1.blocks.1.mlp.fc1.weight"])


def test_foreign_or_damaged_checkpoints_are_refused_by_name(saved, tmp_path):
    def load(model: dict):
        torch.save({"model": model}, tmp_path / "bad.pth")
        return RamPlusTagger.from_checkpoint(tmp_path / "bad.pth", device=CPU, dtype=torch.float32)

    state = saved["model"]
    with pytest.raises(ValueError, match=r"image_proj\.weight has shape \(8, 64\), expected \(8, 128\)$"):
        load({**state, "image_proj.weight": torch.zeros(8, 64)})
    with pytest.raises(ValueError, match=r"missing keys tagging_head\.encoder\.layer\.1\.output\.dense\.bias"):
        load({k: v for k, v in state.items() if k != "tagging_head.encoder.layer.1.output.dense.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys text_decoder\.cls\.predictions\.bias"):
        load({**state, "text_decoder.cls.predictions.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="4584 tags .* has 4585"):
        load({**state, "label_embed": state["label_embed"][: 4584 * 51]})
    with pytest.raises(ValueError, match="'model'"):
        torch.save(state, tmp_path / "bare.pth")
        RamPlusTagger.from_checkpoint(tmp_path / "bare.pth", device=CPU, dtype=torch.float32)
    with pytest.raises(MissingCheckpointError):
        RamPlusTagger.from_checkpoint(tmp_path / "absent.pth", device=CPU, dtype=torch.float32)


def test_older_tagging_head_name_loads(saved, tmp_path, tagger):
    renamed = {k.replace("tagging_head.", "vision_multi.", 1): v for k, v in saved["model"].items()}
    torch.save({"model": renamed}, tmp_path / "old.pth")
    old = RamPlusTagger.from_checkpoint(tmp_path / "old.pth", device=CPU, dtype=torch.float32)
    torch.testing.assert_close(old.net.state_dict(), tagger.net.state_dict())


def test_scores_cover_the_tag_list_and_repeat(tagger, image, scores, other_scores):
    assert scores.shape == (4585,) and scores.dtype == np.float32
    assert np.all((scores > 0) & (scores < 1))
    assert scores.std() > 1e-3  # tags are told apart
    np.testing.assert_array_equal(tagger.scores(image), scores)
    assert np.abs(other_scores - scores).max() > 1e-3  # the image matters


def test_thresholds_select_and_order_tags(tagger, scores):
    tags = tag_list()
    assert len(tags) == len(set(tags)) == 4585
    everything = _with_threshold(tagger, 0.0).tags_from_scores(scores)
    assert everything == tags  # in the tag list's order, as the reference joins them
    assert _with_threshold(tagger, 1.0).tags_from_scores(scores) == []
    middle = float(np.median(scores))
    some = _with_threshold(tagger, middle).tags_from_scores(scores)
    assert set(some) == {t for t, s in zip(tags, scores) if s > middle} and 0 < len(some) < 4585
    thresholds = tag_thresholds()
    assert thresholds.shape == (4585,) and thresholds.min() > 0 and thresholds.max() <= 1
    per_tag = _with_threshold(tagger, None)
    np.testing.assert_array_equal(per_tag.thresholds, thresholds)
    lowered = scores + thresholds - 0.6  # per-tag thresholds decide, not one value
    assert set(per_tag.tags_from_scores(lowered)) == {t for t, s in zip(tags, scores) if s > 0.6}
    assert set(tagger.tags_from_scores(scores + 0.25)) == {t for t, s in zip(tags, scores) if s > 0.35}


def _gap_threshold(*score_arrays: np.ndarray) -> float:
    """A threshold keeping ten or more tags of each image, in the widest gap between neighbouring scores."""
    ceiling = min(np.sort(s)[-10] for s in score_arrays)
    below = np.sort(np.concatenate(score_arrays))[::-1]
    below = below[below < ceiling][:200]
    k = int(np.argmax(below[:-1] - below[1:]))
    return float(below[k] + below[k + 1]) / 2


def test_batch_equals_single_calls(tagger, image, other_image, scores, other_scores):
    gap = _with_threshold(tagger, _gap_threshold(scores, other_scores))
    single = [gap.tags_from_scores(scores), gap.tags_from_scores(other_scores)]
    assert single[0] and single[1] and single[0] != single[1]
    assert gap.tag([image]) == single[:1]
    batched = gap.tag([image, other_image])
    # the same tags, in the tag list's order
    index = {t: i for i, t in enumerate(tag_list())}
    for tags, alone in zip(batched, single):
        assert set(tags) == set(alone) and len(tags) == len(alone)
        assert [index[t] for t in tags] == sorted(index[t] for t in tags)
    np.testing.assert_allclose(gap.scores_batch([other_image, image]), [other_scores, scores], atol=1e-6)
    assert tagger.tag([]) == []
    with pytest.raises(ValueError, match="uint8 RGB"):
        tagger.tag([image.astype(np.float32)])


def test_matches_the_reference_implementation(tagger, scores):
    """Scores of the reference code on this same tiny checkpoint and photo (see the fixture's description)."""
    reference = json.loads(PARITY.read_text())
    assert reference["image"] == "cat-7875506_640_cat.jpg"
    np.testing.assert_allclose(scores[reference["indices"]], reference["scores"], rtol=0, atol=1e-5)
    assert list(np.argsort(-scores)[:10]) == reference["top_indices"]
    uniform = _with_threshold(tagger, reference["uniform_threshold"]).tags_from_scores(scores)
    assert sorted(uniform) == sorted(reference["uniform_threshold_tags"]) and len(uniform) > 10
    per_tag = _with_threshold(tagger, None).tags_from_scores(scores)
    assert sorted(per_tag) == sorted(reference["per_tag_threshold_tags"]) and per_tag


def test_bfloat16_runs_close_to_float32(checkpoint, image, scores):
    half = RamPlusTagger.from_checkpoint(checkpoint, device=CPU, dtype=torch.bfloat16)
    assert half.net.label_embed.dtype == torch.bfloat16
    result = half.scores(image)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, scores, atol=0.03)
