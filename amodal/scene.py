"""Scene decomposition (step 2) and occluder aggregation (step 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from amodal.geometry import background_segments, iou, union
from amodal.models.base import BoxSegmenter, Detection, Detector, OcclusionModel
from amodal.settings import Settings


@dataclass
class Instances:
    labels: list[str]
    masks: list[np.ndarray]


def candidate_classes(tags: Sequence[str], query: str) -> list[str]:
    """Tags plus the query, in order, without repeats (the classes G-DINO looks for)."""
    seen: dict[str, None] = {}
    for c in [*tags, query]:
        c = c.strip()
        if c and c.lower() != "background":
            seen.setdefault(c, None)
    return list(seen)


def segment_scenes(
    images: Sequence[np.ndarray], classes: Sequence[Sequence[str]], detector: Detector, segmenter: BoxSegmenter,
    settings: Sequence[Settings],
) -> list[Instances]:
    """For each image, the instances G-DINO + SAM find for its classes (at most its ``max_instances``,
    best first), then the leftover background segments. All images go through each model in one call."""
    found = detector.detect(images, classes)
    detections = [sorted(d, key=lambda d: -d.score)[: s.max_instances] for d, s in zip(found, settings, strict=True)]
    masks = segmenter.segment(images, [[d.box for d in ds] for ds in detections])
    return [_instances(image, ds, ms, s) for image, ds, ms, s in zip(images, detections, masks, settings)]


def _instances(image: np.ndarray, detections: Sequence[Detection], masks: Sequence[np.ndarray],
               settings: Settings) -> Instances:
    kept = [(d.label, m) for d, m in zip(detections, masks) if m.any()]
    labels, masks = [k[0] for k in kept], [k[1] for k in kept]
    covered = union(masks, image.shape[:2])
    background = background_segments(covered, settings.background_erode_radius, settings.background_min_area)
    labels += [f"background_{k}" for k in range(len(background))]
    return Instances(labels, masks + background)


def occluder_mask(
    image: np.ndarray, target: np.ndarray, scene: Instances, model: OcclusionModel, settings: Settings
) -> np.ndarray:
    """Union of the instances the occlusion model puts over the target, minus the target itself.

    Instances that are the target itself (IoU >= ``same_instance_iou``) are not asked about: only
    the 2(N-1) pairs that involve the target are evaluated.
    """
    others = [m for m in scene.masks if iou(m, target) < settings.same_instance_iou]
    out = np.zeros(target.shape, bool)
    if others:
        probs = model.occluders_of(image, target, others)
        for m, p in zip(others, probs):
            if p > settings.occlusion_threshold:
                out |= m
    return out & ~target


def best_match(scene: Instances, visible: np.ndarray) -> np.ndarray:
    """The instance that best overlaps the visible mask, joined with it; the visible mask if none does."""
    scores = [iou(m, visible) for m in scene.masks]
    if not scores or max(scores) == 0:
        return visible.copy()
    return scene.masks[int(np.argmax(scores))] | visible
