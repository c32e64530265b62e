"""The reference methods every report scores beside ours, on the same rows and from the same inputs (the
image and the visible mask), written as result folders laid out as ours:

- ``nothing``: doing nothing, the visible cut-out as the whole object;
- ``mean_fill``: a trivial fill, the visible mask's convex hull, its hidden pixels painted with the mean
  visible colour.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from amodal.evaluation.generator import Sample
from amodal.geometry import bbox
from amodal.images import encode_png
from amodal.keys import AMODAL_MASK, COMPLETION, OFFSETS

REFERENCES = ("nothing", "mean_fill")


def nothing(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, amodal mask) of doing nothing."""
    return sample.image, sample.visible


def mean_fill(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, amodal mask) of the trivial fill."""
    points = np.argwhere(sample.visible)[:, ::-1].astype(np.int32)
    hull = np.zeros(sample.visible.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    mask = hull.astype(bool) | sample.visible
    mean = sample.image[sample.visible].mean(axis=0).round().astype(np.uint8)
    pixels = np.where(sample.visible[..., None], sample.image, mean)
    return pixels, mask


def write_result(folder: Path, pixels: np.ndarray, mask: np.ndarray) -> None:
    """A result folder as the method writes one: the completion and amodal mask in their box, and the box."""
    folder.mkdir(parents=True, exist_ok=True)
    x0, y0, x1, y1 = bbox(mask)
    alpha = np.where(mask, 255, 0).astype(np.uint8)[y0:y1, x0:x1]
    (folder / COMPLETION).write_bytes(encode_png(np.dstack([pixels[y0:y1, x0:x1], alpha])))
    (folder / AMODAL_MASK).write_bytes(encode_png(alpha))
    (folder / OFFSETS).write_text(json.dumps({"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}))


def write_references(samples: list[Sample], out: Path) -> dict[str, dict[str, Path]]:
    """Each reference method's result folder per row name, under ``out/<method>/<row>``."""
    methods = {"nothing": nothing, "mean_fill": mean_fill}
    folders: dict[str, dict[str, Path]] = {}
    for method in REFERENCES:
        folders[method] = {}
        for sample in samples:
            folder = out / method / sample.name
            write_result(folder, *methods[method](sample))
            folders[method][sample.name] = folder
    return folders
