"""Reading and writing a job's arrays in storage: RGB and masks as PNG, instance sets as NPZ."""
from __future__ import annotations

import io
import json

import numpy as np

from amodal.images import decode_png, encode_png
from amodal.storage import Storage


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
