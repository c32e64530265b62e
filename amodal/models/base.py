"""The interfaces the method needs from its models.

Images are ``uint8`` RGB arrays of shape ``(H, W, 3)``; masks are ``bool`` arrays of shape
``(H, W)``; boxes are ``(x0, y0, x1, y1)`` float pixel coordinates. The scene and occlusion
models take batches (one entry per image, each with its own labels, boxes, candidates or masks), so
a stage serves many jobs in one call. Every adapter in ``amodal.models`` implements one of these
protocols, and test doubles implement the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np


class MissingCheckpointError(FileNotFoundError):
    """A model file is not in the model folder."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"model checkpoint not found: {path} (fetch the published checkpoints with `amodal models download "
            f"DIR`, or write tiny test ones with `amodal models tiny DIR`, and pass --models DIR)"
        )
        self.path = path


def require(path: Path) -> Path:
    """Return ``path`` if it exists, else raise the one clear missing-checkpoint error."""
    if not path.exists():
        raise MissingCheckpointError(str(path))
    return path


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One box found for one text label."""

    label: str
    box: Box
    score: float


@dataclass(frozen=True)
class Grounding:
    """The visible mask a grounding model found for a query (``None`` if nothing matched)."""

    mask: np.ndarray | None
    text: str = ""


@dataclass(frozen=True)
class InpaintRequest:
    """One inpainting call: a 512x512 (or any square) window and what to paint in it.

    ``window`` is where the window lies in the input image's coordinates (it may reach outside
    the image); models ignore it, it is carried for logging and for geometry-aware test doubles.
    """

    image: np.ndarray
    mask: np.ndarray
    prompt: str
    seed: int | None  # None: fresh noise
    window: tuple[int, int, int, int] = (0, 0, 0, 0)


class Grounder(Protocol):
    """Maps a text query to the visible (modal) mask of the target."""

    name: str

    def ground(self, image: np.ndarray, query: str) -> Grounding: ...

    def ground_batch(self, images: Sequence[np.ndarray], queries: Sequence[str]) -> list[Grounding]:
        """One grounding per image and its query, as ``ground`` gives them, in as few model calls as it can."""
        ...


class Tagger(Protocol):
    """Names the things in each image of a batch."""

    name: str

    def tag(self, images: Sequence[np.ndarray]) -> list[list[str]]: ...


class Detector(Protocol):
    """Open-vocabulary box detection: for each image, boxes for its own labels."""

    def detect(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[str]]) -> list[list[Detection]]: ...


class BoxSegmenter(Protocol):
    """Turns boxes into masks (SAM): for each image, one mask per box of its own."""

    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]]) -> list[list[np.ndarray]]: ...


class PromptChooser(Protocol):
    """For each image, the class among its candidates that best describes its visible target (CLIP)."""

    def choose(self, images: Sequence[np.ndarray], visibles: Sequence[np.ndarray],
               candidates: Sequence[Sequence[str]]) -> list[str]: ...


class OcclusionModel(Protocol):
    """Pairwise occlusion order."""

    name: str

    def occluders_of(self, images: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                     others: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        """For each image, ``P(other_i occludes target)`` for each mask of its ``others``, shape ``(N,)`` float."""
        ...


class Inpainter(Protocol):
    """Repaints masked pixels; called with a batch of requests from any number of jobs."""

    name: str

    def inpaint(self, requests: Sequence[InpaintRequest]) -> list[np.ndarray]: ...
