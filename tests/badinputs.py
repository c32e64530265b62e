"""A corpus of good and bad inputs for ``amodal run`` and the queued path.

:func:`write_bad_corpus` writes an images folder (``root/images``), a file outside it
(``root/outside.png``) and a JSONL annotation file mixing good rows, in every odd image mode, with
bad ones. It returns, per row, the expected outcome kind: ``"invalid"`` (with a substring of the
message) or ``"ok"`` (valid input: the pipeline may still end it as completed, unoccluded or
no_target), plus the loaded (height, width) for ok rows. The expectations hold under
:data:`LIMITS` (pass them to ``Settings``): a small pixel limit stands in for huge files.

All images are synthetic; the builders below are also used to check pixel values.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

LIMITS = {"max_pixels": 50_000, "min_side": 16, "max_query_chars": 64}
IMAGES = "images"
# Quadrant colours of :func:`quadrants`: top-left, top-right, bottom-left, bottom-right.
QUADRANT_COLOURS = ((255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 255))


def quadrants(height: int = 32, width: int = 64) -> np.ndarray:
    """uint8 RGB image of four flat quadrants (:data:`QUADRANT_COLOURS`): shows any flip or rotation."""
    image = np.empty((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    for (rows, cols), colour in zip((((0, h), (0, w)), ((0, h), (w, width)), ((h, height), (0, w)),
                                     ((h, height), (w, width))), QUADRANT_COLOURS):
        image[rows[0]:rows[1], cols[0]:cols[1]] = colour
    return image


def scene(height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 RGB: a smooth gradient with a red block in the middle, the block being the "target"."""
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1),
                      np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    image[height // 4:3 * height // 4, width // 4:3 * width // 4] = (220, 30, 30)
    return image


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buffer, fmt, **params)
    return buffer.getvalue()


