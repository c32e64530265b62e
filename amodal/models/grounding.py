"""The plain-noun way in: Grounding DINO boxes the query, SAM masks the best box."""
from __future__ import annotations

import numpy as np

from amodal.models.base import BoxSegmenter, Detector, Grounding


class GdinoSamGrounder:
    """Visible mask of the query: the highest-scoring Grounding DINO box, segmented by SAM."""

    name = "gdino_sam"

    def __init__(self, detector: Detector, segmenter: BoxSegmenter) -> None:
        self.detector = detector
        self.segmenter = segmenter

    def ground(self, image: np.ndarray, query: str) -> Grounding:
        detections = self.detector.detect([image], [[query]])[0]
        if not detections:
            return Grounding(mask=None)
        best = max(detections, key=lambda d: d.score)
        mask = self.segmenter.segment([image], [[best.box]])[0][0]
        return Grounding(mask=mask if mask.any() else None)
