"""Masks of COCO-style annotation files, decoded with pycocotools."""
from __future__ import annotations

from typing import Any

import numpy as np

from amodal.errors import UsageError


class MalformedDataset(UsageError):
    """An annotation file that is not in the format it claims (or in none the benchmark reads)."""


def decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A polygon list (flat or nested), an RLE (compressed or not) or a COCOA region polygon as a bool mask."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        polygons = segmentation if segmentation and isinstance(segmentation[0], list) else [segmentation]
        polygons = [p for p in polygons if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), bool)
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = {"size": segmentation["size"], "counts": segmentation["counts"]}
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    else:
        raise ValueError(f"not a polygon list or RLE: {type(segmentation).__name__}")
    return coco_mask.decode(rle).astype(bool)
