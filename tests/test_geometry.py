"""Geometry against hand-made masks: canvas, window, truncation, morphology, offsets, blending."""
from __future__ import annotations

import numpy as np
import pytest

from amodal.canvas import Window, fit_background, neutral_background, place_window
from amodal.composite import compose_rgba, visible_weight
from amodal.geometry import (background_segments, bbox, dilate, edge_strips, erode_disk, iou, near_sides,
                             resize_mask)


def rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_bbox_and_iou():
    a = rect(50, 60, 10, 5, 20, 25)
    assert bbox(a) == (10, 5, 20, 25)
    assert bbox(np.zeros((4, 4), bool)) is None
    b = rect(50, 60, 15, 5, 25, 25)
    assert iou(a, b) == pytest.approx(100 / 300)
    assert iou(a, a) == 1.0


@pytest.mark.parametrize("box,expected", [
    ((0, 20, 10, 30), ["left"]),
    ((5, 0, 15, 10), ["left", "top"]),
    ((50, 50, 60, 60), []),
    ((90, 20, 100, 30), ["right"]),
    ((50, 91, 60, 100), ["bottom"]),
    ((11, 40, 20, 50), []),  # first column 11: more than 10 px from the left border
    ((10, 40, 20, 50), ["left"]),  # first column 10: within, as the paper's code counts (<= 10)
    ((50, 40, 89, 50), []),  # last column 88: under 100 - 10
    ((50, 40, 91, 50), ["right"]),  # last column 90: at 100 - 10
])
def test_near_sides(box, expected):
    assert near_sides(rect(100, 100, *box), 10) == expected


def test_dilation_schedule_sizes():
    dot = rect(41, 41, 20, 20, 21, 21)
    # 5x5 three times grows a point by 2 px per side per pass: a 13x13 square
    assert bbox(dilate(dot, 5, iterations=3)) == (14, 14, 27, 27)
    # 3x3 once: a 3x3 square
    assert bbox(dilate(dot, 3)) == (19, 19, 22, 22)


def test_erode_disk_radius_two():
    m = rect(30, 30, 5, 5, 25, 25)
    assert bbox(erode_disk(m, 2)) == (7, 7, 23, 23)


def test_background_segments_split_and_filter():
    covered = np.zeros((60, 100), bool)
    covered[:, 48:52] = True  # a wall splitting the free area in two
    covered[0:8, 0:8] = True
    for filled in (True, False):
        segs = background_segments(covered, erode_radius=2, min_area=100, filled=filled)
        assert len(segs) == 2
        assert all(not (s & covered).any() for s in segs)
        # a sliver under the area limit is dropped
        assert background_segments(~rect(60, 100, 10, 10, 20, 20), 2, 100, filled) == []
    # an object inside the free area: its outer contour's region holds it (the paper), the component does not
    covered = rect(60, 100, 40, 20, 60, 40)
    [outer] = background_segments(covered, 2, 100, filled=True)
    [component] = background_segments(covered, 2, 100, filled=False)
    assert outer[covered].all() and not component[covered].any()


def test_edge_strips():
    s = edge_strips((20, 30), ["left", "bottom"], 5)
    assert s[:, :5].all() and s[-5:, :].all()
    assert not s[:15, 5:].any()


