"""The plain-noun way in: Grounding DINO boxes the query, SAM masks the best box."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from amodal.models.base import BoxSegmenter, Detector, Grounding


class GdinoSamGrounder:
    """Visible mask of the query: the highest-scoring Grounding DINO box, segmented by SAM."""

    name = "gdino_sam"

    def __init__(self, detector: Detector, segmenter: BoxSegmenter) -> None:
        self.detector = detector
        self.segmenter = segmenter

    def ground(self, image: np.ndarray, query: str) -> Grounding:
        return self.ground_batch([image], [query])[0]

    def ground_batch(self, images: Sequence[np.ndarray], queries: Sequence[str]) -> list[Grounding]:
        """Both models batch across images: one ``detect`` over all queries, one ``segment`` over the best boxes."""
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images for {len(queries)} queries")
        found = self.detector.detect(images, [[q] for q in queries])
        boxed = [i for i, d in enumerate(found) if d]
        best = [[max(found[i], key=lambda d: d.score).box] for i in boxed]
        masks = self.segmenter.segment([images[i] for i in boxed], best) if boxed else []
        groundings = [Grounding(mask=None) for _ in images]
        for i, (mask,) in zip(boxed, masks):
            groundings[i] = Grounding(mask=mask if mask.any() else None)
        return groundings
