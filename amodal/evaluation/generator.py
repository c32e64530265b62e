"""Benchmark rows with known ground truth: a whole object, and another object's cut-out pasted over part of it.

The target's full mask and its original pixels under the occluder are known, so a completion can be
scored against them. Objects come from a COCO-style annotation file (polygon or RLE segmentations,
decoded by pycocotools; the annotated mask is taken as the whole object) or from a synthetic
generator of striped discs and boxes whose geometry is recorded, so stand-in models can answer from
it. The stripes make the hidden part's appearance more than one colour: a fill with the mean visible
colour does not score as the truth. Pastes hide ``MIN_HIDDEN`` to ``MAX_HIDDEN`` of the target.
(Real occlusions, with an annotated visible and amodal mask, are read by amodal.evaluation.datasets.)
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from amodal.errors import UsageError
from amodal.evaluation.masks import MalformedDataset, decode
from amodal.geometry import bbox
from amodal.images import encode_png

MIN_HIDDEN, MAX_HIDDEN = 0.1, 0.9  # fraction of the target the pasted occluder hides
PLACEMENT_TRIES = 200
BORDER = 12  # targets this close to the border may be truncated (the method takes them to be): not used
SYNTHETIC_SIZE = (200, 240)  # (height, width)
SYNTHETIC_BACKGROUND = (236, 236, 236)
ROWS_FILE = "rows.jsonl"
SYNTHETIC_LABELS = {"disc": "ball", "rect": "box"}
STRIPE_PERIOD = 8.0  # pixels along the diagonal
STRIPE_AMPLITUDE = 18  # +- this much on every channel: far below the palette's spacing (60)


@dataclass(frozen=True)
class SourceObject:
    """One whole object in its image."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    label: str


@dataclass
class Sample:
    """One benchmark row and its ground truth."""

    name: str
    label: str  # the query, and the class of the CLIP score's prompt
    image: np.ndarray  # the input: the original with the occluder pasted
    original: np.ndarray | None  # before pasting: the true pixels of the hidden part; None for real occlusions
    full: np.ndarray  # the target's whole (amodal) mask
    occluder: np.ndarray  # what hides it: the pasted occluder's mask (real occlusions: the hidden part)
    shapes: list[dict] = field(default_factory=list)  # synthetic rows: the geometry of target and occluder

    @property
    def visible(self) -> np.ndarray:
        return self.full & ~self.occluder

    @property
    def hidden(self) -> np.ndarray:
        return self.full & self.occluder

    @property
    def hidden_fraction(self) -> float:
        return float(self.hidden.sum() / self.full.sum())

    @property
    def appearance(self) -> bool:
        """Whether the hidden part's true pixels are known (a paste), so appearance can be scored."""
        return self.original is not None


def paste_occluder(target: SourceObject, occluder: SourceObject, rng: np.random.Generator,
                   name: str) -> tuple[Sample, tuple[int, int]] | None:
    """Paste ``occluder``'s cut-out over part of ``target`` (hiding MIN_HIDDEN to MAX_HIDDEN of it).

    Returns the sample and the cut-out's offset (its box's top-left in the target image), or ``None``
    when no placement fits.
    """
    height, width = target.mask.shape
    ox0, oy0, ox1, oy1 = bbox(occluder.mask)
    cut_mask, cut_pixels = occluder.mask[oy0:oy1, ox0:ox1], occluder.image[oy0:oy1, ox0:ox1]
    ch, cw = cut_mask.shape
    if ch > height or cw > width:
        return None
    area = target.mask.sum()
    x0, y0, x1, y1 = bbox(target.mask)
    for _ in range(PLACEMENT_TRIES):
        # a top-left that makes the cut-out's box overlap the target's box
        x = int(rng.integers(max(0, x0 - cw + 1), min(width - cw, x1 - 1) + 1))
        y = int(rng.integers(max(0, y0 - ch + 1), min(height - ch, y1 - 1) + 1))
        pasted = np.zeros_like(target.mask)
        pasted[y:y + ch, x:x + cw] = cut_mask
        if MIN_HIDDEN <= (pasted & target.mask).sum() / area <= MAX_HIDDEN:
            image = target.image.copy()
            image[pasted] = cut_pixels[cut_mask]
            return Sample(name, target.label, image, target.image, target.mask, pasted), (x, y)
    return None


