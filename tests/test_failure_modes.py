"""The completion loop when a model misses: the result stays close to the truth, or a named flag says
what went wrong; never a silent ``completed`` with a wrong mask (docs/design.md step 5)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from amodal.canvas import fit_background, neutral_background
from amodal.geometry import dilate, iou
from amodal.images import load_image
from amodal.loop import next_pass, plan_first_pass
from amodal.quality import result_flags
from amodal.runner import run_local
from amodal.scene import SceneRequest, segment_scenes
from amodal.settings import Settings
from tests.synthetic import (BlindOnWindows, MissesGrounded, MissesInCrowd, Oracle, border_occluder_scene,
                             occluded_scene, synthetic_dataset, truncated_scene)
from tests.test_loop import read_result, run_scene

FRAME = 500  # results are compared with the truth on a frame reaching this far around the image

ROBUST = Settings.preset("robust")  # these tests check the preset's departures as well as the loop


def outcome(tmp_path, scene_fn, label, oracle_type=Oracle, settings=None, given_mask=False, **kwargs):
    """The job's state, its job.json, the amodal mask's IoU with the truth and its area over the truth's."""
    scene = scene_fn()
    oracle_cls = (lambda s: oracle_type(s, label)) if oracle_type is not Oracle else Oracle
    state, store, oracle = run_scene(tmp_path, scene, label, settings, given_mask, oracle_type=oracle_cls)
    _, amodal, _, offsets, record = read_result(store, state.result_prefix)
    frame = np.zeros((scene.height + 2 * FRAME, scene.width + 2 * FRAME), bool)
    x, y = offsets["x"] + FRAME, offsets["y"] + FRAME
    frame[y:y + offsets["height"], x:x + offsets["width"]] = amodal
    truth = scene.shape(label).mask(-FRAME, -FRAME, frame.shape[1], frame.shape[0])
    return state, record, iou(frame, truth), frame.sum() / truth.sum(), oracle


@pytest.mark.parametrize("scene_fn,label", [(occluded_scene, "ball"), (truncated_scene, "melon")])
def test_lost_redetection_keeps_the_mask_and_is_flagged(tmp_path, scene_fn, label):
    """The detector misses the completed target on every window: the background around it never
    becomes the object (before: 6.9x and 14x the true area, IoU 0.15 and 0.07, no flag)."""
    state, record, _, area, _ = outcome(tmp_path, scene_fn, label, BlindOnWindows)
    assert record["status"] == "completed"
    assert area <= 1.0  # the kept mask is the visible one: never more than the object
    assert "target_lost" in record["flags"]
    assert [p["redetected"] for p in record["quality"]["passes"]] == [False] * state.passes


def test_target_class_detected_on_its_own_on_windows(tmp_path):
    """The detector finds the target only when asked for its class alone: the separate pass does."""
    state, record, overlap, area, _ = outcome(tmp_path, occluded_scene, "ball", MissesInCrowd)
    assert record["status"] == "completed" and record["flags"] == []
    assert overlap >= 0.95 and area == pytest.approx(1.0, abs=0.05)
    assert all(p["redetected"] for p in record["quality"]["passes"])


@pytest.mark.parametrize("given_mask", [True, False])
def test_grounded_target_missed_by_the_detector_is_not_its_own_occluder(tmp_path, given_mask):
    """The detector misses the target the grounder found, and the occlusion model reads overlap as
    occlusion: the target still counts as covered, so no background segment holds it (before: 93% of
    the window repainted, against 42% when the detector finds the target)."""
    _, record, overlap, _, _ = outcome(tmp_path / "miss", occluded_scene, "ball", MissesGrounded, given_mask=given_mask)
    _, plain, _, _, _ = outcome(tmp_path / "plain", occluded_scene, "ball")
    assert record["status"] == "completed" and overlap >= 0.95 and record["flags"] == []
    first, expected = record["quality"]["passes"][0], plain["quality"]["passes"][0]
    assert first["inpainted_fraction"] == expected["inpainted_fraction"] < 0.5


def test_background_segments_leave_out_the_target_and_exist_only_on_input_images():
    scene = occluded_scene()
    image, visible = scene.render(), scene.visible("ball")
    oracle = MissesGrounded(scene, "ball")
    on_image, = segment_scenes([SceneRequest(image, ["ball", "box"], ROBUST, target=visible)], oracle, oracle)
    assert any(label.startswith("background_") for label in on_image.labels)
    assert all(not (m & visible).any() for m in on_image.masks)
    window = np.pad(image, ((10, 10), (10, 10), (0, 0)), constant_values=236)
    on_window, = segment_scenes([SceneRequest(window, ["box"], ROBUST, target_class="ball")], oracle, oracle)
    assert sorted(on_window.labels) == ["ball", "box"]  # the class's own pass found the target


