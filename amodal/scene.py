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
    segments there. ``target_class`` goes through the detector alone as ``class_pass`` says.
    """

    image: np.ndarray
    classes: Sequence[str]
    settings: Settings
    target: np.ndarray | None = None
    target_class: str = ""

    @property
    def class_pass(self) -> bool:
        """Whether ``target_class`` gets a detection pass of its own."""
        if not self.target_class:
            return False
        return self.settings.class_pass == "when_missing" or self.target is None


def _unique(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def _tags_and_query(tags: Sequence[str], query: str) -> list[str]:
    """The tags and the query, never "background" (the classes without ``background_class``)."""
    return _unique([n for n in [*tags, query] if n.strip().lower() != "background"])


def prompt_candidates(tags: Sequence[str], query: str, s: Settings) -> list[str]:
    """The classes CLIP chooses the prompt among: the tags, "background" (with ``background_class``) and the
    query itself, in that order."""
    return _unique([*tags, "background", query]) if s.background_class else _tags_and_query(tags, query)


def detection_classes(tags: Sequence[str], query: str, target_class: str, on_window: bool, s: Settings) -> list[str]:
    """The classes G-DINO looks for together. With ``background_class`` (the paper): the tags and "background",
    on windows also the chosen class; else the tags and the query."""
    if s.background_class:
        return _unique([*tags, "background", *([target_class] if on_window else [])])
    return _tags_and_query(tags, query)


def segment_scenes(requests: Sequence[SceneRequest], detector: Detector, segmenter: BoxSegmenter) -> list[Instances]:
    """For each request, the instances G-DINO + SAM find (with ``max_instances``, at most that many per
    detection pass, best first), then, on input images, the leftover background segments. One call per model.

    The target class's own pass adds its boxes always (``class_pass="windows"``) or only when no box of the
    joint pass is named after it (the paper)."""
    images, prompts, owners = [], [], []
    for i, r in enumerate(requests):
        for labels in [list(r.classes)] + ([[r.target_class]] if r.class_pass else []):
            images.append(r.image)
            prompts.append(labels)
            owners.append(i)
    found = detector.detect(images, prompts) if images else []
    passes: list[list[list[Detection]]] = [[] for _ in requests]
    for i, ds in zip(owners, found, strict=True):
        cap = requests[i].settings.max_instances
        passes[i].append(sorted(ds, key=lambda d: -d.score)[:cap] if cap else list(ds))
    detections = [_joined(r, p) for r, p in zip(requests, passes, strict=True)]
    masks = segmenter.segment([r.image for r in requests], [[d.box for d in ds] for ds in detections])
    return [_instances(r, ds, ms) for r, ds, ms in zip(requests, detections, masks, strict=True)]


def _joined(request: SceneRequest, passes: list[list[Detection]]) -> list[Detection]:
    joint, own = passes[0], passes[1] if len(passes) > 1 else []
    if request.settings.class_pass == "when_missing" and any(d.label == request.target_class for d in joint):
        return joint
    return joint + own


def _instances(request: SceneRequest, detections: Sequence[Detection], masks: Sequence[np.ndarray]) -> Instances:
    kept = [(d.label, m) for d, m in zip(detections, masks) if m.any()]
    labels, masks = [k[0] for k in kept], [k[1] for k in kept]
    if request.target is None:
        return Instances(labels, masks)
    s = request.settings
    covered = union([*masks, request.target], request.image.shape[:2])
    background = background_segments(covered, s.background_erode_radius, s.background_min_area,
                                     s.background_filled)
    return Instances(labels + [f"background_{k}" for k in range(len(background))], masks + background)


@dataclass(frozen=True)
class OcclusionQuery:
    """Whose occluders to find in an image: ``target`` asked about against every instance of ``scene`` but
    its own (``own``, when the target is one of them); the answer leaves out ``exclude``."""

    image: np.ndarray
    target: np.ndarray
    scene: Instances
    exclude: np.ndarray
    own: int | None = None


def occluder_masks(queries: Sequence[OcclusionQuery], model: OcclusionModel,
                   settings: Sequence[Settings]) -> list[np.ndarray]:
    """For each query, the union of the instances the occlusion model puts over its target, minus
    ``exclude``; one model call for all. Only the 2(N-1) pairs that involve the target are evaluated.

    With ``same_instance_iou``, instances at least that close to the target are not asked about either."""
    others = [[m for k, m in enumerate(q.scene.masks)
               if k != q.own and not (s.same_instance_iou and iou(m, q.target) >= s.same_instance_iou)]
              for q, s in zip(queries, settings, strict=True)]
    probabilities = model.occluders_of([q.image for q in queries], [q.target for q in queries], others)
    out = []
    for q, masks, probs, s in zip(queries, others, probabilities, settings, strict=True):
        mask = np.zeros(q.target.shape, bool)
        for m, p in zip(masks, probs):
            if p > s.occlusion_threshold:
                mask |= m
        out.append(mask & ~q.exclude)
    return out


def best_match(scene: Instances, current: np.ndarray) -> int | None:
    """The index of the instance with the highest IoU with the target's current mask (the first of equals),
    or ``None`` if none overlaps it."""
    scores = [iou(m, current) for m in scene.masks]
    if not scores or max(scores) == 0:
        return None
    return int(np.argmax(scores))
