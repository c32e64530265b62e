"""A job's artifacts: their names, and reading and writing them (RGB and masks as PNG, instance sets
as NPZ). Names are relative to the job's prefix (``JobState.key``); see docs/design.md step 5."""
from __future__ import annotations

import io
import json

import numpy as np

from amodal.images import decode_png, encode_png
from amodal.storage import Storage

# The input image and the target's visible mask in it.
IMAGE = "image.png"
VISIBLE = "visible.png"
# The working window, fixed for every pass: the original pixels, the visible mask, the first pass's
# inpaint mask (later masks stay inside it).
WINDOW_ORIGINAL = "window/original.png"
WINDOW_VISIBLE = "window/visible.png"
FIRST_MASK = "window/first_mask.png"
# Per pass (see ``in_pass``): the window image (mixed context before pass 1, inpainted after), its
# scene, the target's amodal mask in it, the canvas still to fill, the next inpaint mask.
WINDOW = "window.png"
SCENE = "scene.npz"
AMODAL = "amodal.png"
UNFILLED = "unfilled.png"
INPAINT_MASK = "inpaint_mask.png"


def in_pass(n: int, name: str) -> str:
    """The name of a per-pass artifact after ``n`` inpainting passes."""
    return f"p{n}/{name}"


def put_rgb(store: Storage, key: str, image: np.ndarray) -> None:
    store.put(key, encode_png(image))


def get_rgb(store: Storage, key: str) -> np.ndarray:
    return decode_png(store.get(key))


def put_mask(store: Storage, key: str, mask: np.ndarray) -> None:
    store.put(key, encode_png(np.where(mask, 255, 0).astype(np.uint8)))


def get_mask(store: Storage, key: str) -> np.ndarray:
    return decode_png(store.get(key)) > 127


def put_instances(store: Storage, key: str, labels: list[str], masks: list[np.ndarray], shape: tuple[int, int]) -> None:
    """A set of (label, mask) instances, bit-packed."""
    stack = np.stack(masks) if masks else np.zeros((0,) + shape, bool)
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=np.packbits(stack, axis=-1), shape=np.array(stack.shape),
                        labels=np.array(json.dumps(labels)))
    store.put(key, buf.getvalue())


def get_instances(store: Storage, key: str) -> tuple[list[str], list[np.ndarray]]:
    with np.load(io.BytesIO(store.get(key))) as data:
        n, h, w = (int(v) for v in data["shape"])
        stack = np.unpackbits(data["masks"], axis=-1, count=w).astype(bool).reshape(n, h, w)
        return json.loads(str(data["labels"])), list(stack)
