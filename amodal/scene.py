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


def occluder_masks(
    images: Sequence[np.ndarray], targets: Sequence[np.ndarray], scenes: Sequence[Instances], model: OcclusionModel,
    settings: Sequence[Settings],
) -> list[np.ndarray]:
    """For each image, the union of the instances the occlusion model puts over its target, minus the
    target itself; one model call for all images.

    Instances that are the target itself (IoU >= ``same_instance_iou``) are not asked about: only
    the 2(N-1) pairs that involve the target are evaluated.
    """
    others = [[m for m in scene.masks if iou(m, target) < s.same_instance_iou]
              for target, scene, s in zip(targets, scenes, settings, strict=True)]
    out = []
    for target, masks, probs, s in zip(targets, others, model.occluders_of(images, targets, others), settings):
        mask = np.zeros(target.shape, bool)
        for m, p in zip(masks, probs):
            if p > s.occlusion_threshold:
                mask |= m
        out.append(mask & ~target)
    return out


def best_match(scene: Instances, visible: np.ndarray) -> np.ndarray:
    """The instance that best overlaps the visible mask, joined with it; the visible mask if none does."""
    scores = [iou(m, visible) for m in scene.masks]
    if not scores or max(scores) == 0:
        return visible.copy()
    return scene.masks[int(np.argmax(scores))] | visible
