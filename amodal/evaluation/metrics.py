"""Scores of one result against its ground truth.

A result (its RGBA completion placed in the input frame by ``offsets.json``; a folder without one is
no result) is scored on masks:

- ``iou``: its amodal mask against the true amodal mask (result pixels past the frame count as wrong);
- ``hidden_iou``: what it adds to the visible part (its amodal mask less the true visible mask) against
  the true hidden part. Doing nothing (the visible cut-out) scores 0. The failure rule is on it;
- ``repainted``: the fraction of the true hidden part the result covers (alpha over half);

and, where the hidden part's true pixels are known (synthetic pastes), on appearance, over the crop of
:class:`MetricOptions` ``crop``:

- ``ssim``: scikit-image's SSIM map (Gaussian window, sigma ``ssim_sigma``, as Wang et al.) averaged over
  the hidden pixels;
- ``lpips``: torchmetrics' AlexNet LPIPS (the crop scaled up, aspect kept, to ``lpips_min_side`` if smaller);
- ``feature_similarity``: cosine of the two CLIP image embeddings (CLIP model ``clip_model``);
- ``clip_score``: torchmetrics' CLIP score, 100 x max(cosine, 0), of the whole completion (over black) and
  ``clip_prompt`` with the class.

Crops (``crop``): ``context`` (default) is the hidden part's box widened by ``CROP_MARGIN``; outside the
hidden part both images show the true picture, and a hidden pixel the result leaves transparent shows
the inverse of the truth, so leaving a part empty never scores well. ``black`` is the older policy:
black outside the hidden part on both sides and under the result (an empty part of a dark object scores
as the truth).
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
from amodal.evaluation.options import MetricOptions
from amodal.models.lpips import load_lpips
from amodal.errors import UsageError
from amodal.geometry import bbox
from amodal.keys import AMODAL_MASK, COMPLETION, OFFSETS
from amodal.models.clip import Clip
from amodal.models.base import require

FILL = (0, 0, 0)  # under the whole completion for the CLIP score, as the CLIP prompt chooser's cut-outs
CROP_MARGIN = 8  # pixels around the hidden part's box in the context crop


@dataclass(frozen=True)
class Prediction:
    """A result in the input frame."""

    rgba: np.ndarray  # (H, W, 4) uint8, the completion where it falls inside the frame
    mask: np.ndarray  # (H, W) bool, the amodal mask inside the frame
    area: int  # amodal-mask pixels, those past the frame included
    completion: np.ndarray  # the completion over FILL, as written (for the CLIP score)

    @classmethod
    def from_folder(cls, folder: Path | None, shape: tuple[int, int]) -> "Prediction | None":
        """The result in ``folder`` placed in a frame of ``shape``; None where the folder holds no completion
        (no result folder, or one of a row that writes no images)."""
        if folder is None or not (folder / COMPLETION).is_file():
            return None
        rgba = np.asarray(Image.open(folder / COMPLETION).convert("RGBA"))
        mask = np.asarray(Image.open(folder / AMODAL_MASK).convert("L")) > 127
        offsets = json.loads((folder / OFFSETS).read_text())
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


def hidden_iou(prediction: Prediction, sample: Sample) -> float:
    """IoU of what the result adds to the true visible part with the true hidden part."""
    added, hidden = prediction.mask & ~sample.visible, sample.hidden
    inter = int((added & hidden).sum())
    return inter / max(int((added | hidden).sum()), 1)


def repainted(prediction: Prediction, sample: Sample) -> float:
    """The fraction of the true hidden part the result covers (alpha over half)."""
    return float((prediction.rgba[..., 3][sample.hidden] > 127).mean())


def hidden_pair(sample: Sample, prediction: Prediction, options: MetricOptions
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The truth and the result on the crop of ``options.crop`` (at least the SSIM window wide and high),
    and the hidden mask in that crop."""
    margin = CROP_MARGIN if options.crop == "context" else 0
    x0, y0, x1, y1 = bbox(sample.hidden)
    height, width = sample.hidden.shape
    x0, x1 = _widen(x0 - margin, x1 + margin, width, options.ssim_window)
    y0, y1 = _widen(y0 - margin, y1 + margin, height, options.ssim_window)
    hidden = sample.hidden[y0:y1, x0:x1, None]
    true_pixels = sample.original[y0:y1, x0:x1]
    rgba = prediction.rgba[y0:y1, x0:x1]
    if options.crop == "context":
        under = 255 - true_pixels  # what an unpainted hidden pixel shows: the farthest colour from the truth
        truth = true_pixels
        result = np.where(hidden, _over(rgba, under), true_pixels)
    else:
        fill = np.array(FILL, np.uint8)
        truth = np.where(hidden, true_pixels, fill)
        result = np.where(hidden, over_fill(rgba), fill)
    return truth, result, hidden[..., 0]