def test_window_square_centred_with_margin():
    visible = rect(100, 200, 80, 40, 120, 60)  # 40 x 20 box away from borders
    win = place_window(visible, [], scale=6, margin=60, extra=150)
    assert win.size == 159  # max(39 + 120, 19 + 120): from the first to the last column, and 60 beyond each
    assert (win.image_x, win.image_y) == ((1200 - 200) // 2, (600 - 100) // 2)
    ox, oy = win.offset
    assert ox == 80 - 60
    # vertical span grown evenly: 139 -> 159 adds 10 each side
    assert oy == 40 - 60 - 10
    assert win.image_box == (ox, oy, ox + 159, oy + 159)


def test_window_grows_toward_truncated_side():
    visible = rect(100, 200, 0, 40, 30, 60)  # touches the left border
    win = place_window(visible, ["left"], scale=6, margin=60, extra=150)
    ox, oy = win.offset
    # width: 29 + 60 + 60 + 150 = 299; height: 19 + 120 = 139 grown evenly to 299
    assert win.size == 299
    assert ox == 0 - 60 - 150
    assert oy == 40 - 60 - 80


def test_window_vertical_growth_toward_truncated_side():
    visible = rect(100, 200, 80, 90, 160, 100)  # touches the bottom
    win = place_window(visible, ["bottom"], scale=6, margin=60, extra=150)
    ox, oy = win.offset
    assert win.size == 9 + 60 + 60 + 150  # height dominates: 279
    assert oy == 90 - 60  # bottom truncated: grown downward only
    assert ox == 80 - 60 - (279 - 199) // 2


def test_window_cut_on_both_sides_grows_toward_the_left_as_the_paper_does():
    visible = rect(200, 100, 0, 20, 100, 180)  # cut by the left and the right border, tall
    win = place_window(visible, ["left", "right"], scale=6, margin=5, extra=5)
    ox, oy = win.offset
    assert win.size == 159 + 10  # the height's span; the width's (99 + 20) grows by 50, all of it to the left
    assert ox == 0 - 5 - 5 - 50
    assert oy == 20 - 5


def test_window_clamped_to_canvas():
    visible = np.ones((20, 20), bool)
    win = place_window(visible, ["left", "top", "right", "bottom"], scale=6, margin=60, extra=150)
    assert win.size == 120  # the canvas is 120 x 120
    assert (win.x0, win.y0) == (0, 0)


def test_window_crop_and_outside():
    image = np.arange(10 * 12).reshape(10, 12).astype(np.uint8)
    win = Window(x0=45, y0=48, size=8, image_x=50, image_y=50, image_w=12, image_h=10)
    crop = win.crop(image, 255)
    assert crop.shape == (8, 8)
    assert crop[2, 5] == image[0, 0]  # window (5, 2) is image (0, 0)
    assert crop[0, 0] == 255
    out = win.outside_image()
    assert out[0].all() and out[:, :5].all() and not out[2:, 5:].any()


def test_window_roundtrip_dict():
    win = Window(1, 2, 3, 4, 5, 6, 7)
    assert Window.from_dict(win.to_dict()) == win


@pytest.mark.parametrize("size", [64, 700, 5000])
def test_fit_background_any_size(size):
    bg = neutral_background()[:300, :300]
    out = fit_background(bg, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8


def test_resize_mask_nearest():
    m = rect(4, 4, 0, 0, 2, 2)
    big = resize_mask(m, (8, 8))
    assert big[:4, :4].all() and not big[4:, :].any()


def test_visible_weight_feather_and_shrink():
    amodal = rect(60, 60, 10, 10, 50, 50)
    visible = rect(60, 60, 10, 10, 30, 50)  # left half visible, right half repainted
    w = visible_weight(visible, amodal, feather=5, shrink=10)
    assert w[30, 25] == pytest.approx(1.0)  # inside the visible part, 5+ px from the seam, 15 from the edge
    assert w[30, 35] == 0.0  # repainted part
    assert w[30, 12] == 0.0  # within 10 px of the transparent edge
    seam = w[30, 24:30]  # approaching the seam at x = 30 the weight falls off
    assert (np.diff(seam) <= 0).all() and seam[-1] < 0.5
    assert ((w >= 0) & (w <= 1)).all()


def test_compose_rgba_alpha_is_amodal_and_offsets():
    amodal = rect(60, 60, 10, 12, 50, 40)
    visible = rect(60, 60, 10, 12, 30, 40)
    original = np.full((60, 60, 3), 200, np.uint8)
    completed = np.full((60, 60, 3), 50, np.uint8)
    rgba, box = compose_rgba(completed, original, visible, amodal, feather=5, shrink=2)
    assert box == (10, 12, 50, 40)
    assert rgba.shape == (28, 40, 4)
    np.testing.assert_array_equal(rgba[..., 3], 255)
    assert rgba[14, 10, 0] == 200  # interior of the visible part keeps the original
    assert rgba[14, 35, 0] == 50  # the repainted part is the completion
    assert 50 < rgba[14, 19, 0] < 200  # the seam is blended


def test_compose_rgba_rejects_empty():
    z = np.zeros((5, 5), bool)
    with pytest.raises(ValueError):
        compose_rgba(np.zeros((5, 5, 3), np.uint8), np.zeros((5, 5, 3), np.uint8), z, z, feather=5, shrink=0)
