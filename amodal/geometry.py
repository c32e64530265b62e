"""Mask geometry: boxes, overlap, morphology, border truncation, background segments."""
from __future__ import annotations

from typing import Iterable

import cv2
import numpy as np
from PIL import Image
from skimage.morphology import disk

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 with exclusive ends
SIDES = ("left", "top", "right", "bottom")


def bbox(mask: np.ndarray) -> Box | None:
    """Tight box of a mask, or ``None`` if it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def dilate(mask: np.ndarray, kernel: int, iterations: int = 1) -> np.ndarray:
    """Dilate with a ``kernel`` x ``kernel`` square, ``iterations`` times."""
    k = np.ones((kernel, kernel), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), k, iterations=iterations).astype(bool)


def erode_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.erode(mask.astype(np.uint8), disk(radius).astype(np.uint8)).astype(bool)


def union(masks: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    for m in masks:
        out |= m
    return out


def near_sides(mask: np.ndarray, margin: int) -> list[str]:
    """Sides of the array that the mask comes within ``margin`` pixels of (truncation): its first row or
    column at most ``margin`` from the start, its last at least ``size - margin``."""
    box = bbox(mask)
    if box is None:
        return []
    x0, y0, x1, y1 = box
    h, w = mask.shape
    hits = {"left": x0 <= margin, "top": y0 <= margin, "right": x1 - 1 >= w - margin, "bottom": y1 - 1 >= h - margin}
    return [s for s in SIDES if hits[s]]


def edge_strips(shape: tuple[int, int], sides: Iterable[str], width: int) -> np.ndarray:
    """A mask of ``width``-pixel strips along the given sides."""
    out = np.zeros(shape, bool)
    for side in sides:
        if side == "left":
            out[:, :width] = True
        elif side == "right":
            out[:, -width:] = True
        elif side == "top":
            out[:width, :] = True
        elif side == "bottom":
            out[-width:, :] = True
    return out


def background_segments(covered: np.ndarray, erode_radius: int, min_area: int, filled: bool) -> list[np.ndarray]:
    """The area no instance covers, eroded by a disk, in pieces over ``min_area`` pixels: with ``filled``
    (the paper), the regions its outer contours enclose, so a segment around an object contains it;
    else its 8-connected components, holes left out."""
    free = erode_disk(~covered, erode_radius).astype(np.uint8)
    if not filled:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(free, connectivity=8)
        return [labels == i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] > min_area]
    contours, _ = cv2.findContours(free, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for contour in contours:
        if cv2.contourArea(contour) > min_area:
            region = np.zeros_like(free)
            cv2.drawContours(region, [contour], -1, 1, -1)
            out.append(region.astype(bool))
    return out


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to ``size`` = (width, height), as Pillow samples (pixel centres)."""
    return np.asarray(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).resize(size, Image.NEAREST)) > 0


def resize_image(image: np.ndarray, size: tuple[int, int], resample: str = "lanczos") -> np.ndarray:
    """Resize an RGB image to ``size`` = (width, height) with Pillow's ``lanczos`` or ``bicubic`` filter (the
    paper's code sends windows to the inpainter through Lanczos and brings its output back through bicubic)."""
    filters = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}
    return np.asarray(Image.fromarray(image).resize(size, filters[resample]))
