"""Real occlusions from amodal datasets: each object's visible mask goes in, its amodal mask is the truth.

Three formats, told apart by their annotations' fields:

- COCOA (COCO amodal, Zhu et al. 2017): ``annotations`` of one image each, with ``regions``: ``segmentation``
  (the amodal polygon, a flat ``[x, y, ...]`` list), ``visible_mask`` and ``invisible_mask`` (RLE, absent
  where the region is whole), ``name``; no ``categories``.
- KINS (Qi et al. 2019): COCO-like ``annotations`` with ``a_segm`` (amodal polygons), ``i_segm`` (visible,
  "inmodal" polygons), ``a_bbox`` and ``category_id``; no ``area``.
- COCO-style files with both masks: ``segmentation`` (amodal) and ``visible_mask`` (or
  ``visible_segmentation``), polygons or RLE, and ``category_id``.

Masks are decoded with pycocotools. Only objects with a hidden part (``MIN_HIDDEN``) and a visible part are kept; the
true pixels under the occluder are unknown, so these rows are scored on masks only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from amodal.errors import UsageError
from amodal.evaluation.generator import Sample
from amodal.evaluation.masks import MalformedDataset, decode

FORMATS = ("cocoa", "kins", "coco_amodal")
MIN_VISIBLE_PX = 64  # objects with fewer visible pixels cannot be grounded on: left out
MIN_HIDDEN = 0.05  # objects with less of their amodal mask hidden are whole (the masks' outlines disagree a little)


def detect_format(document: Any) -> str:
    """Which of :data:`FORMATS` ``document`` is in, from its first annotation's fields."""
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list) \
            or not isinstance(document.get("images"), list):
        raise MalformedDataset("not a COCO-style file (an object with 'images' and 'annotations' lists)")
    first = next((a for a in document["annotations"] if isinstance(a, dict)), {})
    if "regions" in first:
        return "cocoa"
    if "a_segm" in first:
        return "kins"
    if "segmentation" in first and ("visible_mask" in first or "visible_segmentation" in first):
        return "coco_amodal"
    raise MalformedDataset("no amodal annotations: expected COCOA 'regions', KINS 'a_segm'/'i_segm', or "
                           "'segmentation' with 'visible_mask' (plain COCO segmentations go to --coco)")


def _objects(document: dict, kind: str) -> Iterator[tuple[int, str, Any, Any]]:
    """(image id, label, amodal segmentation, visible segmentation or None for whole) of every object."""
    names = {c["id"]: c["name"] for c in document.get("categories", [])}
    for annotation in document["annotations"]:
        if kind == "cocoa":
            for region in annotation["regions"]:
                yield annotation["image_id"], region["name"], region["segmentation"], region.get("visible_mask")
        elif kind == "kins":
            yield annotation["image_id"], names[annotation["category_id"]], annotation["a_segm"], annotation["i_segm"]
        elif not annotation.get("iscrowd"):
            visible = annotation.get("visible_mask", annotation.get("visible_segmentation"))
            yield annotation["image_id"], names[annotation["category_id"]], annotation["segmentation"], visible


def amodal_samples(annotation_file: Path, images: Path, limit: int, seed: int = 0) -> tuple[str, list[Sample]]:
    """The file's format and up to ``limit`` of its occluded objects (in a random order of ``seed``) as rows."""
    try:
        document = json.loads(annotation_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise MalformedDataset(f"{annotation_file}: cannot read: {exc}") from None
    try:
        kind = detect_format(document)
        infos = {info["id"]: info for info in document["images"]}
        objects = list(_objects(document, kind))
    except MalformedDataset as exc:
        raise MalformedDataset(f"{annotation_file}: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise MalformedDataset(f"{annotation_file}: not a valid {kind} file (missing or wrong field {exc})") from None
    order = np.random.default_rng(seed).permutation(len(objects))
    samples: list[Sample] = []
    pixels: dict[int, np.ndarray] = {}
    for index in order:
        if len(samples) == limit:
            break
        image_id, label, amodal, visible = objects[index]
        try:
            info = infos[image_id]
            height, width = info["height"], info["width"]
            full = decode(amodal, height, width)
            seen = full.copy() if visible is None else decode(visible, height, width) & full
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MalformedDataset(f"{annotation_file}: object {index} of image {image_id}: bad mask or image "
                                   f"entry ({exc})") from None
        if seen.sum() < MIN_VISIBLE_PX or (full & ~seen).sum() < MIN_HIDDEN * full.sum():
            continue
        if image_id not in pixels:
            path = images / info["file_name"]
            if not path.is_file():
                raise UsageError(f"--images: no image {info['file_name']} in {images}")
            with Image.open(path) as file:
                pixels[image_id] = np.asarray(file.convert("RGB"))
        samples.append(Sample(f"row{len(samples):05d}", label, pixels[image_id], None, full, full & ~seen))
    return kind, samples