def exif_jpeg(orientation: int = 6) -> bytes:
    """JPEG of :func:`quadrants` (stored 32 high, 64 wide) tagged with an EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(quadrants(), "JPEG", quality=95, exif=exif.tobytes())


def grey16(values: np.ndarray) -> bytes:
    """16-bit grey PNG (mode I;16) of uint16 ``values``."""
    return encode(values.astype(np.uint16))


def sixteen_bit_ramp() -> np.ndarray:
    """uint16 values k * 257 (k = 0..255 along x), 16 rows: they read back as k."""
    return np.tile(np.arange(256, dtype=np.uint16) * 257, (16, 1))


def palette_png() -> bytes:
    """Palette PNG 20x30: index 0 (transparent) left third, 1 (red) middle, 2 (green) right."""
    index = np.zeros((20, 30), np.uint8)
    index[:, 10:20], index[:, 20:] = 1, 2
    image = Image.frombytes("P", (30, 20), index.tobytes())
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    return encode(image, transparency=0)


def cmyk_jpeg() -> bytes:
    """CMYK JPEG 32x64: four 16-px columns of pure cyan, magenta, yellow and black ink."""
    inks = np.zeros((32, 64, 4), np.uint8)
    for column in range(4):
        inks[:, column * 16:(column + 1) * 16, column] = 255
    return encode(Image.frombytes("CMYK", (64, 32), inks.tobytes()), "JPEG", quality=95)


def rgba_png() -> bytes:
    """RGBA PNG 20x30 of blue (0, 0, 255): alpha 0 left third, 128 middle, 255 right."""
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:, 10:20, 3], rgba[:, 20:, 3] = 128, 255
    return encode(rgba)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (8-bit grey) over a few bytes of data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64)))
            + chunk(b"IEND", b""))


def mask_png(values: np.ndarray) -> bytes:
    return encode(values.astype(np.uint8))


def target_mask(height: int = 48, width: int = 64) -> np.ndarray:
    """The block of :func:`scene` as a bool mask."""
    mask = np.zeros((height, width), bool)
    mask[height // 4:3 * height // 4, width // 4:3 * width // 4] = True
    return mask


def _files() -> dict[str, bytes]:
    good_png = encode(scene())
    good_jpeg = encode(scene(), "JPEG", quality=90)
    rgba_mask = np.zeros((48, 64, 4), np.uint8)
    rgba_mask[..., 3] = np.where(target_mask(), 255, 0)
    return {
        "good.png": good_png,
        "sub/good.png": good_png,
        "exif6.jpg": exif_jpeg(6),
        "grey.png": encode(scene()[..., 0]),
        "palette.png": palette_png(),
        "grey16.png": grey16(sixteen_bit_ramp()),
        "cmyk.jpg": cmyk_jpeg(),
        "rgba.png": rgba_png(),
        "la.png": encode(np.dstack([scene()[..., 1], np.full((48, 64), 200, np.uint8)])),
        "bilevel.png": encode(Image.fromarray(scene()).convert("1")),
        "float.tif": encode(Image.fromarray(np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)), "TIFF"),
        "mask255.png": mask_png(target_mask() * 255),
        "mask01.png": mask_png(target_mask()),
        "mask_alpha.png": encode(rgba_mask),
        "mask_blank.png": mask_png(np.zeros((48, 64))),
        "mask_small.png": mask_png(np.ones((10, 10)) * 255),
        "empty.png": b"",
        "text.png": b"this is not an image, only some text\n" * 8,
        "truncated.png": good_png[:len(good_png) // 2],
        "no_end.png": good_png[:-12],
        "truncated.jpg": good_jpeg[:len(good_jpeg) // 2],
        "big.png": encode(np.zeros((200, 300, 3), np.uint8)),  # 60 000 pixels, over LIMITS
        "bomb.png": png_header_only(100_000, 100_000),
        "tiny.png": encode(scene(4, 4)),
        "folder.png/inside.txt": b"a folder named like an image\n",
    }


def _rows(root: Path) -> list[tuple[bytes | dict | None, str, str, tuple[int, int] | None]]:
    """(JSONL line: a row object, raw bytes, or None for a blank line; kind; message part; shape)."""
    def row(image: str, query: str = "red block", **extra) -> dict:
        return {"image": image, "query": query, **extra}

    ok = "ok"
    bad = "invalid"
    return [
        (row("good.png"), ok, "", (48, 64)),
        (None, "", "", None),  # a blank line: no row, the numbering goes on
        (row("sub/good.png", "  red block  "), ok, "", (48, 64)),
        (row("images_example/good.png", "red square"), ok, "", (48, 64)),  # the paper's folder prefix falls back
        (row("exif6.jpg", "green quadrant"), ok, "", (64, 32)),
        (row("grey.png"), ok, "", (48, 64)),
        (row("palette.png", "red stripe"), ok, "", (20, 30)),
        (row("grey16.png", "ramp"), ok, "", (16, 256)),
        (row("cmyk.jpg", "cyan stripe"), ok, "", (32, 64)),
        (row("rgba.png", "blue stripe"), ok, "", (20, 30)),
        (row("la.png"), ok, "", (48, 64)),
        (row("bilevel.png"), ok, "", (48, 64)),
        (row("float.tif"), ok, "", (48, 64)),
        (row("good.png", visible_mask="mask255.png"), ok, "", (48, 64)),
        (row("good.png", visible_mask="mask01.png"), ok, "", (48, 64)),
        (row("good.png", visible_mask="mask_alpha.png"), ok, "", (48, 64)),
        (row("good.png", "the red block", visible_mask=None, note="extra keys are ignored"), ok, "", (48, 64)),
        (row("missing.png"), bad, "image not found: missing.png", None),
        (row("../outside.png"), bad, "must not contain '..'", None),
        (row(str(root / "outside.png")), bad, "must be relative to the images folder", None),
        (row("link_out.png"), bad, "leads outside the images folder", None),
        (row("folder.png"), bad, "image is not a file", None),
        (row(""), bad, "image path is empty", None),
        (row("empty.png"), bad, "image file is empty", None),
        (row("text.png"), bad, "image file is not a PNG, JPEG, WEBP, TIFF, BMP or GIF image", None),
        (row("truncated.png"), bad, "truncated or corrupt", None),
        (row("no_end.png"), bad, "truncated or corrupt", None),
        (row("truncated.jpg"), bad, "truncated or corrupt", None),
        (row("big.png"), bad, "image too large: 300x200 = 60000 pixels, over the limit of 50000", None),
        (row("bomb.png"), bad, "could be decompression bomb", None),
        (row("tiny.png"), bad, "image too small: 4x4", None),
        (row("good.png", ""), bad, "query is empty", None),
        (row("good.png", " \t "), bad, "query is empty", None),
        (row("good.png", "x" * 65), bad, "query is too long: 65 characters, over the limit of 64", None),
        (row("good.png", "red\x07block"), bad, "control character (U+0007)", None),
        (row("good.png", visible_mask="mask_blank.png"), bad, "visible mask is empty", None),
        (row("good.png", visible_mask="mask_small.png"), bad, "visible mask is 10x10 but the image is 64x48", None),
        (row("good.png", visible_mask="nomask.png"), bad, "visible mask not found: nomask.png", None),
        (row("good.png", visible_mask="../outside.png"), bad, "visible mask path must not contain '..'", None),
        (b'{"image": "good.png", "query": }', bad, "is not valid JSON", None),
        (b'["good.png", "red block"]', bad, "is not a JSON object but a list", None),
        (b'{"image": "good.png"}', bad, "missing 'query'", None),
        (b'{"image": 7, "query": "red block"}', bad, "'image' must be a string, not int", None),
        (row("good.png", visible_mask=3), bad, "'visible_mask' must be a non-empty string or null", None),
        (b'{"image": "good.png", "query": "caf\xe9"}', bad, "is not UTF-8 text", None),
        (row("good.png", "last good row"), ok, "", (48, 64)),
    ]


def write_bad_corpus(root: Path) -> tuple[Path, list[dict]]:
    """Write the corpus under ``root``; return the annotation file and the expected outcome per row.

    Each expectation: ``{"line", "kind", "message", "shape"}`` (line: 1-based line in
    the annotation file; shape: loaded (height, width) of an ok row's image, else None).
    """
    images = root / IMAGES
    for name, data in _files().items():
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "outside.png").write_bytes(encode(scene()))
    (images / "link_out.png").symlink_to(root / "outside.png")
    lines, expected = [], []
    for number, (content, kind, message, shape) in enumerate(_rows(root), 1):
        if content is None:
            lines.append(b"")
            continue
        raw = content if isinstance(content, bytes) else json.dumps(content).encode()
        lines.append(raw)
        expected.append({"line": number, "kind": kind, "message": message, "shape": shape})
    annotations = root / "annotations.jsonl"
    annotations.write_bytes(b"\n".join(lines) + b"\n")
    return annotations, expected
