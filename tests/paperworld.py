"""Deterministic stand-ins for every model of the method, shared by the paper's code and ours.

A :class:`World` sees an image as regions of palette colours: a pixel belongs to the class whose colour is
nearest (within ``tolerance``). From that label map it answers as each model would, on any image (an input,
a working window, the inpainter's output), so the paper's code and ours can be run on the same scene and
compared call by call:

- tagger (RAM++): the classes present, in palette order, on the image resized to 384 x 384 (bicubic);
- detector (Grounding DINO): one box per connected region of each asked class, ``misses`` left out;
- box segmenter (SAM): the region whose box it is; it fails on no boxes, as the paper's code expects;
- prompt chooser (CLIP): the candidate whose class holds most of the masked image's lit pixels;
- occlusion (InstaOrder): a region is over another it touches when its class is nearer (``depth``);
- inpainter (SD 2): a whole new 512 px image: outside the mask the input with its colours quantised (so
  "the whole window replaced" and "inside the mask only" differ), inside it each pixel takes the colour of
  the nearest unmasked one (so the object grows into what hid it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import hashlib

import cv2
import numpy as np
from PIL import Image

from amodal.models.base import Detection, InpaintRequest

OTHER = -1


@dataclass
class World:
    palette: dict[str, tuple[int, int, int]]
    depth: dict[str, float]
    tolerance: float = 40.0
    min_area: int = 30
    input_shapes: set[tuple[int, int]] = field(default_factory=set)
    misses: set[tuple[str, str]] = field(default_factory=set)  # (class, "input" | "window") never detected
    touching: bool = True  # occlusion only between regions that touch (else any nearer region is over)
    inpaint_log: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    _classified: dict = field(default_factory=dict, repr=False)

    name = "world"

    # ------------------------------------------------------------------ the label map
    @property
    def labels(self) -> list[str]:
        return list(self.palette)

    def classify(self, image: np.ndarray) -> np.ndarray:
        """Per pixel, the index of the nearest palette class within the tolerance, else ``OTHER`` (kept for
        the last images seen: the same image is asked about many times)."""
        key = (image.shape, hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest())
        if key not in self._classified:
            if len(self._classified) > 8:
                self._classified.clear()
            self._classified[key] = self._classify(image)
        return self._classified[key]

    def _classify(self, image: np.ndarray) -> np.ndarray:
        colours = np.array(list(self.palette.values()), np.int32)
        distance = np.abs(image[:, :, None, :3].astype(np.int32) - colours[None, None]).max(axis=3)
        nearest = distance.argmin(axis=2)
        return np.where(distance.min(axis=2) < self.tolerance, nearest, OTHER)

    def regions(self, image: np.ndarray, label: str) -> list[np.ndarray]:
        """The connected regions of a class, in OpenCV's order, of at least ``min_area`` pixels."""
        if label not in self.palette:
            return []
        mask = (self.classify(image) == self.labels.index(label)).astype(np.uint8)
        count, ids, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        return [ids == k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= self.min_area]

    def class_of(self, image: np.ndarray, mask: np.ndarray) -> str | None:
        """The class holding most of a mask's pixels (``None``: most are of no class of the palette)."""
        classes = self.classify(image)[mask] + 1  # OTHER counts as 0
        if not len(classes):
            return None
        top = int(np.bincount(classes).argmax())
        return self.labels[top - 1] if top else None

    def where(self, image: np.ndarray) -> str:
        return "input" if image.shape[:2] in self.input_shapes else "window"

    # ------------------------------------------------------------------ the models
    def tags(self, image: np.ndarray) -> list[str]:
        small = np.asarray(Image.fromarray(image).resize((384, 384), Image.BICUBIC))
        return [label for label in self.labels if self.regions(small, label)]

    def detect_one(self, image: np.ndarray, classes: Sequence[str]) -> list[tuple[str, tuple[int, int, int, int]]]:
        where = self.where(image)
        out = []
        for label in classes:
            if (label, where) in self.misses:
                continue
            for region in self.regions(image, label):
                ys, xs = np.nonzero(region)
                out.append((label, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
        return out

    def segment_one(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        for label in self.labels:
            for region in self.regions(image, label):
                ys, xs = np.nonzero(region)
                if (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) == (x0, y0, x1, y1):
                    return region
        mask = np.zeros(image.shape[:2], bool)
        mask[y0:y1, x0:x1] = True
        return mask

    def features(self, image: np.ndarray) -> np.ndarray:
        """A CLIP-like image feature: the share of the lit pixels of each class, and of other colours (last)."""
        lit = image.max(axis=2) > 0
        classes = self.classify(image)[lit]
        counts = [np.count_nonzero(classes == k) for k in range(len(self.labels))]
        vector = np.array([*counts, np.count_nonzero(classes == OTHER)], float)
        return vector / max(np.linalg.norm(vector), 1e-9)

    def text_feature(self, text: str) -> np.ndarray:
        """"a photo of a {c}" (or "a {c}") is class c's axis; any other text the axis of other colours."""
        name = text.removeprefix("a photo of a ").removeprefix("a ")
        vector = np.zeros(len(self.labels) + 1)
        vector[self.labels.index(name) if name in self.labels else len(self.labels)] = 1.0
        return vector

    def choose_one(self, masked: np.ndarray, candidates: Sequence[str]) -> str:
        image = self.features(masked)
        scores = [float(image @ self.text_feature(f"a photo of a {c}")) for c in candidates]
        return candidates[int(np.argmax(scores))]

    def over(self, image: np.ndarray, other: np.ndarray, target: np.ndarray) -> bool:
        """Whether ``other`` is over ``target``: its class is nearer and (with ``touching``) they touch."""
        a, b = self.class_of(image, other), self.class_of(image, target)
        if a is None or b is None or self.depth[a] >= self.depth[b]:
            return False
        return not self.touching or bool((cv2.dilate(other.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)[target].any())

    def inpaint_one(self, image: np.ndarray, mask: np.ndarray, prompt: str) -> np.ndarray:
        self.inpaint_log.append((image.copy(), mask.copy(), prompt))
        out = (image // 8) * 8 + 4
        if mask.any() and not mask.all():
            _, nearest = cv2.distanceTransformWithLabels(mask.astype(np.uint8), cv2.DIST_L2, 5,
                                                         labelType=cv2.DIST_LABEL_PIXEL)
            sources = ~mask
            by_label = np.zeros((nearest.max() + 1, 3), np.uint8)
            by_label[nearest[sources]] = image[sources]
            out[mask] = by_label[nearest[mask]]
        elif mask.all():
            out[:] = self.palette.get(prompt.removeprefix("a "), (128, 128, 128))
        return out.astype(np.uint8)


class OurModels:
    """The world behind the interfaces of ``amodal.models.base`` (what ``ModelSet`` gives the steps)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.grounder = self.tagger = self.detector = self.segmenter = self.prompt_chooser = self
        self.occlusion = self.inpainter = self.clip = self
        self.name = "world"

    def tag(self, images):
        return [self.world.tags(image) for image in images]

    def detect(self, images, labels):
        return [[Detection(label, tuple(map(float, box)), 0.9) for label, box in self.world.detect_one(image, wanted)]
                for image, wanted in zip(images, labels, strict=True)]

    def segment(self, images, boxes):
        return [[self.world.segment_one(image, box) for box in image_boxes]
                for image, image_boxes in zip(images, boxes, strict=True)]

    def choose(self, images, visibles, candidates):
        return [self.world.choose_one(np.where(visible[..., None], image, 0).astype(np.uint8), names)
                for image, visible, names in zip(images, visibles, candidates, strict=True)]

    def occluders_of(self, images, targets, others):
        return [np.array([1.0 if self.world.over(image, m, target) else 0.0 for m in rest])
                for image, target, rest in zip(images, targets, others, strict=True)]

    def image_features(self, images):
        return np.stack([self.world.features(image) for image in images])

    def text_features(self, texts):
        return np.stack([self.world.text_feature(text) for text in texts])

    def inpaint(self, requests: Sequence[InpaintRequest]):
        return [self.world.inpaint_one(r.image, r.mask, r.prompt) for r in requests]
