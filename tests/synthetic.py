"""Synthetic scenes with ground truth, and oracle stand-ins for the models.

Objects are flat-coloured discs and rectangles painted far to near over a plain background, so the
full (amodal) mask, the depth order, the occlusions and the border truncation of every object are
known. The oracles find objects by colour, which also works on inpainted windows, and the oracle
inpainter paints the named object's true shape where it is asked to: running the real loop with them
must recover each object's full mask.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from amodal.geometry import bbox
from amodal.images import encode_png
from amodal.models.base import Detection, Grounding, InpaintRequest

BACKGROUND = (236, 236, 236)
COLOUR_TOLERANCE = 40


@dataclass(frozen=True)
class Shape:
    label: str
    colour: tuple[int, int, int]
    kind: str  # "disc" | "rect"
    cx: float
    cy: float
    rx: float  # radius, or half width
    ry: float  # radius, or half height
    depth: float  # smaller is nearer

    def mask(self, x0: float, y0: float, width: int, height: int, scale: float = 1.0) -> np.ndarray:
        """The full shape on a grid of ``width`` x ``height`` pixels of size ``scale`` from (x0, y0)."""
        xs = x0 + (np.arange(width) + 0.5) * scale
        ys = y0 + (np.arange(height) + 0.5) * scale
        gx, gy = np.meshgrid(xs, ys)
        if self.kind == "disc":
            return ((gx - self.cx) / self.rx) ** 2 + ((gy - self.cy) / self.ry) ** 2 <= 1.0
        return (np.abs(gx - self.cx) <= self.rx) & (np.abs(gy - self.cy) <= self.ry)


@dataclass
class Scene:
    width: int
    height: int
    shapes: list[Shape] = field(default_factory=list)

    def render(self) -> np.ndarray:
        image = np.empty((self.height, self.width, 3), np.uint8)
        image[:] = BACKGROUND
        for s in sorted(self.shapes, key=lambda s: -s.depth):
            image[s.mask(0, 0, self.width, self.height)] = s.colour
        return image

    def shape(self, label: str) -> Shape:
        return next(s for s in self.shapes if s.label == label)

    def visible(self, label: str) -> np.ndarray:
        target = self.shape(label)
        mask = target.mask(0, 0, self.width, self.height)
        for s in self.shapes:
            if s.depth < target.depth:
                mask &= ~s.mask(0, 0, self.width, self.height)
        return mask


def colour_mask(image: np.ndarray, colour: Sequence[int]) -> np.ndarray:
    return np.abs(image.astype(int) - np.array(colour)).max(axis=2) < COLOUR_TOLERANCE


class Oracle:
    """Every model of the method, answered from the scene's ground truth."""

    name = "oracle"

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.calls: dict[str, int] = {}

    # models used by the method, under the names ModelSet gives them
    @property
    def grounder(self): return self
    @property
    def tagger(self): return self
    @property
    def detector(self): return self
    @property
    def segmenter(self): return self
    @property
    def prompt_chooser(self): return self
    @property
    def occlusion(self): return self
    @property
    def inpainter(self): return self
    @property
    def clip(self): return self

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    def _present(self, image: np.ndarray) -> list[Shape]:
        return [s for s in self.scene.shapes if colour_mask(image, s.colour).any()]

    def ground(self, image: np.ndarray, query: str) -> Grounding:
        return self.ground_batch([image], [query])[0]

    def ground_batch(self, images: Sequence[np.ndarray], queries: Sequence[str]) -> list[Grounding]:
        self._count("ground")
        matches = [[s for s in self.scene.shapes if s.label == query] for query in queries]
        return [Grounding(colour_mask(image, match[0].colour) if match else None, "")
                for image, match in zip(images, matches, strict=True)]

    def tag(self, images: Sequence[np.ndarray]) -> list[list[str]]:
        self._count("tag")
        return [[s.label for s in self._present(image)] for image in images]

    def detect(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[str]]) -> list[list[Detection]]:
        self._count("detect")
        return [self._detect(image, wanted) for image, wanted in zip(images, labels, strict=True)]

    def _detect(self, image: np.ndarray, labels: Sequence[str]) -> list[Detection]:
        out = []
        for s in self._present(image):
            if s.label in labels:
                x0, y0, x1, y1 = bbox(colour_mask(image, s.colour))
                out.append(Detection(s.label, (float(x0), float(y0), float(x1), float(y1)), 0.9))
        return out

    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[tuple]]) -> list[list[np.ndarray]]:
        """Each box's mask: the pixels inside it of the shape the box was detected for."""
        self._count("segment")
        return [[self._segment(image, box) for box in image_boxes] for image, image_boxes in zip(images, boxes, strict=True)]

    def _segment(self, image: np.ndarray, box: tuple) -> np.ndarray:
        for s in self._present(image):  # the shape whose box this is
            mask = colour_mask(image, s.colour)
            if tuple(map(float, bbox(mask))) == tuple(map(float, box)):
                return mask
        raise AssertionError(f"no shape has the box {box}")

    def choose(self, images: Sequence[np.ndarray], visibles: Sequence[np.ndarray],
               candidates: Sequence[Sequence[str]]) -> list[str]:
        self._count("choose")
        return [self._choose(image, visible, names) for image, visible, names in zip(images, visibles, candidates, strict=True)]

    def _choose(self, image: np.ndarray, visible: np.ndarray, candidates: Sequence[str]) -> str:
        for s in self._present(np.where(visible[..., None], image, 0)):
            if s.label in candidates:
                return s.label
        return candidates[0]

    def _which(self, image: np.ndarray, mask: np.ndarray) -> Shape | None:
        pixels = image[mask]
        best, count = None, 0
        for s in self.scene.shapes:
            n = int(colour_mask(pixels[None], s.colour).sum())
            if n > count:
                best, count = s, n
        return best if count > 0.5 * len(pixels) else None

    def occluders_of(self, images: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                     others: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        self._count("occlusion")
        return [self._occluders(image, target, rest) for image, target, rest in zip(images, targets, others, strict=True)]

    def _occluders(self, image: np.ndarray, target: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
        t = self._which(image, target)
        probs = []
        for m in others:
            o = self._which(image, m)
            probs.append(1.0 if (o is not None and t is not None and o.depth < t.depth) else 0.0)
        return np.array(probs)

    def image_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """CLIP's interface: per image, the L2-normalised share of its non-black pixels of each shape's
        colour, and of any other colour (last)."""
        self._count("clip")
        out = []
        for image in images:
            lit = image.max(axis=2) > 0
            counts = [np.count_nonzero(colour_mask(image, s.colour) & lit) for s in self.scene.shapes]
            out.append([*counts, np.count_nonzero(lit) - sum(counts)])
        features = np.array(out, float)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-9)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """CLIP's interface: "a {label}" is the shape's axis; any other text the axis of other colours."""
        labels = [s.label for s in self.scene.shapes]
        features = np.zeros((len(texts), len(labels) + 1))
        for row, text in enumerate(texts):
            label = text.removeprefix("a ")
            features[row, labels.index(label) if label in labels else len(labels)] = 1.0
        return features

    def inpaint(self, requests: Sequence[InpaintRequest]) -> list[np.ndarray]:
        """Paint the prompted object's true shape (else plain background) into the masked pixels."""
        self._count("inpaint")
        out = []
        for r in requests:
            target = self.scene.shape(r.prompt.removeprefix("a "))
            x0, y0, x1, _ = r.window
            size = r.image.shape[0]
            full = target.mask(x0, y0, size, size, scale=(x1 - x0) / size)
            painted = r.image.copy()
            painted[r.mask] = BACKGROUND
            painted[r.mask & full] = target.colour
            out.append(painted)
        return out


def occluded_scene() -> Scene:
    """A red disc half hidden by a nearer blue rectangle, nothing at the borders."""
    return Scene(240, 200, [
        Shape("ball", (220, 40, 40), "disc", 100, 100, 45, 45, depth=2),
        Shape("box", (40, 60, 200), "rect", 150, 110, 30, 60, depth=1),
    ])


def truncated_scene() -> Scene:
    """A green disc cut by the left border, and an unrelated yellow rectangle behind nothing."""
    return Scene(240, 200, [
        Shape("melon", (40, 170, 60), "disc", 15, 90, 50, 50, depth=2),
        Shape("book", (230, 200, 40), "rect", 190, 150, 25, 20, depth=3),
    ])


def unoccluded_scene() -> Scene:
    return Scene(240, 200, [Shape("ball", (220, 40, 40), "disc", 120, 100, 40, 40, depth=1)])


def synthetic_dataset(root: Path, count: int = 12, given: int | None = None) -> tuple[Path, Path]:
    """``count`` distinct synthetic rows; the first ``given`` (default half) come with their visible
    mask, the others are grounded from the query. Even rows are cut by the border (always completed)."""
    images = root / "images"
    images.mkdir()
    if count > 2 * 24 * 24:
        raise ValueError(f"at most {2 * 24 * 24} distinct synthetic rows")
    rows = []
    for i in range(count):
        base = occluded_scene() if i % 2 else truncated_scene()
        k = (i // 2) * 7  # a distinct offset per row of each kind (7 is prime to 24 * 24), well spread
        dx, dy = k % 24 - 12, (k // 24) % 24 - 12
        scene = Scene(base.width, base.height, [
            Shape(s.label, s.colour, s.kind, s.cx + dx, s.cy + dy, s.rx, s.ry, s.depth) for s in base.shapes])
        target = scene.shapes[0].label
        (images / f"scene{i:02d}.png").write_bytes(encode_png(scene.render()))
        row = {"image": f"scene{i:02d}.png", "query": target}
        if i < (count // 2 if given is None else given):
            (images / f"scene{i:02d}_mask.png").write_bytes(
                encode_png(np.where(scene.visible(target), 255, 0).astype(np.uint8)))
            row["visible_mask"] = f"scene{i:02d}_mask.png"
        rows.append(row)
    annotations = root / "rows.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return images, annotations


# Stand-ins that fail the way real models do (each one model's miss; the rest stays the oracle).

def is_window(scene: Scene, image: np.ndarray) -> bool:
    """Whether ``image`` is a working window rather than the scene's input image."""
    return image.shape[:2] != (scene.height, scene.width)


class BlindOnWindows(Oracle):
    """The detector never finds ``missed`` on inpainted windows (a lost re-detection)."""

    def __init__(self, scene: Scene, missed: str) -> None:
        super().__init__(scene)
        self.missed = missed

    def _detect(self, image: np.ndarray, labels: Sequence[str]) -> list[Detection]:
        found = super()._detect(image, labels)
        return [d for d in found if not (is_window(self.scene, image) and d.label == self.missed)]


class MissesInCrowd(Oracle):
    """The detector finds ``missed`` only when it is asked for it alone, never among other labels
    (one long joined prompt dilutes a class's recall)."""

    def __init__(self, scene: Scene, missed: str) -> None:
        super().__init__(scene)
        self.missed = missed

    def _detect(self, image: np.ndarray, labels: Sequence[str]) -> list[Detection]:
        found = super()._detect(image, labels)
        return [d for d in found if d.label != self.missed or len(labels) == 1]


class MissesGrounded(Oracle):
    """The detector never finds ``missed`` on the input image (the grounder did), and the occlusion
    model reads heavy overlap as occlusion: a mask holding most of the target is put over it."""

    def __init__(self, scene: Scene, missed: str) -> None:
        super().__init__(scene)
        self.missed = missed

    def _detect(self, image: np.ndarray, labels: Sequence[str]) -> list[Detection]:
        found = super()._detect(image, labels)
        return [d for d in found if is_window(self.scene, image) or d.label != self.missed]

    def _occluders(self, image: np.ndarray, target: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
        probs = super()._occluders(image, target, others)
        overlap = np.array([np.count_nonzero(m & target) / max(np.count_nonzero(target), 1) for m in others])
        return np.where(overlap > 0.5, 1.0, probs)


def border_occluder_scene() -> Scene:
    """A red disc whose lower part is hidden by a nearer blue bar that crosses the bottom border; the
    disc itself reaches past that border under the bar, so its visible part does not touch it."""
    return Scene(240, 200, [
        Shape("ball", (220, 40, 40), "disc", 110, 170, 40, 70, depth=2),
        Shape("bar", (40, 60, 200), "rect", 110, 185, 100, 55, depth=1),
    ])
