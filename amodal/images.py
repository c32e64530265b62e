"""Reading user images and masks safely, and PNG helpers for artifacts.

Every problem with an input becomes :class:`InvalidInput` with a message that says what is wrong.
Reading is strict: Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off, every image is fully decoded (and
PNG chunk checksums verified) before use, the size in the header is checked before decoding, and
Pillow's decompression-bomb warning counts as an error (so its own limit,
``PIL.Image.MAX_IMAGE_PIXELS``, applies as well as ``max_pixels``). Only the formats in
:data:`FORMATS` are opened. Images are read as a viewer shows them: EXIF orientation is applied.
Colour is taken as stored: ICC profiles are not applied.
"""
from __future__ import annotations

import io
import struct
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")  # JPEG includes MPO (camera JPEGs)
_FORMAT_NAMES = "a " + ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# What Pillow raises on broken files, besides UnidentifiedImageError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


class InvalidInput(ValueError):
    """A bad input; the message says what is wrong (a job's ``invalid`` outcome)."""


@contextmanager
def _pillow_errors(what: str) -> Iterator[None]:
    """Turn what Pillow raises on a bad file into :class:`InvalidInput` about ``what``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{what} too large: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"{what} file is not {_FORMAT_NAMES} image") from None
    except InvalidInput:
        raise
    except _DECODE_ERRORS as exc:
        raise InvalidInput(f"{what} is unreadable (truncated or corrupt): {exc}") from None


def _read(data: bytes, what: str, check_size: Callable[[tuple[int, int]], None]) -> Image.Image:
    """Open ``data``, check its (width, height) before decoding, verify, decode fully, orient.

    Call inside :func:`_pillow_errors`.
    """
    if not data:
        raise InvalidInput(f"{what} file is empty")
    with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
        check_size(probe.size)
        probe.verify()  # PNG: chunk checksums and the end chunk, which decoding alone does not need
    image = Image.open(io.BytesIO(data), formats=FORMATS)
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return image


def _high_depth_grey(image: Image.Image) -> np.ndarray:
    """8-bit grey from a 16-bit ("I" taken as 16-bit samples, clipped) or float (0..1) image."""
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        scaled = np.nan_to_num(values) * 255.0
    else:
        scaled = values / 257.0  # 65535 -> 255
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT or image.mode == "F":
        return np.repeat(_high_depth_grey(image)[..., None], 3, axis=2)
    if image.has_transparency_data:  # RGBA, LA, PA, or a palette / single colour marked transparent
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))
    return np.array(image.convert("RGB"))


def load_image(data: bytes, *, max_pixels: int, min_side: int) -> np.ndarray:
    """Decode an input image into uint8 RGB HxWx3.

    Grey, palette, 1-bit and CMYK images are converted to RGB; 16-bit samples are scaled by 1/257
    (mode "I" is read as 16-bit samples, clipped); float images are read as 0..1; transparency is
    composited over white. Refuses empty, non-image, truncated or corrupt data, images over
    ``max_pixels`` pixels and images whose shorter side is under ``min_side``.
    """
    def check_size(size: tuple[int, int]) -> None:
        width, height = size
        if width * height > max_pixels:
            raise InvalidInput(f"image too large: {width}x{height} = {width * height} pixels, "
                               f"over the limit of {max_pixels}")
        if min(width, height) < min_side:
            raise InvalidInput(f"image too small: {width}x{height}, its shorter side is under "
                               f"the minimum of {min_side} px")

    with _pillow_errors("image"):
        return _to_rgb(_read(data, "image", check_size))


def _mask_values(image: Image.Image) -> tuple[np.ndarray, float]:
    """The values a mask is read from, and their full-scale value."""
    if image.has_transparency_data:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() != alpha.max():
            return alpha, 255.0
    if image.mode in _SIXTEEN_BIT:
        return np.asarray(image), 65535.0
    if image.mode == "F":
        return np.nan_to_num(np.asarray(image)), 1.0
    return np.asarray(image.convert("RGB")).max(axis=2), 255.0


def load_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Decode a visible mask of an image of ``shape`` (height, width) into bool HxW.

    Rule: a mask with an alpha channel that is not the same everywhere is read from its alpha;
    otherwise from its grey level, a colour pixel's grey level being its brightest channel. A pixel
    is in the mask when that value is over half of full scale (over 127 for 8-bit masks), except
    that a mask holding only the values 0 and 1 (a 0/1 label map) counts 1 as in. So 0/1, 0/255,
    anti-aliased and even JPEG-compressed black-and-white masks all read as expected. EXIF
    orientation is applied, as for images. Refuses unreadable data, a size other than the image's,
    and a mask with no pixel set.
    """
    height, width = shape

    def mismatch(size: tuple[int, int]) -> InvalidInput:
        return InvalidInput(f"visible mask is {size[0]}x{size[1]} but the image is {width}x{height}")

    def check_size(size: tuple[int, int]) -> None:
        if sorted(size) != sorted((width, height)):  # the order may still change with orientation
            raise mismatch(size)

    with _pillow_errors("visible mask"):
        image = _read(data, "visible mask", check_size)
        if image.size != (width, height):
            raise mismatch(image.size)
        values, full = _mask_values(image)
    if np.isin(values, (0, 1)).all():
        mask = values == 1
    else:
        mask = values > full / 2
    if not mask.any():
        raise InvalidInput("visible mask is empty: no pixel is set")
    return mask


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of a bool HxW mask (stored as 0/255 grey) or a uint8 HxW, HxWx3 or HxWx4 array."""
    if array.dtype == bool:
        array = np.where(array, 255, 0).astype(np.uint8)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"cannot encode a {array.dtype} array of shape {array.shape} as PNG")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, "PNG", compress_level=1)  # speed over size
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_png`: uint8 HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA)."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        image.load()
        if image.mode not in ("L", "RGB", "RGBA"):
            raise ValueError(f"unexpected PNG mode {image.mode}")
        return np.array(image)