def _over(rgba: np.ndarray, under: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    return np.round(rgba[..., :3] * alpha + under.astype(np.float32) * (1 - alpha)).astype(np.uint8)


def _widen(lo: int, hi: int, size: int, least: int) -> tuple[int, int]:
    """Clip ``[lo, hi)`` to ``[0, size)`` and grow it to at least ``least`` inside."""
    lo, hi = max(0, lo), min(size, hi)
    missing = max(0, least - (hi - lo))
    lo = max(0, lo - missing // 2)
    return lo, min(size, max(hi, lo + least))


def masked_ssim(truth: np.ndarray, result: np.ndarray, mask: np.ndarray, sigma: float) -> float:
    _, ssim_map = structural_similarity(truth, result, channel_axis=2, data_range=255, full=True,
                                        gaussian_weights=True, sigma=sigma, use_sample_covariance=False)
    return float(ssim_map[mask].mean())


class Scorer:
    """The metric networks (CLIP, LPIPS), the options, and the scores of one result."""

    def __init__(self, clip: Clip, lpips: torch.nn.Module, device: torch.device,
                 options: MetricOptions = MetricOptions()) -> None:
        self.clip = clip
        self.lpips = lpips
        self.device = device
        self.options = options

    @classmethod
    def from_model_dir(cls, model_dir: Path, device: torch.device, options: MetricOptions = MetricOptions()) -> "Scorer":
        """CLIP (``options.clip_model``) and LPIPS from the model folder, in float32 (scores do not depend on
        the pipeline's dtype)."""
        folder = model_dir / options.clip_model
        if not folder.is_dir():
            raise MissingMetricModel(folder)
        clip = Clip.from_pretrained(require(folder), device=device, dtype=torch.float32)
        return cls(clip, load_lpips(model_dir, device), device, options)

    def lpips_distance(self, truth: np.ndarray, result: np.ndarray) -> float:
        pair = torch.from_numpy(np.stack([truth, result])).permute(0, 3, 1, 2).float().div(255).to(self.device)
        scale = self.options.lpips_min_side / min(pair.shape[-2:])
        if scale > 1:
            size = (round(pair.shape[-2] * scale), round(pair.shape[-1] * scale))
            pair = F.interpolate(pair, size=size, mode="bilinear", align_corners=False)
        with torch.inference_mode():
            return float(self.lpips(pair[:1], pair[1:], normalize=True).item())

    def feature_similarity(self, truth: np.ndarray, result: np.ndarray) -> float:
        features = self.clip.image_features([truth, result])
        return float(features[0] @ features[1])

    def clip_score(self, image: np.ndarray, label: str) -> float:
        # torchmetrics' CLIP score formula over the CLIP adapter's embeddings: torchmetrics 1.9's clip_score
        # cannot read the feature outputs of transformers 5's CLIPModel.
        text = self.options.clip_prompt.format(label)
        cosine = float(self.clip.image_features([image])[0] @ self.clip.text_features([text])[0])
        return 100 * max(cosine, 0.0)

    def score(self, sample: Sample, prediction: Prediction) -> dict[str, float]:
        """The row's scores: the mask scores always, the appearance scores where the truth's pixels are known."""
        scores = {"iou": amodal_iou(prediction, sample.full), "hidden_iou": hidden_iou(prediction, sample),
                  "repainted": repainted(prediction, sample)}
        if sample.appearance:
            truth, result, hidden = hidden_pair(sample, prediction, self.options)
            scores.update(ssim=masked_ssim(truth, result, hidden, self.options.ssim_sigma),
                          lpips=self.lpips_distance(truth, result),
                          feature_similarity=self.feature_similarity(truth, result),
                          clip_score=self.clip_score(prediction.completion, sample.label))
        return scores


class MissingMetricModel(UsageError):
    """The metric CLIP model is not in the model folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__(f"no metric CLIP model at {folder}: put openai/{folder.name} there (Hugging Face format), "
                         "or pass --clip-model with another CLIP folder of the model folder (the report records it)")