def test_occluder_across_the_border_is_flagged_or_followed(tmp_path):
    """The target goes on past the border under an occluder that crosses it. As in the paper, its window
    cuts it: flagged ``window_edge`` (IoU 0.82). With ``truncation_through_occluders`` the window
    grows toward that border and the completion is whole."""
    _, record, overlap, _, _ = outcome(tmp_path / "paper", border_occluder_scene, "ball",
                                       settings=ROBUST.replace(truncation_through_occluders=False))
    assert overlap < 0.9 and {"window_edge", "stopped_at_limit"} <= set(record["flags"])
    assert record["quality"]["window_edge"]
    state, record, overlap, _, _ = outcome(tmp_path / "through", border_occluder_scene, "ball",
                                           settings=ROBUST.replace(truncation_through_occluders=True))
    assert "bottom" in state.truncated and overlap >= 0.95
    assert "window_edge" not in record["flags"] and not record["quality"]["window_edge"]


def test_quality_record_of_a_good_completion(tmp_path):
    state, record, overlap, _, _ = outcome(tmp_path, occluded_scene, "ball")
    q = record["quality"]
    scene = occluded_scene()
    assert overlap >= 0.95 and record["flags"] == [] and record["stop"] == "complete"
    assert q["visible_px"] == scene.visible("ball").sum()
    assert q["amodal_px"] == pytest.approx(scene.shape("ball").mask(0, 0, 240, 200).sum(), rel=0.03)
    assert q["growth_ratio"] == pytest.approx(q["amodal_px"] / q["visible_px"], abs=1e-3)
    (p,) = q["passes"]
    assert p["pass"] == 1 and p["redetected"] and 0 < p["inpainted_fraction"] < 1
    assert p["growth"] == pytest.approx(q["growth_ratio"], abs=1e-3) and p["amodal_px"] == q["amodal_px"]
    assert q["clip_similarity"] == p["clip_similarity"] > 0.95  # the cut-out is the prompt's object
    assert not q["window_edge"]
    assert state.passes_log == q["passes"]  # per-pass data lives in the state
    json.dumps(state.passes_log)


def test_manifest_lines_carry_quality_and_flags(tmp_path):
    images, annotations = synthetic_dataset(tmp_path, count=2)
    scene = truncated_scene()  # row 1 (the truncated melon) is the scene the stand-in knows
    run_local(images, annotations, tmp_path / "out", BlindOnWindows(scene, "melon"), ROBUST, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    first = lines[0]
    record = json.loads((tmp_path / "out" / first["job_id"] / "job.json").read_text())
    assert first["status"] == "completed" and "target_lost" in first["flags"]
    assert first["quality"] == record["quality"] and first["flags"] == record["flags"]


@pytest.mark.parametrize("quality,stop,expected", [
    ({"growth_ratio": 10.5, "window_edge": False, "clip_similarity": 0.3, "passes": []}, "complete", ["runaway_growth"]),
    ({"growth_ratio": 2.0, "window_edge": False, "clip_similarity": 0.1, "passes": []}, "complete",
     ["low_clip_similarity"]),
    ({"growth_ratio": 2.0, "window_edge": True, "clip_similarity": None, "passes": [{"redetected": False}]}, "limit",
     ["target_lost", "window_edge", "stopped_at_limit"]),
    ({"growth_ratio": 10.0, "window_edge": False, "clip_similarity": 0.2, "passes": [{"redetected": True}]}, "complete",
     []),
])
def test_flag_thresholds(quality, stop, expected):
    assert result_flags(quality, stop, ROBUST) == expected


def test_later_pass_mask_is_intersected_then_dilated():
    """The paper: (occluders + unfilled) & the first mask, then one 3x3 dilation."""
    first = np.zeros((40, 40), bool)
    first[10:30, 10:30] = True
    occluders = np.zeros((40, 40), bool)
    occluders[15:20, 0:40] = True
    unfilled = np.zeros((40, 40), bool)
    stop, mask = next_pass(1, occluders, unfilled, first, ROBUST)
    assert stop is None
    np.testing.assert_array_equal(mask, dilate(occluders & first, 3))
    assert mask[15, 9] and not mask[15, 8]  # one pixel past the first mask, not the occluder's full width


def test_default_background_is_the_papers_wallpaper(paper_examples):
    wallpaper = load_image((paper_examples / "gray_wallpaper.jpeg").read_bytes(), max_pixels=10**8, min_side=1)
    np.testing.assert_array_equal(neutral_background(), wallpaper)
    scene = occluded_scene()
    visible = scene.visible("ball")
    plan = plan_first_pass(scene.render(), visible, np.zeros_like(visible), [], wallpaper, ROBUST)
    clean = fit_background(wallpaper, plan.window.size)
    np.testing.assert_array_equal(plan.mixed[~plan.visible], clean[~plan.visible])
