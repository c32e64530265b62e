"""Scene decomposition (docs/design.md step 2) and occluder aggregation (step 4)."""
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


@dataclass(frozen=True)
class SceneRequest:
    """One image to decompose.

    On the input image ``target`` is the target's visible mask: it counts as covered, so no
    background segment holds it. On an inpainted window ``target`` is ``None``: no background
    segments there, and ``target_class`` gets a detection pass of its own.
    """

    image: np.ndarray
    classes: Sequence[str]
    settings: Settings
    target: np.ndarray | None = None
    target_class: str = ""


def candidate_classes(tags: Sequence[str], query: str) -> list[str]:
    """Tags plus the query, in order, without repeats (the classes G-DINO looks for)."""
    seen: dict[str, None] = {}
    for c in [*tags, query]:
        c = c.strip()
        if c and c.lower() != "background":
            seen.setdefault(c, None)
    return list(seen)


def segment_scenes(requests: Sequence[SceneRequest], detector: Detector, segmenter: BoxSegmenter) -> list[Instances]:
    """For each request, the instances G-DINO + SAM find (at most ``max_instances`` per detection pass,
    best first), then, on input images, the leftover background segments. One call per model."""
    images, prompts, owners = [], [], []
    for i, r in enumerate(requests):
        passes = [list(r.classes)] + ([[r.target_class]] if r.target is None and r.target_class else [])
        for labels in passes:
            images.append(r.image)
            prompts.append(labels)
            owners.append(i)
    found = detector.detect(images, prompts) if images else []
    detections: list[list[Detection]] = [[] for _ in requests]
    for i, ds in zip(owners, found, strict=True):
        detections[i] += sorted(ds, key=lambda d: -d.score)[: requests[i].settings.max_instances]
    masks = segmenter.segment([r.image for r in requests], [[d.box for d in ds] for ds in detections])
    return [_instances(r, ds, ms) for r, ds, ms in zip(requests, detections, masks, strict=True)]


def _instances(request: SceneRequest, detections: Sequence[Detection], masks: Sequence[np.ndarray]) -> Instances:
    kept = [(d.label, m) for d, m in zip(detections, masks) if m.any()]
    labels, masks = [k[0] for k in kept], [k[1] for k in kept]
    if request.target is None:
        return Instances(labels, masks)
    s = request.settings
    covered = union([*masks, request.target], request.image.shape[:2])
    background = background_segments(covered, s.background_erode_radius, s.background_min_area)
    return Instances(labels + [f"background_{k}" for k in range(len(background))], masks + background)


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


def best_match(scene: Instances, current: np.ndarray) -> np.ndarray | None:
    """The instance with the highest IoU with the target's current mask, or ``None`` if none overlaps it
    (the caller keeps the current mask: a lost re-detection never turns something else into the target)."""
    scores = [iou(m, current) for m in scene.masks]
    if not scores or max(scores) == 0:
        return None
    return scene.masks[int(np.argmax(scores))]
