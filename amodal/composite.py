"""The final RGBA: the completed window cut out by the amodal mask, blended with the visible pixels."""
from __future__ import annotations

import cv2
import numpy as np

from amodal.geometry import Box, bbox


def _inside_distance(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel to the nearest pixel outside ``mask`` (0 outside)."""
    padded = np.pad(mask.astype(np.uint8), 1)  # the array border counts as inside, not as an edge
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def visible_weight(visible: np.ndarray, amodal: np.ndarray, feather: int, shrink: int) -> np.ndarray:
    """How much of the original pixel to keep, in [0, 1].

    1 deep inside the visible region; falls to 0 over ``feather`` pixels at the visible mask's edge
    (the seam with repainted parts), and the visible cut-out is pulled ``shrink`` pixels back from
    the transparent edge (the amodal silhouette), where the completed pixels take over.
    """
    to_seam = _inside_distance(visible)
    to_transparent = _inside_distance(amodal) - shrink
    return np.clip(np.minimum(to_seam, to_transparent) / max(feather, 1), 0.0, 1.0)


def compose_rgba(
    completed: np.ndarray,
    original: np.ndarray,
    visible: np.ndarray,
    amodal: np.ndarray,
    *,
    feather: int,
    shrink: int,
) -> tuple[np.ndarray, Box]:
    """RGBA of the object cropped to the amodal mask's box, and that box.

    Alpha is exactly the amodal mask; colour is the completed pixels with the original visible
    pixels blended over them.
    """
    box = bbox(amodal)
    if box is None:
        raise ValueError("the amodal mask is empty")
    w = visible_weight(visible & amodal, amodal, feather, shrink)[..., None]
    rgb = np.rint(w * original + (1.0 - w) * completed).astype(np.uint8)
    rgba = np.dstack([rgb, np.where(amodal, 255, 0).astype(np.uint8)])
    x0, y0, x1, y1 = box
    return rgba[y0:y1, x0:x1], box
