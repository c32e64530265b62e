"""RAM++ tagger (``ram_plus_swin_large_14m.pth``): scores the 4585 tags of its list on an image.

Preprocessing is the reference's: the image resized to 384x384 (PIL bilinear, aspect not kept),
scaled to [0, 1] and normalised with the ImageNet mean and std. A tag is kept when its sigmoid
score is above its threshold: one threshold for every tag (the amodal-completion paper runs 0.6),
or the per-tag thresholds of ``ram_tag_list_threshold.txt`` (the reference's default). The
reference deletes no tags for RAM++ (its ``delete_tag_index`` is empty), so none are deleted here.
The network and the checkpoint layout are in ``ram_plus_net``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from amodal.models.ram_plus_net import (
    DESCRIPTIONS, INPUT_SIZE, PUBLISHED, RamPlusArchitecture, RamPlusNet, checkpoint_state, load_network,
)
from amodal.models.base import require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TAG_LIST = "data/ram_tag_list.txt"
TAG_THRESHOLDS = "data/ram_tag_list_threshold.txt"
# Tiny test network: the full tag list and descriptions at a small width, every Swin stage with a
# plain and a shifted block, 16 channels per Swin head (Swin-L has 32).
TINY = RamPlusArchitecture(
    embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 4), windows=(6, 6, 6, 6), mlp_ratio=4.0,
    patch_size=4, width=8, hidden=32, decoder_layers=2, intermediate=64, num_tags=PUBLISHED.num_tags,
)


def _data_lines(name: str) -> list[str]:
    return resources.files("amodal").joinpath(name).read_text(encoding="utf-8").splitlines()


def tag_list() -> list[str]:
    """The 4585 English tags of the published model, in the order of its outputs."""
    return _data_lines(TAG_LIST)


def tag_thresholds() -> np.ndarray:
    """The reference's per-tag thresholds, ``(4585,)`` float32."""
    return np.array([float(line) for line in _data_lines(TAG_THRESHOLDS)], np.float32)


class RamPlusTagger:
    """Image tagging with RAM++ (implements ``Tagger``)."""

    name = "ram_plus"

    def __init__(
        self, net: RamPlusNet, device: torch.device, dtype: torch.dtype, threshold: float | None = 0.6,
        batch_size: int = 8,
    ) -> None:
        self.tags = tag_list()
        if net.arch.num_tags != len(self.tags):
            raise ValueError(
                f"the checkpoint's label_embed holds {net.arch.num_tags} tags ({net.arch.num_tags * DESCRIPTIONS} "
                f"rows of {DESCRIPTIONS} descriptions), the tag list {TAG_LIST} has {len(self.tags)}"
            )
        self.thresholds = tag_thresholds() if threshold is None else np.full(len(self.tags), threshold, np.float32)
        self.net = net.to(device=device, dtype=dtype).eval()
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    @classmethod
    def from_checkpoint(
        cls, path: Path, device: torch.device, dtype: torch.dtype, threshold: float | None = 0.6
    ) -> RamPlusTagger:
        """Load ``ram_plus_swin_large_14m.pth``; ``threshold=None`` keeps the per-tag thresholds."""
        # memory-mapped: the file's optimizer state (over half of it) is never read
        checkpoint = torch.load(require(Path(path)), map_location="cpu", weights_only=True, mmap=True)
        try:
            net = load_network(checkpoint)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return cls(net, device=device, dtype=dtype, threshold=threshold)

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The normalised ``(N, 3, 384, 384)`` input."""
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
        size = (INPUT_SIZE, INPUT_SIZE)
        resized = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR)) for im in images])
        rgb = torch.from_numpy(resized).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return ((rgb - self._mean) / self._std).to(self.dtype)

    @torch.inference_mode()
    def scores_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Sigmoid score of every tag for each image, ``(N, 4585)`` float32."""
        if not images:
            return np.zeros((0, len(self.tags)), np.float32)
        out = [
            torch.sigmoid(self.net(self._pixels(images[i : i + self.batch_size])).float()).cpu()
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out).numpy()

    def scores(self, image: np.ndarray) -> np.ndarray:
        """Sigmoid score of every tag, ``(4585,)`` float32, in the order of ``self.tags``."""
        return self.scores_batch([image])[0]

    def tags_from_scores(self, scores: np.ndarray) -> list[str]:
        """The tags whose score, ``(4585,)``, is above their threshold, in the order of the tag list (as
        the reference's inference joins them)."""
        return [self.tags[i] for i in np.flatnonzero(scores > self.thresholds)]

    def tag(self, images: Sequence[np.ndarray]) -> list[list[str]]:
        """The tags above threshold for each image, in the order of the tag list."""
        return [self.tags_from_scores(scores) for scores in self.scores_batch(images)]


def write_tiny(path: Path) -> None:
    """Write a tiny random-weight RAM++ in the published format: the full tag list at a small width."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # same weights on every write
        torch.manual_seed(0)
        net = RamPlusNet(TINY)
        # text embeddings are unit vectors; norms and biases away from their identity initialisation
        net.label_embed.copy_(torch.nn.functional.normalize(torch.randn_like(net.label_embed), dim=-1))
        for name, param in net.named_parameters():
            if name.endswith("bias") or ".norm" in name or "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    trainable = [p for n, p in net.named_parameters() if n != "label_embed"]  # label_embed is frozen in training
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.05)
    config = {"vit": "swin_l", "image_size": INPUT_SIZE, "class_num": TINY.num_tags, "batch_size": 2}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"model": checkpoint_state(net), "optimizer": optimizer.state_dict(), "config": config, "epoch": 0}
    torch.save(checkpoint, path)
