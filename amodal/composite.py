"""The final RGBA: the completed window with the visible pixels over it (docs/design.md step 6).

Two ways: the paper's (:func:`compose_paper`, the default) and a feathered blend (:func:`compose_rgba`,
``composite="feather"``)."""
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


def compose_paper(completed: np.ndarray, original: np.ndarray, visible: np.ndarray, amodal: np.ndarray, *,
                  erode: int, shrink: int) -> np.ndarray:
    """The window-sized RGBA as the paper's code writes it: the original pixels where the visible mask survives
    an ``erode`` square erosion and then ``shrink`` pixels more (a square of side 2 * shrink + 1), the
    completed window elsewhere; alpha is the amodal mask or that shrunk visible part.

    (The paper's code also means to feather the seam over 5 px, but its blend writes into a temporary
    copy and has no effect: the visible pixels are pasted as they are, and so they are here.)"""
    inner = cv2.erode(visible.astype(np.uint8), np.ones((erode, erode), np.uint8))
    outside = cv2.dilate((inner == 0).astype(np.uint8), np.ones((2 * shrink + 1, 2 * shrink + 1), np.uint8))
    pasted = outside == 0
    rgb = np.where(pasted[..., None], original, completed)
    return np.dstack([rgb, np.where(pasted | amodal, 255, 0).astype(np.uint8)])
