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

from amodal.canvas import Window, fit_background, paste_background, place_window
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
# Why a row ends with no result, as the paper's code skips it (outcome ``skipped``).
SKIPS = {
    "empty_mask": "no result: nothing to repaint in the window (its occluders lie outside it)",
    "background": "no result: the window ({size} px) is larger than the clean background ({bg}), which the paper "
                  "pastes 1:1 (background_fit=fit resizes it)",
    "no_instances": "no result: nothing was detected on {where}",
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
    first_mask: np.ndarray  # occluders + unfilled canvas before dilation; later masks stay inside it
    inpaint_mask: np.ndarray  # pass 1's inpaint mask: ``first_mask`` dilated
    unfilled: np.ndarray  # canvas outside the input image, still to be painted
    mixed: np.ndarray | None  # the window with everything but the visible target on the clean background
    # (``None``: the background is smaller than the window, and ``background_fit`` pastes it 1:1)


def plan_first_pass(image: np.ndarray, visible: np.ndarray, occluders: np.ndarray, truncated: list[str],
                    background: np.ndarray, s: Settings) -> FirstPass:
    """2. The window around the visible target (grown toward truncated sides); inpaint mask = occluders
    + unfilled canvas, dilated ``first_mask_kernel`` square ``first_mask_iterations`` times; mixed
    context: outside the visible target, the clean background."""
    window = place_window(visible, truncated, scale=s.canvas_scale, margin=s.crop_margin, extra=s.truncation_extra)
    original = window.crop(image, 255)
    visible_w = window.crop(visible, False)
    unfilled = window.outside_image()
    first = window.crop(occluders, False) | unfilled
    mask = dilate(first, s.first_mask_kernel, s.first_mask_iterations)
    if s.background_fit == "paste":
        mixed = paste_background(background, original, visible_w)
    else:
        mixed = np.where(visible_w[..., None], original, fit_background(background, window.size))
    return FirstPass(window, original, visible_w, first, mask, unfilled, mixed)


def paste_inpainted(image: np.ndarray, mask: np.ndarray, out: np.ndarray, unfilled: np.ndarray,
                    s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """3. The window after a pass: the inpainter's output resized back (bicubic), whole (the paper) or, with
    ``keep_outside_mask``, in the masked pixels only; and what stays unfilled."""
    side = image.shape[0]
    painted = resize_image(out, (side, side), "bicubic")
    if not s.keep_outside_mask:
        return painted, np.zeros_like(unfilled)
    return np.where(mask[..., None], painted, image), unfilled & ~mask


def resegment(scene: Instances, current: np.ndarray, visible: np.ndarray, s: Settings) -> tuple[np.ndarray, int | None]:
    """4. The new amodal mask (the detection with the highest IoU with the current mask; with
    ``join_visible``, joined with the visible mask) and that detection's index; if none overlaps, the
    current mask is kept and the index is ``None``."""
    match = best_match(scene, current)
    if match is None:
        return current, None
    return (scene.masks[match] | visible) if s.join_visible else scene.masks[match], match


def window_occluders(occluders: np.ndarray, amodal: np.ndarray, s: Settings) -> np.ndarray:
    """5. The occluders of the target in the window, plus an ``edge_strip`` strip along each window edge
    the target comes within ``border_margin`` of, so the next pass grows it outward."""
    return occluders | edge_strips(amodal.shape, near_sides(amodal, s.border_margin), s.edge_strip)


def next_pass(passes: int, occluders: np.ndarray, unfilled: np.ndarray, first_mask: np.ndarray,
              s: Settings) -> tuple[str | None, np.ndarray | None]:
    """6. After ``passes`` passes: the reason to stop (a ``STOPS`` key), or the next inpaint mask,
    (occluders + unfilled) & pass 1's mask before dilation, dilated ``next_mask_kernel`` square
    ``next_mask_iterations`` times. ``fixed_passes`` overrides the other rules (an empty mask repaints
    pass 1's)."""
    if s.fixed_passes and passes >= s.fixed_passes:
        return "fixed", None
    if not s.fixed_passes:
        if not occluders.any():
            return "complete", None
        if passes >= s.max_passes:
            return "limit", None
    kept = (occluders | unfilled) & first_mask
    if not kept.any():
        return (None, dilate(first_mask, s.first_mask_kernel, s.first_mask_iterations)) if s.fixed_passes \
            else ("nothing_left", None)
    return None, dilate(kept, s.next_mask_kernel, s.next_mask_iterations)
