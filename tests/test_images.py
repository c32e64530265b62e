"""Reading images and masks: every odd mode, orientation, and every way a file can be bad."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from amodal.images import InvalidInput, decode_png, encode_png, load_image, load_mask
from tests import badinputs as bad

BIG = 10**12  # no limit of our own: leaves Pillow's decompression-bomb check as the only one


def load(data: bytes, max_pixels: int = BIG, min_side: int = 1) -> np.ndarray:
    return load_image(data, max_pixels=max_pixels, min_side=min_side)


def refused(data: bytes, max_pixels: int = BIG, min_side: int = 1) -> str:
    with pytest.raises(InvalidInput) as info:
        load(data, max_pixels, min_side)
    return str(info.value)


def test_rgb_png_is_read_exactly():
    image = bad.scene()
    out = load(bad.encode(image))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, image)
    out[0, 0] = 0  # callers get a writable array of their own


def test_exif_orientation_6_rotates_clockwise():
    out = load(bad.exif_jpeg(6)).astype(int)
    assert out.shape == (64, 32, 3)  # stored 32 high and 64 wide
    top_left, top_right, bottom_left, bottom_right = bad.QUADRANT_COLOURS
    # turned a quarter clockwise: the stored bottom-left quadrant is now top-left, and so on
    expected = {(16, 8): bottom_left, (16, 24): top_left, (48, 8): bottom_right, (48, 24): top_right}
    for (y, x), colour in expected.items():
        assert np.abs(out[y, x] - colour).max() <= 8, ((y, x), out[y, x], colour)


@pytest.mark.parametrize("orientation, transform", [
    (1, lambda a: a),
    (2, lambda a: a[:, ::-1]),
    (3, lambda a: a[::-1, ::-1]),
    (4, lambda a: a[::-1]),
    (5, lambda a: a.transpose(1, 0, 2)),
    (6, lambda a: np.rot90(a, -1)),
    (7, lambda a: a[::-1, ::-1].transpose(1, 0, 2)),
    (8, lambda a: np.rot90(a, 1)),
])
def test_every_exif_orientation_matches_the_spec(orientation, transform):
    image = bad.scene(20, 30)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load(bad.encode(image, exif=exif.tobytes()))  # PNG: lossless, so exact
    np.testing.assert_array_equal(out, transform(image))


def test_grey_and_bilevel_become_equal_channels():
    grey = bad.scene()[..., 0]
    out = load(bad.encode(grey))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    bilevel = load(bad.encode(Image.fromarray(grey).convert("1")))
    assert set(np.unique(bilevel)) <= {0, 255} and len(np.unique(bilevel)) == 2


def test_palette_transparency_is_white():
    out = load(bad.palette_png())
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out[5, 5], (255, 255, 255))
    np.testing.assert_array_equal(out[5, 15], (255, 0, 0))
    np.testing.assert_array_equal(out[5, 25], (0, 255, 0))


def test_sixteen_bit_values_scale_to_eight_bit():
    ramp = bad.sixteen_bit_ramp()
    with Image.open(io.BytesIO(bad.grey16(ramp))) as check:
        assert check.mode == "I;16"
    out = load(bad.grey16(ramp))
    np.testing.assert_array_equal(out[0, :, 0], np.arange(256))
    # off-grid values round to the nearest step; big-endian TIFF (I;16B) and 32-bit "I" read alike
    values = np.array([[0, 128, 129, 385, 65535, 40000]] * 16, np.uint16)
    expected = np.rint(values / 257).astype(np.uint8)
    np.testing.assert_array_equal(load(bad.grey16(values))[..., 1], expected)
    big_endian = bad.encode(Image.fromarray(values.astype(">u2")), "TIFF")
    np.testing.assert_array_equal(load(big_endian)[..., 2], expected)
    as_int32 = bad.encode(Image.fromarray(values.astype(np.int32)), "TIFF")
    np.testing.assert_array_equal(load(as_int32)[..., 0], expected)


def test_float_images_are_read_as_zero_to_one():
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]] * 16, np.float32)
    out = load(bad.encode(Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 255, 0, 0])


def test_cmyk_converts_to_sensible_rgb():
    out = load(bad.cmyk_jpeg()).astype(int)
    cyan, magenta, yellow, black = (out[16, 8 + 16 * k] for k in range(4))
    for got, want in ((cyan, (0, 255, 255)), (magenta, (255, 0, 255)), (yellow, (255, 255, 0)), (black, (0, 0, 0))):
        assert np.abs(got - want).max() <= 12, (got, want)


def test_alpha_is_composited_over_white():
    out = load(bad.rgba_png())
    np.testing.assert_array_equal(out[5, 5], (255, 255, 255))  # alpha 0
    np.testing.assert_array_equal(out[5, 15], (127, 127, 255))  # alpha 128: half white, half blue
    np.testing.assert_array_equal(out[5, 25], (0, 0, 255))  # opaque
    la = np.dstack([np.full((16, 16), 100, np.uint8), np.full((16, 16), 51, np.uint8)])  # grey 100 at 20 %
    np.testing.assert_array_equal(load(bad.encode(la))[0, 0], (224, 224, 224))


@pytest.mark.parametrize("data, message", [
    (b"", "image file is empty"),
    (b"GIF89a but nothing else", "image file is not a PNG, JPEG"),
    (b"plain text, no image at all", "image file is not a PNG, JPEG, WEBP, TIFF, BMP or GIF image"),
    (bad.encode(np.zeros((16, 16, 3), np.uint8), "ICO"), "is not a PNG"),
])
def test_refuses_what_is_not_an_image(data, message):
    assert message in refused(data)


def test_refuses_truncated_files():
    png = bad.encode(bad.scene())
    jpeg = bad.encode(bad.scene(), "JPEG")
    for data in (png[:len(png) // 2], png[:-12], jpeg[:len(jpeg) // 2], jpeg[:-2]):
        assert "truncated or corrupt" in refused(data)
    corrupt = bytearray(png)
    corrupt[len(corrupt) // 2] ^= 0xFF
    assert "truncated or corrupt" in refused(bytes(corrupt))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    # the header claims 2000x2000 over 64 bytes of data: decoding would have to make up the rest
    message = refused(bad.png_header_only(2000, 2000), max_pixels=1_000_000)
    assert message == "image too large: 2000x2000 = 4000000 pixels, over the limit of 1000000"
    assert "over the limit of 50000" in refused(bad.encode(np.zeros((200, 300, 3), np.uint8)), max_pixels=50_000)
    assert load(bad.encode(np.zeros((200, 250, 3), np.uint8)), max_pixels=50_000).shape == (200, 250, 3)


@pytest.mark.parametrize("side", [100_000, 10_000])  # over Pillow's error limit; between its warning and error
def test_decompression_bombs_are_refused(side):
    message = refused(bad.png_header_only(side, side))
    assert message.startswith("image too large") and "decompression bomb" in message


def test_minimum_side():
    assert "image too small: 4x4" in refused(bad.encode(bad.scene(4, 4)), min_side=16)
    assert "image too small: 64x15" in refused(bad.encode(bad.scene(15, 64)), min_side=16)
    assert load(bad.encode(bad.scene(16, 16)), min_side=16).shape == (16, 16, 3)


def mask_of(data: bytes, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    return load_mask(data, shape)


def test_masks_of_every_encoding_read_the_same():
    target = bad.target_mask()
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 3] = target * 255
    red_on_black = np.zeros((48, 64, 3), np.uint8)
    red_on_black[target] = (255, 0, 0)
    encodings = {
        "0/255": bad.mask_png(target * 255),
        "0/1": bad.mask_png(target),
        "alpha": bad.encode(rgba),
        "red on black": bad.encode(red_on_black),
        "1-bit": bad.encode(Image.fromarray(target)),
        "16-bit": bad.grey16(target * 65535),
        "16-bit 0/1": bad.grey16(target),
        "jpeg": bad.encode(target.astype(np.uint8) * 255, "JPEG", quality=75),
    }
    for name, data in encodings.items():
        mask = mask_of(data)
        assert mask.dtype == bool and mask.shape == (48, 64), name
        np.testing.assert_array_equal(mask, target, err_msg=name)


def test_mask_threshold_is_half_scale():
    values = np.zeros((48, 64), np.uint8)
    values[:, :16], values[:, 16:32], values[:, 32:48] = 127, 128, 2
    mask = mask_of(bad.mask_png(values))
    assert not mask[:, :16].any() and mask[:, 16:32].all() and not mask[:, 32:].any()
    # an opaque alpha says nothing: the colour is read instead
    rgba = np.dstack([np.repeat(values[..., None], 3, axis=2), np.full((48, 64), 255, np.uint8)])
    np.testing.assert_array_equal(mask_of(bad.encode(rgba)), mask)


def test_mask_orientation_is_applied():
    target = bad.target_mask(30, 64)
    target[:5] = True  # not symmetric
    exif = Image.Exif()
    exif[0x0112] = 6
    mask = mask_of(bad.encode(target.astype(np.uint8) * 255, exif=exif.tobytes()), (64, 30))
    np.testing.assert_array_equal(mask, np.rot90(target, -1))


def test_mask_refusals():
    with pytest.raises(InvalidInput, match=r"^visible mask is 10x10 but the image is 64x48$"):
        mask_of(bad.mask_png(np.ones((10, 10)) * 255))
    with pytest.raises(InvalidInput, match=r"^visible mask is 48x64 but the image is 64x48$"):
        mask_of(bad.mask_png(np.ones((64, 48)) * 255))  # transposed, and no orientation to excuse it
    with pytest.raises(InvalidInput, match="visible mask is empty"):
        mask_of(bad.mask_png(np.zeros((48, 64))))
    with pytest.raises(InvalidInput, match="visible mask is empty"):
        mask_of(bad.mask_png(np.full((48, 64), 100)))  # all under half scale
    with pytest.raises(InvalidInput, match="visible mask file is not a PNG"):
        mask_of(b"not a mask")
    with pytest.raises(InvalidInput, match="visible mask file is empty"):
        mask_of(b"")
    png = bad.mask_png(bad.target_mask() * 255)
    with pytest.raises(InvalidInput, match="visible mask is unreadable"):
        mask_of(png[:len(png) // 2])
    with pytest.raises(InvalidInput, match="visible mask too large: .* decompression bomb"):
        mask_of(bad.png_header_only(100_000, 100_000))


@pytest.mark.parametrize("array", [
    bad.scene(),
    np.dstack([bad.scene(), np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)]),
    bad.scene()[..., 1],
])
def test_png_round_trip_is_lossless(array):
    out = decode_png(encode_png(array))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_png_helpers_for_masks_and_bad_arrays():
    mask = bad.target_mask()
    out = decode_png(encode_png(mask))
    np.testing.assert_array_equal(out, mask * 255)
    np.testing.assert_array_equal(load_mask(encode_png(mask), mask.shape), mask)
    for wrong in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)):
        with pytest.raises(ValueError):
            encode_png(wrong)
