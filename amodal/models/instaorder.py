"""InstaOrder (InstaOrderNet_od): pairwise occlusion order of instance masks.

The network is a ResNet-50 (torchvision's ``Bottleneck`` blocks) whose first convolution takes five
channels ``[mask_a, mask_b, R, G, B]``, global average pooling, and two linear heads: ``fc_occ``
(2 logits, read through a sigmoid) and ``fc_depth`` (3 logits). The released
``InstaOrder_InstaOrderNet_od.pth.tar`` is a dict whose ``state_dict`` keys carry the ``module.``
prefix of the training wrapper (``module.conv1.weight`` ``[64, 5, 7, 7]``, ``module.fc_occ.*``, ...).
The number of blocks per stage is read from the ``layerK.N.`` keys and the stem width from
``conv1.weight``, so one loader reads the released network (blocks 3-4-6-3, width 64) and the tiny
test one (one block per stage, width 8).

Occlusion convention (the InstaOrder training labels): for the input ``(mask_a, mask_b)``,
``sigmoid(o_ab)[1]`` is the probability that ``a`` occludes ``b`` and ``sigmoid(o_ab)[0]`` that
``b`` occludes ``a``. Each pair runs both ways and the two readings are averaged:

    P(i over j) = (sigmoid(o_ij)[1] + sigmoid(o_ji)[0]) / 2

Inputs: masks as 0/1 floats resized to 384x384 (nearest), RGB / 255 resized to 384x384 (bicubic,
aspect not kept) and normalised with the ImageNet mean and std.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

from amodal.models.base import require

INPUT_SIZE = 384
IN_CHANNELS = 5  # mask_a, mask_b, R, G, B
RESNET50_LAYERS = (3, 4, 6, 3)
TINY_LAYERS = (1, 1, 1, 1)
TINY_WIDTH = 8
PREFIX = "module."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InstaOrderNet(nn.Module):
    """InstaOrderNet_od: a 5-channel-input ResNet with an occlusion head and a depth head.

    Built from torchvision's ``Bottleneck`` blocks with torchvision ResNet's module names, so its
    state dict is that of the released network. ``width`` is the stem's channel count (64 for
    ResNet-50; stage ``k`` has ``width * 2**k`` bottleneck channels and 4x that at its output).
    """

    def __init__(self, layers: Sequence[int] = RESNET50_LAYERS, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(IN_CHANNELS, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = width
        for k, blocks in enumerate(layers):
            planes = width * 2**k
            setattr(self, f"layer{k + 1}", _stage(channels, planes, blocks, stride=1 if k == 0 else 2))
            channels = planes * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc_occ = nn.Linear(channels, 2)
        self.fc_depth = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, 5, H, W)`` -> occlusion logits ``(B, 2)`` and depth logits ``(B, 3)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc_occ(x), self.fc_depth(x)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage: a projecting ``Bottleneck`` and ``blocks - 1`` more."""
    out = planes * Bottleneck.expansion
    downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    return nn.Sequential(
        Bottleneck(inplanes, planes, stride, downsample), *(Bottleneck(out, planes) for _ in range(blocks - 1))
    )


