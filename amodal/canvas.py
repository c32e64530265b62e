"""The outpainting canvas, the square working window and the clean background (docs/design.md step 5).

The image sits centred on a canvas ``scale`` times its width and height. Only the window is ever
materialised: the canvas is geometry, so a 6x canvas costs nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources

import cv2
import numpy as np

from amodal.geometry import Box, bbox
from amodal.images import load_image
from amodal.settings import Settings


@dataclass(frozen=True)
class Window:
    """A square window in canvas coordinates, plus where the image sits on that canvas."""

    x0: int
    y0: int
    size: int
    image_x: int  # image origin on the canvas
    image_y: int
    image_w: int
    image_h: int

    @property
    def offset(self) -> tuple[int, int]:
        """Top-left of the window relative to the input image's top-left (may be negative)."""
        return self.x0 - self.image_x, self.y0 - self.image_y

    @property
    def image_box(self) -> Box:
        """The window as a box in input-image coordinates."""
        ox, oy = self.offset
        return ox, oy, ox + self.size, oy + self.size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Window":
        return cls(**data)

    def _overlap(self) -> tuple[slice, slice, slice, slice] | None:
        """Matching slices (window rows, window cols, image rows, image cols) of the overlap."""
        ox, oy = self.offset
        ix0, iy0 = max(ox, 0), max(oy, 0)
        ix1, iy1 = min(ox + self.size, self.image_w), min(oy + self.size, self.image_h)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        return slice(iy0 - oy, iy1 - oy), slice(ix0 - ox, ix1 - ox), slice(iy0, iy1), slice(ix0, ix1)

    def crop(self, array: np.ndarray, fill) -> np.ndarray:
        """The window's view of an image-sized array; canvas outside the image is ``fill``."""
        out = np.full((self.size, self.size) + array.shape[2:], fill, dtype=array.dtype)
        o = self._overlap()
        if o is not None:
            wr, wc, ir, ic = o
            out[wr, wc] = array[ir, ic]
        return out

    def outside_image(self) -> np.ndarray:
        """Window pixels that lie outside the input image (the area to outpaint)."""
        inside = self.crop(np.ones((self.image_h, self.image_w), bool), False)
        return ~inside


def place_window(
    visible: np.ndarray, truncated: list[str], *, scale: int, margin: int, extra: int
) -> Window:
    """The working window around the visible mask: ``margin`` beyond its first and last rows and columns
    (``extra`` more on truncated sides), squared by growing toward a truncated side (the left or top one
    when both opposite sides are), else evenly; kept on the canvas."""
    h, w = visible.shape
    cw, ch = w * scale, h * scale
    ix, iy = (cw - w) // 2, (ch - h) // 2
    box = bbox(visible)
    if box is None:
        raise ValueError("cannot place a window around an empty mask")
    bx0, by0, bx1, by1 = box
    x0 = ix + bx0 - margin - (extra if "left" in truncated else 0)
    x1 = ix + bx1 - 1 + margin + (extra if "right" in truncated else 0)
    y0 = iy + by0 - margin - (extra if "top" in truncated else 0)
    y1 = iy + by1 - 1 + margin + (extra if "bottom" in truncated else 0)
    side = min(max(x1 - x0, y1 - y0), cw, ch)
    x0 = _grow(x0, x1, side, "left" in truncated, "right" in truncated)
    y0 = _grow(y0, y1, side, "top" in truncated, "bottom" in truncated)
    x0 = int(np.clip(x0, 0, cw - side))
    y0 = int(np.clip(y0, 0, ch - side))
    return Window(x0, y0, int(side), ix, iy, w, h)


def _grow(lo: int, hi: int, side: int, toward_lo: bool, toward_hi: bool) -> int:
    """New start of a span [lo, hi) grown to ``side``: toward its truncated start (also when both ends are
    truncated, as the paper's code does), else toward its truncated end, else evenly (the odd pixel at the end)."""
    slack = side - (hi - lo)
    if toward_lo:
        return lo - slack
    if toward_hi:
        return lo
    return lo - slack // 2


def paste_background(background: np.ndarray, window: np.ndarray, visible: np.ndarray) -> np.ndarray | None:
    """The window with every pixel outside the visible target taken 1:1 from the clean background's same
    position (the paper's mixed context); ``None`` if such a pixel lies beyond the background's size."""
    ys, xs = np.nonzero(~visible)
    if len(ys) and (ys.max() >= background.shape[0] or xs.max() >= background.shape[1]):
        return None
    mixed = window.copy()
    mixed[ys, xs] = background[ys, xs]
    return mixed


def fit_background(background: np.ndarray, size: int) -> np.ndarray:
    """The clean background image covering a ``size`` x ``size`` window.

    Windows up to twice the background's shorter side are filled by resizing a centre square; larger
    ones tile it, so the texture keeps its scale.
    """
    h, w = background.shape[:2]
    s = min(h, w)
    square = background[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if size <= 2 * s:
        return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA if size < s else cv2.INTER_CUBIC)
    reps = -(-size // s)
    return np.tile(square, (reps, reps, 1))[:size, :size]


def neutral_background() -> np.ndarray:
    """The default clean background: the paper's gray wallpaper, shipped as ``amodal/data/gray_wallpaper.jpeg``
    (its source and licence are in ``gray_wallpaper.txt`` beside it)."""
    data = resources.files("amodal").joinpath("data/gray_wallpaper.jpeg").read_bytes()
    return load_image(data, max_pixels=Settings().max_pixels, min_side=1)
