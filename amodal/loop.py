"""The completion loop (docs/design.md step 5) as array functions, in the order a job meets them.

1. ``truncated_sides``: where the border cuts the target (input image, once).
2. ``plan_first_pass``: the working window, the first inpaint mask and the mixed-context input (once).
3. ``paste_inpainted``: the inpainter's output back into the window; what is still unfilled.
4. ``resegment``: the target's new amodal mask from the inpainted window's scene.
5. ``window_occluders``: the occluders found on the window, plus strips where the target touches its edge.
6. ``next_pass``: the stop rules, else the next pass's inpaint mask.

Storage, batching and model calls are ``amodal.steps``'s; every radius, kernel and margin is a
``Settings`` field.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from amodal.canvas import Window, fit_background, place_window
from amodal.geometry import dilate, edge_strips, near_sides, resize_image
from amodal.scene import Instances, best_match
from amodal.settings import Settings

# Why a loop ended, and the message each reason gives (``n``: the passes done).
STOPS = {
    "unoccluded": "nothing hides the target",
    "complete": "complete after {n} pass(es)",
    "nothing_left": "complete after {n} pass(es): nothing left to repaint",
    "limit": "stopped at the limit of {n} pass(es)",
    "fixed": "stopped after the fixed {n} pass(es)",
}


def truncated_sides(target: np.ndarray, occluders: np.ndarray, s: Settings) -> list[str]:
    """1. Sides of the image the target comes within ``border_margin`` of; with
    ``truncation_through_occluders``, also those that an occluder within ``touch_margin`` of the target
    comes within that margin of (the target may go on under it, past the border)."""
    reach = target
    if s.truncation_through_occluders and occluders.any():
        _, labels = cv2.connectedComponents(occluders.astype(np.uint8), connectivity=8)
        touching = np.unique(labels[dilate(target, 2 * s.touch_margin + 1) & occluders])
        reach = target | np.isin(labels, touching[touching > 0])
    return near_sides(reach, s.border_margin)


@dataclass(frozen=True)
class FirstPass:
    """Pass 1's inputs; the window, ``original``, ``visible`` and ``first_mask`` stay for every pass."""

    window: Window
    original: np.ndarray  # the input image's pixels in the window (white outside the image)
    visible: np.ndarray  # the target's visible mask in the window
    first_mask: np.ndarray  # pass 1's inpaint mask; later masks stay inside it
    unfilled: np.ndarray  # canvas outside the input image, still to be painted
    mixed: np.ndarray  # the window with everything but the visible target on the clean background


def plan_first_pass(image: np.ndarray, visible: np.ndarray, occluders: np.ndarray, truncated: list[str],
                    background: np.ndarray, s: Settings) -> FirstPass:
    """2. The window around the visible target (grown toward truncated sides); inpaint mask = occluders
    + unfilled canvas, dilated ``first_mask_kernel`` square ``first_mask_iterations`` times; mixed
    context: outside the visible target, the clean background."""
    window = place_window(visible, truncated, scale=s.canvas_scale, margin=s.crop_margin, extra=s.truncation_extra)
    original = window.crop(image, 255)
    visible_w = window.crop(visible, False)
    unfilled = window.outside_image()
    mask = dilate(window.crop(occluders, False) | unfilled, s.first_mask_kernel, s.first_mask_iterations)
    mixed = np.where(visible_w[..., None], original, fit_background(background, window.size))
    return FirstPass(window, original, visible_w, mask, unfilled, mixed)


def paste_inpainted(image: np.ndarray, mask: np.ndarray, out: np.ndarray,
                    unfilled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3. The window with the inpainter's output (resized back) in the masked pixels, and what stays unfilled."""
    side = image.shape[0]
    return np.where(mask[..., None], resize_image(out, (side, side)), image), unfilled & ~mask


def resegment(scene: Instances, current: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, bool]:
    """4. The new amodal mask (the detection with the highest IoU with the current mask, joined with the
    visible mask) and whether the target was re-detected; if not, the current mask is kept."""
    match = best_match(scene, current)
    if match is None:
        return current, False
    return match | visible, True


def window_occluders(occluders: np.ndarray, amodal: np.ndarray, s: Settings) -> np.ndarray:
    """5. The occluders of the target in the window, plus an ``edge_strip`` strip along each window edge
    the target comes within ``border_margin`` of, so the next pass grows it outward."""
    return occluders | edge_strips(amodal.shape, near_sides(amodal, s.border_margin), s.edge_strip)


def next_pass(passes: int, occluders: np.ndarray, unfilled: np.ndarray, first_mask: np.ndarray,
              s: Settings) -> tuple[str | None, np.ndarray | None]:
    """6. After ``passes`` passes: the reason to stop (a ``STOPS`` key), or the next inpaint mask,
    (occluders + unfilled) & the first mask, dilated ``next_mask_kernel`` square ``next_mask_iterations``
    times. ``fixed_passes`` overrides the other rules (an empty mask repaints the first mask)."""
    if s.fixed_passes and passes >= s.fixed_passes:
        return "fixed", None
    if not s.fixed_passes:
        if not occluders.any():
            return "complete", None
        if passes >= s.max_passes:
            return "limit", None
    mask = dilate((occluders | unfilled) & first_mask, s.next_mask_kernel, s.next_mask_iterations)
    if not mask.any():
        return (None, first_mask) if s.fixed_passes else ("nothing_left", None)
    return None, mask
