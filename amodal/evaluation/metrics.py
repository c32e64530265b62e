"""Scores of one result against its ground truth.

A result (its RGBA completion placed in the input frame by ``offsets.json``) is scored on:

- ``iou``: its amodal mask against the true whole mask (result pixels past the frame count as wrong);
- on the hidden part (the true mask under the pasted occluder), against the original pixels: ``ssim``
  (scikit-image's SSIM map averaged over the hidden pixels), ``lpips`` (torchmetrics' AlexNet LPIPS)
  and ``feature_similarity`` (cosine of the two CLIP image embeddings). Both images are the box of the
  hidden part with everything outside it set to ``FILL``; the result's pixels there are its
  completion composited over ``FILL`` by its alpha (so a hidden pixel it left out scores as ``FILL``);
- ``clip_score``: 100 x max(cosine, 0) of the whole completion (over ``FILL``) and
  "a photo of a {class}" (CLIP score's definition).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity

from amodal.evaluation.generator import Sample
from amodal.evaluation.lpips import load_lpips
from amodal.geometry import bbox
from amodal.models.clip import PROMPT_TEMPLATE, Clip
from amodal.models.registry import CLIP_DIR, require

FILL = (0, 0, 0)  # outside the object, as the CLIP prompt chooser's cut-outs
SSIM_WINDOW = 7  # scikit-image's default window; the scored box is at least this big
LPIPS_SIZE = 224  # both images are resized to this square for LPIPS


@dataclass(frozen=True)
class Prediction:
    """A result in the input frame."""

    rgba: np.ndarray  # (H, W, 4) uint8, the completion where it falls inside the frame
    mask: np.ndarray  # (H, W) bool, the amodal mask inside the frame
    area: int  # amodal-mask pixels, those past the frame included
    completion: np.ndarray  # the completion over FILL, as written (for the CLIP score)

    @classmethod
    def from_folder(cls, folder: Path, shape: tuple[int, int]) -> "Prediction":
        rgba = np.asarray(Image.open(folder / "amodal_completion.png").convert("RGBA"))
        mask = np.asarray(Image.open(folder / "amodal_mask.png").convert("L")) > 127
        offsets = json.loads((folder / "offsets.json").read_text())
        frame_rgba = np.zeros((*shape, 4), np.uint8)
        frame_mask = np.zeros(shape, bool)
        x, y = offsets["x"], offsets["y"]
        # the overlap of the result's box with the frame, in both coordinate systems
        fx0, fy0 = max(x, 0), max(y, 0)
        fx1, fy1 = min(x + mask.shape[1], shape[1]), min(y + mask.shape[0], shape[0])
        if fx1 > fx0 and fy1 > fy0:
            frame_rgba[fy0:fy1, fx0:fx1] = rgba[fy0 - y:fy1 - y, fx0 - x:fx1 - x]
            frame_mask[fy0:fy1, fx0:fx1] = mask[fy0 - y:fy1 - y, fx0 - x:fx1 - x]
        return cls(frame_rgba, frame_mask, int(mask.sum()), over_fill(rgba))


def over_fill(rgba: np.ndarray) -> np.ndarray:
    """RGBA composited over ``FILL``."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    return np.round(rgba[..., :3] * alpha + np.array(FILL, np.float32) * (1 - alpha)).astype(np.uint8)


def amodal_iou(prediction: Prediction, full: np.ndarray) -> float:
    inter = int((prediction.mask & full).sum())
    return inter / (prediction.area + int(full.sum()) - inter)


def hidden_pair(sample: Sample, prediction: Prediction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The truth and the result on the hidden part's box (at least ``SSIM_WINDOW`` wide and high), and the
    hidden mask in that box."""
    x0, y0, x1, y1 = bbox(sample.hidden)
    height, width = sample.hidden.shape
    x0, x1 = _widen(x0, x1, width)
    y0, y1 = _widen(y0, y1, height)
    hidden = sample.hidden[y0:y1, x0:x1, None]
    truth = np.where(hidden, sample.original[y0:y1, x0:x1], np.array(FILL, np.uint8))
    result = np.where(hidden, over_fill(prediction.rgba[y0:y1, x0:x1]), np.array(FILL, np.uint8))
    return truth, result, hidden[..., 0]


def _widen(lo: int, hi: int, size: int) -> tuple[int, int]:
    """Grow ``[lo, hi)`` to at least ``SSIM_WINDOW`` inside ``[0, size)``."""
    missing = max(0, SSIM_WINDOW - (hi - lo))
    lo = max(0, lo - missing // 2)
    return lo, min(size, max(hi, lo + SSIM_WINDOW))


def masked_ssim(truth: np.ndarray, result: np.ndarray, mask: np.ndarray) -> float:
    _, ssim_map = structural_similarity(truth, result, channel_axis=2, data_range=255, full=True,
                                        win_size=SSIM_WINDOW)
    return float(ssim_map[mask].mean())


class Scorer:
    """The metric networks (CLIP, LPIPS) and the scores of one result."""

    def __init__(self, clip: Clip, lpips: torch.nn.Module, device: torch.device) -> None:
        self.clip = clip
        self.lpips = lpips
        self.device = device

    @classmethod
    def from_model_dir(cls, model_dir: Path, device: torch.device) -> "Scorer":
        """CLIP and LPIPS from the model folder, in float32 (scores do not depend on the pipeline's dtype)."""
        clip = Clip.from_pretrained(require(model_dir / CLIP_DIR), device=device, dtype=torch.float32)
        return cls(clip, load_lpips(model_dir, device), device)

    def lpips_distance(self, truth: np.ndarray, result: np.ndarray) -> float:
        pair = torch.from_numpy(np.stack([truth, result])).permute(0, 3, 1, 2).float().div(255).to(self.device)
        pair = F.interpolate(pair, size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear", align_corners=False)
        with torch.inference_mode():
            return float(self.lpips(pair[:1], pair[1:], normalize=True).item())

    def feature_similarity(self, truth: np.ndarray, result: np.ndarray) -> float:
        features = self.clip.image_features([truth, result])
        return float(features[0] @ features[1])

    def clip_score(self, image: np.ndarray, label: str) -> float:
        # CLIP score's formula over the CLIP adapter's embeddings: torchmetrics 1.9's clip_score cannot
        # read the feature outputs of transformers 5's CLIPModel.
        cosine = float(self.clip.image_features([image])[0] @ self.clip.text_features([PROMPT_TEMPLATE.format(label)])[0])
        return 100 * max(cosine, 0.0)

    def score(self, sample: Sample, prediction: Prediction) -> dict[str, float]:
        truth, result, hidden = hidden_pair(sample, prediction)
        return {
            "iou": amodal_iou(prediction, sample.full),
            "ssim": masked_ssim(truth, result, hidden),
            "lpips": self.lpips_distance(truth, result),
            "feature_similarity": self.feature_similarity(truth, result),
            "clip_score": self.clip_score(prediction.completion, sample.label),
        }
