"""The choices the scores depend on, named (without torch: the command's parser reads their defaults)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CROPS = ("context", "black")  # appearance crops (amodal.evaluation.metrics)


@dataclass(frozen=True)
class MetricOptions:
    """Every choice the scores depend on (recorded in ``report.json``)."""

    clip_model: str = "clip-vit-large-patch14"  # folder in the model folder (HF format); torchmetrics' default
    clip_prompt: str = "{}"  # text of the CLIP score: the class alone, as torchmetrics' clip_score is given
    ssim_sigma: float = 1.5  # Gaussian window of SSIM (Wang et al.; 11 x 11 taps)
    crop: str = "context"  # one of CROPS
    lpips_min_side: int = 64  # LPIPS crops smaller than this are scaled up (aspect kept), never stretched
    hidden_iou_floor: float = 0.5  # a row fails when it has no result or its hidden_iou is under this

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def ssim_window(self) -> int:
        """The window scikit-image uses for ``ssim_sigma`` (truncated at 3.5 sigma); crops are at least this big."""
        return 2 * int(3.5 * self.ssim_sigma + 0.5) + 1
