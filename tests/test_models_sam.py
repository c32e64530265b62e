"""SAM adapter: tiny random-weight checkpoint in the published state-dict format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import sam_model_registry

from amodal.models.base import MissingCheckpointError
from amodal.models.registry import SAM_FILES
from segment_anything.modeling import image_encoder

from amodal.models import sam
from amodal.models.sam import SamArchitecture, SamSegmenter, infer_architecture, write_tiny
from tests.paths import EXAMPLES

PHOTO = EXAMPLES / "images" / "cat-7875506_640_cat.jpg"
CPU = torch.device("cpu")
BOXES = [(60.0, 40.0, 420.0, 380.0), (300.0, 10.0, 630.0, 200.0), (0.0, 0.0, 640.0, 388.0)]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / SAM_FILES["vit_h"]
    write_tiny(path)
    return path


@pytest.fixture(scope="module")
def segmenter(checkpoint) -> SamSegmenter:
    return SamSegmenter.from_checkpoint(checkpoint, device=CPU, dtype=torch.float32)


def test_tiny_checkpoint_is_a_plain_published_style_state_dict(checkpoint):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["image_encoder.patch_embed.proj.weight"].shape == (32, 3, 16, 16)
    assert state["image_encoder.pos_embed"].shape == (1, 16, 16, 32)  # 256 px input
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (15, 16)  # 8x8 window
    assert state["image_encoder.blocks.1.attn.rel_pos_h"].shape == (31, 16)  # global
    assert "image_encoder.blocks.2.norm1.weight" not in state
    assert state["mask_decoder.iou_token.weight"].shape == (1, 256)
    assert any(k.startswith("prompt_encoder.") for k in state)


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("vit_b", SamArchitecture(768, 12, 12, (2, 5, 8, 11), 14)),
        ("vit_l", SamArchitecture(1024, 24, 16, (5, 11, 17, 23), 14)),
        ("vit_h", SamArchitecture(1280, 32, 16, (7, 15, 23, 31), 14)),
    ],
)
def test_architecture_of_the_published_models_is_inferred(variant, expected):
    with torch.device("meta"):  # shapes only, no memory
        state = sam_model_registry[variant]().state_dict()
    assert infer_architecture(state) == expected


def test_tiny_architecture_is_inferred(checkpoint):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert infer_architecture(state) == SamArchitecture(32, 2, 2, (1,), 8, img_size=256)


@pytest.fixture(scope="module")
def masks(segmenter, image) -> list[np.ndarray]:
    return segmenter.segment([image], [BOXES])[0]


def test_segment_gives_one_bool_mask_per_box_at_image_size(masks, image):
    assert len(masks) == len(BOXES)
    for mask in masks:
        assert mask.dtype == np.bool_
        assert mask.shape == image.shape[:2]
    assert any(m.any() for m in masks)
    assert not np.array_equal(masks[0], masks[1])  # the box prompt changes the mask


def test_segment_is_deterministic_and_independent_of_box_batching(segmenter, image, masks):
    assert all(np.array_equal(a, b) for a, b in zip(masks, segmenter.segment([image], [BOXES])[0]))
    assert np.array_equal(segmenter.segment([image], [BOXES[1:2]])[0][0], masks[1])


@pytest.mark.parametrize("q_size,k_size", [(14, 14), (64, 64), (32, 64), (64, 32)])
def test_relative_positions_match_segment_anythings_own(q_size, k_size):
    table = torch.randn(2 * max(q_size, k_size) - 1, 8)
    expected = sam._host_rel_pos(q_size, k_size, table)
    assert torch.equal(sam.device_rel_pos(q_size, k_size, table), expected)
    assert sam._relative_index(q_size, k_size, CPU) is sam._relative_index(q_size, k_size, CPU)  # built once
    short = torch.randn(9, 8)  # a table to resize first: the original's interpolation
    assert torch.equal(sam.device_rel_pos(q_size, k_size, short), sam._host_rel_pos(q_size, k_size, short))


def test_encoder_features_are_those_of_segment_anythings_own_positions(segmenter, image, monkeypatch):
    assert image_encoder.get_rel_pos is sam.device_rel_pos
    ours = segmenter.encode([image])[0].features
    monkeypatch.setattr(image_encoder, "get_rel_pos", sam._host_rel_pos)
    assert torch.equal(segmenter.encode([image])[0].features, ours)


def test_batched_encoding_matches_single_encoding(segmenter, image):
    other = np.ascontiguousarray(image[:300, :200])
    batched = segmenter.encode([image, other])
    single = segmenter.encode([other])[0]
    assert batched[1].original_size == (300, 200) and batched[1].input_size == (256, 171)
    assert batched[0].features.shape == (1, 256, 16, 16)
    torch.testing.assert_close(batched[1].features, single.features, atol=1e-4, rtol=1e-4)
    box = [(20.0, 30.0, 180.0, 280.0)]
    assert np.array_equal(segmenter.decode(batched[1], box)[0], segmenter.decode(single, box)[0])


def test_images_are_segmented_together_each_with_its_own_boxes(segmenter, image, masks, monkeypatch):
    other = np.ascontiguousarray(image[:300, :200])
    other_box = [(20.0, 30.0, 180.0, 280.0)]
    alone = segmenter.segment([other], [other_box])[0]
    encoded = []
    original = segmenter.encode
    monkeypatch.setattr(segmenter, "encode", lambda images: encoded.append(len(images)) or original(images))
    monkeypatch.setattr("amodal.models.sam.ENCODER_BATCH", 2)
    together = segmenter.segment([image, other, image, other], [BOXES, other_box, [], BOXES[:1]])
    assert encoded == [2, 1]  # images without boxes are not encoded; at most ENCODER_BATCH per call
    assert [len(m) for m in together] == [len(BOXES), 1, 0, 1]
    assert all(np.array_equal(a, b) for a, b in zip(together[0], masks))
    assert np.array_equal(together[1][0], alone[0]) and together[1][0].shape == (300, 200)
    assert together[3][0].shape == (300, 200)


def test_no_boxes_gives_no_masks(segmenter, image):
    assert segmenter.segment([image], [[]]) == [[]]
    assert segmenter.segment([], []) == []


def test_bfloat16_encoder_gives_bool_masks_close_to_float32(checkpoint, image, masks):
    half = SamSegmenter.from_checkpoint(checkpoint, device=CPU, dtype=torch.bfloat16)
    assert half.model.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    for low, full in zip(half.segment([image], [BOXES])[0], masks):
        assert low.dtype == np.bool_ and low.shape == full.shape
        assert (low == full).mean() > 0.95


def test_missing_checkpoint_raises_missing_checkpoint_error(tmp_path):
    with pytest.raises(MissingCheckpointError):
        SamSegmenter.from_checkpoint(tmp_path / SAM_FILES["vit_h"], device=CPU, dtype=torch.float32)


@pytest.mark.parametrize(
    "key", ["mask_decoder.iou_token.weight", "image_encoder.blocks.0.attn.qkv.weight", "image_encoder.pos_embed"]
)
def test_wrong_tensor_shape_names_the_key(checkpoint, tmp_path, key):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        SamSegmenter.from_checkpoint(broken, device=CPU, dtype=torch.float32)


def test_compiled_encoder_is_given_full_batches_only(checkpoint, image, monkeypatch):
    """A compiled encoder has one static shape: short batches are padded, and the padding is dropped."""
    segmenter = SamSegmenter.from_checkpoint(checkpoint, device=CPU, dtype=torch.float32)
    eager = segmenter.encode([image])[0].features
    shapes = []
    segmenter.model.image_encoder.register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape[0]))
    monkeypatch.setattr(segmenter, "compiled", True)
    encoded = segmenter.encode([image, np.ascontiguousarray(image[:300, :200]), image])
    assert shapes == [sam.ENCODER_BATCH] and len(encoded) == 3
    torch.testing.assert_close(encoded[0].features, eager, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="at most"):
        segmenter.encode([image] * (sam.ENCODER_BATCH + 1))


@pytest.mark.slow
def test_compiled_encoder_segments_what_the_eager_one_does(checkpoint, image, segmenter):
    compiled = SamSegmenter.from_checkpoint(checkpoint, device=CPU, dtype=torch.float32, compile_encoder=True)
    assert compiled.compiled and not segmenter.compiled
    other = np.ascontiguousarray(image[:300, :200])
    for images in ([image], [image, other, image]):  # one graph serves both: the batch is padded
        boxes = [BOXES] * len(images)
        for ours, eager in zip(compiled.segment(images, boxes), segmenter.segment(images, boxes)):
            assert all((a == b).mean() > 0.999 for a, b in zip(ours, eager))


def test_encoder_is_compiled_on_cuda_only(checkpoint):
    from amodal.models.registry import ModelSet
    from amodal.settings import Settings

    models = ModelSet(checkpoint.parents[1], Settings(device="cpu", compile_sam=True))  # SAM_FILES: sam/...
    assert not models.segmenter.compiled