def infer_architecture(state: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """Blocks per stage (from the ``layerK.N.`` keys) and stem width of an unprefixed state dict."""
    stem = state.get("conv1.weight")
    if stem is None or stem.ndim != 4:
        raise ValueError("not an InstaOrderNet_od checkpoint: no 4-d conv1.weight")
    blocks: dict[int, set[int]] = {k: set() for k in range(1, 5)}
    for key in state:
        if m := re.match(r"layer([1-4])\.(\d+)\.", key):
            blocks[int(m.group(1))].add(int(m.group(2)))
    missing = [f"layer{k}.0.*" for k, ids in blocks.items() if not ids]
    if missing:
        raise ValueError(f"not an InstaOrderNet_od checkpoint: no {', '.join(missing)} keys")
    return tuple(max(ids) + 1 for ids in blocks.values()), stem.shape[0]


def load_network(checkpoint: Mapping) -> InstaOrderNet:
    """Build the network from the released checkpoint dict; a missing, unknown or misshapen key is named."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError("not an InstaOrderNet_od checkpoint: expected a dict with a 'state_dict' entry")
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    net = InstaOrderNet(*infer_architecture(state))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"not an InstaOrderNet_od checkpoint: {err}") from None
    return net.eval()


def _check_inputs(image: np.ndarray, masks: Sequence[np.ndarray]) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    for mask in masks:
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask of shape {mask.shape} does not match the image's {image.shape[:2]}")


class InstaOrder:
    """Pairwise occlusion order with InstaOrderNet_od (implements ``OcclusionModel``)."""

    name = "instaorder"

    def __init__(self, net: InstaOrderNet, device: torch.device, dtype: torch.dtype, batch_size: int = 64) -> None:
        # channels-last convolutions: about 15% faster on a Hopper GPU in bf16
        self.net = net.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    @classmethod
    def from_checkpoint(
        cls, path: Path, device: torch.device, dtype: torch.dtype, batch_size: int = 64
    ) -> InstaOrder:
        checkpoint = torch.load(require(Path(path)), map_location="cpu", weights_only=True)
        try:
            net = load_network(checkpoint)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return cls(net, device=device, dtype=dtype, batch_size=batch_size)

    def _rgb(self, image: np.ndarray) -> torch.Tensor:
        """The normalised ``(3, 384, 384)`` image input."""
        resized = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_CUBIC)
        rgb = torch.from_numpy(resized).to(self.device).permute(2, 0, 1).float() / 255.0
        return ((rgb - self._mean) / self._std).to(self.dtype)

    def _masks(self, masks: Sequence[np.ndarray]) -> torch.Tensor:
        """The ``(N, 384, 384)`` 0/1 mask inputs."""
        resized = [
            cv2.resize(m.astype(np.uint8), (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_NEAREST) for m in masks
        ]
        return torch.from_numpy(np.stack(resized)).to(self.device, self.dtype)

    def pair_probabilities(
        self, image: np.ndarray, masks: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]]
    ) -> np.ndarray:
        """``sigmoid(o_ab)`` for each ``(a, b)`` in ``pairs``, shape ``(len(pairs), 2)`` float32.

        Column 1 is "``masks[a]`` occludes ``masks[b]``", column 0 the reverse.
        """
        return self._probabilities([image], [masks], [(0, a, b) for a, b in pairs])

    @torch.inference_mode()
    def _probabilities(
        self, images: Sequence[np.ndarray], masks: Sequence[Sequence[np.ndarray]], pairs: Sequence[tuple[int, int, int]]
    ) -> np.ndarray:
        """``pair_probabilities`` over several images: ``(k, a, b)`` pairs ``masks[k][a]`` with ``masks[k][b]``
        in ``images[k]``; every pair of every image goes through the network ``batch_size`` at a time."""
        for image, image_masks in zip(images, masks, strict=True):
            _check_inputs(image, image_masks)
        if not pairs:
            return np.zeros((0, 2), np.float32)
        rgb = torch.stack([self._rgb(image) for image in images])
        mask_inputs = self._masks([m for image_masks in masks for m in image_masks])
        first = np.cumsum([0, *map(len, masks)])  # each image's first row in mask_inputs
        index = torch.as_tensor([(k, first[k] + a, first[k] + b) for k, a, b in pairs], device=self.device)
        out = []
        for chunk in index.split(self.batch_size):
            batch = torch.cat(
                [mask_inputs[chunk[:, 1], None], mask_inputs[chunk[:, 2], None], rgb[chunk[:, 0]]], dim=1
            ).contiguous(memory_format=torch.channels_last)
            occ_logits, _ = self.net(batch)
            out.append(torch.sigmoid(occ_logits.float()))
        return torch.cat(out).cpu().numpy()

    def occluders_of(
        self, images: Sequence[np.ndarray], targets: Sequence[np.ndarray], others: Sequence[Sequence[np.ndarray]]
    ) -> list[np.ndarray]:
        """For each image, ``P(other_i over target)`` for each of its ``others``, shape ``(N,)`` float32; the
        pairs of all images share the network's batches. Each pair runs both ways (DESIGN step 4)."""
        for image, target, rest in zip(images, targets, others, strict=True):
            _check_inputs(image, [target, *rest])
        jobs = [k for k, rest in enumerate(others) if len(rest)]
        pairs = []
        for slot, k in enumerate(jobs):
            n = len(others[k])
            pairs += [(slot, i, 0) for i in range(1, n + 1)] + [(slot, 0, i) for i in range(1, n + 1)]
        probs = self._probabilities([images[k] for k in jobs], [[targets[k], *others[k]] for k in jobs], pairs)
        out = [np.zeros(0, np.float32) for _ in images]
        at = 0
        for k in jobs:
            n = len(others[k])
            out[k] = (probs[at : at + n, 1] + probs[at + n : at + 2 * n, 0]) / 2
            at += 2 * n
        return out

    def occlusion_matrix(self, image: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
        """``P(i over j)`` for every ordered pair, shape ``(N, N)`` float32, zero diagonal."""
        n = len(masks)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        sig = np.zeros((n, n, 2), np.float32)
        if pairs:
            rows, cols = np.array(pairs).T
            sig[rows, cols] = self.pair_probabilities(image, masks, pairs)
        matrix = (sig[..., 1] + sig[..., 0].T) / 2
        np.fill_diagonal(matrix, 0.0)
        return matrix


def write_tiny(path: Path) -> None:
    """Write a tiny random-weight InstaOrderNet_od (one block per stage, width 8) in the released tar format."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # same weights on every write
        torch.manual_seed(0)
        net = InstaOrderNet(TINY_LAYERS, TINY_WIDTH)
        for module in net.modules():  # ResNet's initialisation, and running statistics as after training
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(std=0.1)
                module.running_var.uniform_(0.5, 1.5)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    state = {PREFIX + k: v for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 0, "state_dict": state, "optimizer": optimizer.state_dict()}, path)