def coco_objects(annotation_file: Path, images: Path, min_area: int = 1024) -> list[SourceObject]:
    """The whole, untruncated, non-crowd objects of a COCO-style file, with their images' pixels (an
    annotation's ``area`` is its decoded mask's)."""
    try:
        document = json.loads(annotation_file.read_bytes())
        names = {c["id"]: c["name"] for c in document["categories"]}
        infos = {info["id"]: info for info in document["images"]}
        by_image: dict[int, list[dict]] = {}
        for annotation in document["annotations"]:
            if not annotation.get("iscrowd"):
                by_image.setdefault(annotation["image_id"], []).append(annotation)
    except (OSError, ValueError) as exc:
        raise MalformedDataset(f"{annotation_file}: cannot read: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise MalformedDataset(f"{annotation_file}: not a COCO file (missing or wrong field {exc})") from None
    objects = []
    for image_id in sorted(by_image):
        masks = []
        try:
            info = infos[image_id]
            for annotation in by_image[image_id]:
                mask = decode(annotation["segmentation"], info["height"], info["width"])
                if mask.sum() >= min_area:
                    masks.append((mask, names[annotation["category_id"]]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MalformedDataset(f"{annotation_file}: image {image_id}: bad annotation ({exc})") from None
        if not masks:
            continue
        with Image.open(images / info["file_name"]) as file:
            pixels = np.asarray(file.convert("RGB"))
        for mask, label in masks:
            box = bbox(mask)
            if box is not None and _inside(box, mask.shape, BORDER):
                objects.append(SourceObject(pixels, mask, label))
    return objects


def _inside(box: tuple[int, int, int, int], shape: tuple[int, int], margin: int) -> bool:
    x0, y0, x1, y1 = box
    return x0 >= margin and y0 >= margin and x1 <= shape[1] - margin and y1 <= shape[0] - margin


def _fit(occluder: SourceObject, target: SourceObject, rng: np.random.Generator) -> SourceObject:
    """The occluder's cut-out rescaled to 60-100% of the target's size (its larger side)."""
    ox0, oy0, ox1, oy1 = bbox(occluder.mask)
    tx0, ty0, tx1, ty1 = bbox(target.mask)
    scale = rng.uniform(0.6, 1.0) * max(tx1 - tx0, ty1 - ty0) / max(ox1 - ox0, oy1 - oy0)
    size = (max(1, round((ox1 - ox0) * scale)), max(1, round((oy1 - oy0) * scale)))
    mask = cv2.resize(occluder.mask[oy0:oy1, ox0:ox1].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    pixels = cv2.resize(occluder.image[oy0:oy1, ox0:ox1], size, interpolation=cv2.INTER_AREA)
    return SourceObject(pixels, mask.astype(bool), occluder.label)


def coco_samples(objects: list[SourceObject], count: int, seed: int = 0) -> list[Sample]:
    """Up to ``count`` rows: each target (in random order) hidden in part by another object's cut-out."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for index in rng.permutation(len(objects)):
        if len(samples) == count or len(objects) < 2:
            break
        other = int(rng.choice([i for i in range(len(objects)) if i != index]))
        placed = paste_occluder(objects[index], _fit(objects[other], objects[index], rng), rng,
                                f"row{len(samples):05d}")
        if placed is not None:
            samples.append(placed[0])
    return samples


def shape_mask(shape: dict, height: int, width: int) -> np.ndarray:
    """A disc or box (``kind``, centre ``cx``, ``cy``, radii or half sides ``rx``, ``ry``), sampled at pixel centres."""
    gx, gy = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    return shape_mask_at(shape, gx, gy)


def shape_mask_at(shape: dict, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """:func:`shape_mask` at the points ``(gx, gy)`` of the frame."""
    if shape["kind"] == "disc":
        return ((gx - shape["cx"]) / shape["rx"]) ** 2 + ((gy - shape["cy"]) / shape["ry"]) ** 2 <= 1.0
    return (np.abs(gx - shape["cx"]) <= shape["rx"]) & (np.abs(gy - shape["cy"]) <= shape["ry"])


def stripes_at(colour: tuple[int, int, int], gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """A shape's pixels at the frame points ``(gx, gy)``: its colour in diagonal stripes, lighter and darker."""
    light = np.floor((gx + gy) / STRIPE_PERIOD) % 2 == 0
    step = np.where(light, STRIPE_AMPLITUDE, -STRIPE_AMPLITUDE)[..., None]
    return np.clip(np.array(colour, np.int16) + step, 0, 255).astype(np.uint8)


def palette() -> list[tuple[int, int, int]]:
    """Flat colours at least 60 apart in some channel, and far from every grey (the background, the
    method's grey canvas, black cut-out fills)."""
    levels = (20, 80, 140, 200)
    return [c for c in itertools.product(levels, repeat=3) if max(c) - min(c) >= 120]


def synthetic_samples(count: int, seed: int = 0) -> list[Sample]:
    """``count`` rows: a flat disc or box on a plain background, part hidden by a pasted object of the other
    kind. Objects have colours of their own while the palette lasts (then colours repeat)."""
    rng = np.random.default_rng(seed)
    colours = palette()
    rng.shuffle(colours)
    samples: list[Sample] = []
    while len(samples) < count:
        pair = colours[(2 * len(samples)) % len(colours)], colours[(2 * len(samples) + 1) % len(colours)]
        sample = _synthetic_sample(rng, pair, f"row{len(samples):05d}")
        if sample is not None:
            samples.append(sample)
    return samples


def _synthetic_sample(rng: np.random.Generator, colours: tuple[tuple[int, int, int], ...], name: str) -> Sample | None:
    height, width = SYNTHETIC_SIZE
    kinds = ("disc", "rect") if rng.random() < 0.5 else ("rect", "disc")
    radius = rng.uniform(28, 50, size=2)
    target = {"kind": kinds[0], "colour": colours[0], "rx": float(radius[0]), "ry": float(radius[1]),
              "cx": float(rng.uniform(radius[0] + BORDER, width - radius[0] - BORDER)),
              "cy": float(rng.uniform(radius[1] + BORDER, height - radius[1] - BORDER))}
    size = rng.uniform(0.4, 1.4, size=2) * radius
    half = np.ceil(size).astype(int) + 1
    occluder = {"kind": kinds[1], "colour": colours[1], "rx": float(size[0]), "ry": float(size[1]),
                "cx": float(half[0]), "cy": float(half[1])}  # centred on a canvas of its own
    cut = _synthetic_object(occluder, 2 * half[1], 2 * half[0])
    placed = paste_occluder(_synthetic_object(target, height, width), cut, rng, name)
    if placed is None:
        return None
    sample, (x, y) = placed
    cx0, cy0, _, _ = bbox(cut.mask)
    sample.shapes = [
        {**target, "label": SYNTHETIC_LABELS[target["kind"]], "depth": 2},
        {**occluder, "cx": occluder["cx"] + x - cx0, "cy": occluder["cy"] + y - cy0,
         "label": SYNTHETIC_LABELS[occluder["kind"]], "depth": 1},
    ]
    return sample


def _synthetic_object(shape: dict, height: int, width: int) -> SourceObject:
    mask = shape_mask(shape, height, width)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = SYNTHETIC_BACKGROUND
    gx, gy = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    image[mask] = stripes_at(shape["colour"], gx, gy)[mask]
    return SourceObject(image, mask, SYNTHETIC_LABELS[shape["kind"]])


def write_rows(samples: list[Sample], folder: Path, give_visible: bool = True) -> tuple[Path, Path]:
    """Write each sample's input image (and, with ``give_visible``, its visible mask) into ``folder/images``,
    one JSONL row per sample (``image``, ``query``, ``visible_mask``), and its truth into ``folder/truth``
    (amodal mask, hidden mask, true pixels) for :func:`read_rows`; return the images folder and the rows file."""
    images, truth = folder / "images", folder / "truth"
    images.mkdir(parents=True, exist_ok=True)
    truth.mkdir(exist_ok=True)
    rows = []
    for sample in samples:
        (images / f"{sample.name}.png").write_bytes(encode_png(sample.image))
        (truth / f"{sample.name}_amodal.png").write_bytes(_mask_png(sample.full))
        (truth / f"{sample.name}_hidden.png").write_bytes(_mask_png(sample.hidden))
        if sample.original is not None:
            (truth / f"{sample.name}_original.png").write_bytes(encode_png(sample.original))
        row = {"image": f"{sample.name}.png", "query": sample.label}
        if give_visible:
            (images / f"{sample.name}_visible.png").write_bytes(_mask_png(sample.visible))
            row["visible_mask"] = f"{sample.name}_visible.png"
        rows.append(row)
    annotations = folder / ROWS_FILE
    annotations.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return images, annotations


def _mask_png(mask: np.ndarray) -> bytes:
    return encode_png(np.where(mask, 255, 0).astype(np.uint8))


def _read_png(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as file:
        return np.asarray(file.convert(mode))


def read_rows(folder: Path) -> list[Sample]:
    """The samples :func:`write_rows` wrote into ``folder`` (an eval's ``data`` folder)."""
    rows_file = folder / ROWS_FILE
    if not rows_file.is_file():
        raise UsageError(f"--data: no {ROWS_FILE} in {folder} (pass the data folder of an earlier amodal eval)")
    samples = []
    for line in rows_file.read_text().splitlines():
        row = json.loads(line)
        name = row["image"].removesuffix(".png")
        original = folder / "truth" / f"{name}_original.png"
        samples.append(Sample(name, row["query"], _read_png(folder / "images" / row["image"], "RGB"),
                              _read_png(original, "RGB") if original.exists() else None,
                              _read_png(folder / "truth" / f"{name}_amodal.png", "L") > 127,
                              _read_png(folder / "truth" / f"{name}_hidden.png", "L") > 127))
    return samples
