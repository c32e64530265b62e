"""InstaOrder adapter: a tiny random-weight InstaOrderNet_od in the released ``.pth.tar`` format."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet50

from amodal.models.base import MissingCheckpointError
from amodal.models.instaorder import InstaOrder, InstaOrderNet, infer_architecture, write_tiny
from amodal.models.registry import INSTAORDER_FILE
from tests.paths import EXAMPLES

PHOTO = EXAMPLES / "images" / "cat-7875506_640_cat.jpg"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


@pytest.fixture(scope="module")
def masks(image) -> list[np.ndarray]:
    """A target and two overlapping neighbours on the photo."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    target = (yy - 0.55 * h) ** 2 / (0.3 * h) ** 2 + (xx - 0.4 * w) ** 2 / (0.25 * w) ** 2 < 1
    left = (xx < 0.3 * w) & (yy > 0.2 * h)
    top = (yy < 0.35 * h) & (xx > 0.25 * w) & (xx < 0.9 * w)
    return [target, left, top]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / INSTAORDER_FILE
    write_tiny(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint) -> InstaOrder:
    return InstaOrder.from_checkpoint(checkpoint, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def occluders(model, image, masks) -> np.ndarray:
    return model.occluders_of([image], [masks[0]], [masks[1:]])[0]


def test_tiny_checkpoint_has_the_released_layout(checkpoint):
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert {"step", "state_dict"} <= set(saved)
    state = saved["state_dict"]
    assert all(k.startswith("module.") for k in state)
    # ResNet-50's layout at an eighth of its width, one block per stage
    assert state["module.conv1.weight"].shape == (8, 5, 7, 7)
    assert state["module.bn1.running_var"].shape == (8,)
    assert state["module.layer1.0.conv1.weight"].shape == (8, 8, 1, 1)
    assert state["module.layer1.0.downsample.0.weight"].shape == (32, 8, 1, 1)
    assert state["module.layer4.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert "module.layer1.1.conv1.weight" not in state
    assert state["module.fc_occ.weight"].shape == (2, 256)
    assert state["module.fc_occ.bias"].shape == (2,)
    assert state["module.fc_depth.weight"].shape == (3, 256)
    assert not any(k.startswith("module.fc.") for k in state)
    assert infer_architecture({k.removeprefix("module."): v for k, v in state.items()}) == ((1, 1, 1, 1), 8)


def test_full_size_network_is_resnet50_with_five_input_channels_and_two_heads():
    with torch.device("meta"):
        ours = InstaOrderNet().state_dict()
        reference = resnet50().state_dict()
    expected = {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}
    expected.update({
        "conv1.weight": torch.Size([64, 5, 7, 7]),
        "fc_occ.weight": torch.Size([2, 2048]), "fc_occ.bias": torch.Size([2]),
        "fc_depth.weight": torch.Size([3, 2048]), "fc_depth.bias": torch.Size([3]),
    })
    assert {k: v.shape for k, v in ours.items()} == expected
    assert infer_architecture(ours) == ((3, 4, 6, 3), 64)


def test_misshapen_or_foreign_checkpoints_are_refused_by_name(checkpoint, tmp_path):
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["state_dict"]["module.fc_occ.weight"] = torch.zeros(3, 2048)
    torch.save(saved, tmp_path / "bad.pth.tar")
    with pytest.raises(ValueError, match=r"fc_occ\.weight"):
        InstaOrder.from_checkpoint(tmp_path / "bad.pth.tar", device=CPU, dtype=torch.float32)
    torch.save({k.removeprefix("module."): v for k, v in saved["state_dict"].items()}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="state_dict"):
        InstaOrder.from_checkpoint(tmp_path / "bare.pth", device=CPU, dtype=torch.float32)
    with pytest.raises(MissingCheckpointError):
        InstaOrder.from_checkpoint(tmp_path / "absent.pth.tar", device=CPU, dtype=torch.float32)


def _reference_input(image: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray) -> torch.Tensor:
    """One ``[mask_a, mask_b, R, G, B]`` input built step by step as the method describes."""
    rgb = cv2.resize(image, (384, 384), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    rgb = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    a, b = (cv2.resize(m.astype(np.uint8), (384, 384), interpolation=cv2.INTER_NEAREST) for m in (mask_a, mask_b))
    channels = np.concatenate([a[None], b[None], rgb.transpose(2, 0, 1)]).astype(np.float32)
    return torch.from_numpy(channels)[None]


def test_occluders_average_both_directions_of_each_pair(model, image, masks, occluders):
    target, others = masks[0], masks[1:]
    assert occluders.shape == (2,) and occluders.dtype == np.float32
    assert np.all((occluders > 0) & (occluders < 1))
    inputs = [_reference_input(image, a, b) for other in others for a, b in ((other, target), (target, other))]
    with torch.inference_mode():
        sig = torch.sigmoid(model.net(torch.cat(inputs))[0]).reshape(len(others), 2, 2).numpy()
    other_first, target_first = sig[:, 0], sig[:, 1]
    # P(other over target): "first occludes second" with the other first, "second occludes first" with it second
    expected = (other_first[:, 1] + target_first[:, 0]) / 2
    # the two directions are distinct readings, so a swapped convention would be caught
    assert np.abs(other_first[:, 1] - target_first[:, 1]).min() > 1e-5
    np.testing.assert_allclose(occluders, expected, atol=1e-5)


def test_batching_and_repeats_give_the_same_answer(model, image, masks, occluders):
    small_batches = InstaOrder(model.net, device=CPU, dtype=torch.float32, batch_size=3)  # 4 pairs: 3 + 1
    np.testing.assert_allclose(small_batches.occluders_of([image], [masks[0]], [masks[1:]])[0], occluders, atol=1e-5)
    np.testing.assert_array_equal(model.occluders_of([image], [masks[0]], [masks[1:]])[0], occluders)


def test_images_share_the_network_batches(model, image, masks, occluders, monkeypatch):
    flipped = np.ascontiguousarray(image[::-1])
    flipped_masks = [np.ascontiguousarray(m[::-1]) for m in masks]
    alone = model.occluders_of([flipped], [flipped_masks[1]], [[flipped_masks[0], flipped_masks[2]]])[0]
    small_batches = InstaOrder(model.net, device=CPU, dtype=torch.float32, batch_size=3)
    calls = []
    forward = small_batches.net.forward
    monkeypatch.setattr(small_batches.net, "forward", lambda x: calls.append(len(x)) or forward(x))
    together = small_batches.occluders_of(
        [image, image, flipped], [masks[0], masks[0], flipped_masks[1]], [masks[1:], [], [flipped_masks[0], flipped_masks[2]]]
    )
    assert calls == [3, 3, 2]  # 4 + 0 + 4 pairs, 3 at a time across images
    np.testing.assert_allclose(together[0], occluders, atol=1e-5)
    assert together[1].shape == (0,)
    np.testing.assert_allclose(together[2], alone, atol=1e-5)
    assert not np.allclose(together[2], together[0])


def test_occlusion_matrix_holds_every_ordered_pair(model, image, masks, occluders):
    matrix = model.occlusion_matrix(image, masks)
    assert matrix.shape == (3, 3) and matrix.dtype == np.float32
    np.testing.assert_array_equal(np.diag(matrix), 0)
    np.testing.assert_allclose(matrix[1:, 0], occluders, atol=1e-5)  # column 0: who is over the target
    assert not np.allclose(matrix, matrix.T)


def test_bfloat16_runs_close_to_float32(checkpoint, image, masks, occluders):
    half = InstaOrder.from_checkpoint(checkpoint, device=CPU, dtype=torch.bfloat16)
    assert next(half.net.parameters()).dtype == torch.bfloat16
    (result,) = half.occluders_of([image], [masks[0]], [masks[1:]])
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, occluders, atol=0.02)


def test_no_others_and_mismatched_masks(model, image, masks):
    assert model.occluders_of([image], [masks[0]], [[]])[0].shape == (0,)
    assert model.occluders_of([], [], []) == []
    with pytest.raises(ValueError, match="does not match"):
        model.occluders_of([image], [masks[0]], [[masks[1][:-1]]])
    with pytest.raises(ValueError, match="uint8 RGB"):
        model.occluders_of([image.astype(np.float32)], [masks[0]], [masks[1:]])
