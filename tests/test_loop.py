"""The real completion loop on synthetic scenes with oracle models: amodal masks match the truth."""
from __future__ import annotations

import json

import numpy as np
import pytest

from amodal.canvas import neutral_background
from amodal.geometry import iou
from amodal.images import decode_png, encode_png
from amodal.runner import run_job
from amodal.settings import Settings
from amodal.state import JobState
from amodal.steps import Context
from amodal.storage import LocalStorage
from tests.synthetic import Oracle, Scene, Shape, occluded_scene, truncated_scene, unoccluded_scene

ROBUST = Settings.preset("robust")  # these tests check the preset's departures as well as the loop


def run_scene(tmp_path, scene: Scene, query: str, settings: Settings | None = None, given_mask: bool = False,
              oracle_type: type[Oracle] = Oracle):
    settings = settings or ROBUST
    inputs = LocalStorage(tmp_path / "in")
    inputs.put("scene.png", encode_png(scene.render()))
    if given_mask:
        inputs.put("mask.png", encode_png(np.where(scene.visible(query), 255, 0).astype(np.uint8)))
    store = LocalStorage(tmp_path / "out")
    oracle = oracle_type(scene)
    ctx = Context(store=store, inputs=inputs, models=oracle, background=neutral_background())
    state = JobState(job_id="j1", dataset="d", image_key="scene.png", query=query, settings=settings.to_dict(),
                     mask_key="mask.png" if given_mask else None, result_prefix="results/d/j1")
    run_job(state, ctx)
    return state, store, oracle


def read_result(store: LocalStorage, prefix: str):
    rgba = decode_png(store.get(f"{prefix}/amodal_completion.png"))
    amodal = decode_png(store.get(f"{prefix}/amodal_mask.png")) > 127
    visible = decode_png(store.get(f"{prefix}/visible_mask.png")) > 127
    offsets = json.loads(store.get(f"{prefix}/offsets.json"))
    record = json.loads(store.get(f"{prefix}/job.json"))
    return rgba, amodal, visible, offsets, record


def truth_in_result_frame(scene: Scene, label: str, offsets: dict) -> np.ndarray:
    return scene.shape(label).mask(offsets["x"], offsets["y"], offsets["width"], offsets["height"])


@pytest.mark.parametrize("scene_fn,label,passes", [(occluded_scene, "ball", 1), (truncated_scene, "melon", 1)])
def test_loop_recovers_full_mask(tmp_path, scene_fn, label, passes):
    scene = scene_fn()
    state, store, oracle = run_scene(tmp_path, scene, label)
    assert state.status == "completed", state.message
    assert state.passes >= passes
    rgba, amodal, visible, offsets, record = read_result(store, state.result_prefix)
    truth = truth_in_result_frame(scene, label, offsets)
    assert iou(amodal, truth) >= 0.95
    # visible region is much smaller than the amodal one: something was really completed
    assert visible.sum() < 0.9 * amodal.sum()
    assert rgba.shape == amodal.shape + (4,) and rgba.dtype == np.uint8
    np.testing.assert_array_equal(rgba[..., 3], np.where(amodal, 255, 0))
    # the completed pixels carry the object's colour
    colour = np.array(scene.shape(label).colour)
    hidden = amodal & ~visible
    assert np.abs(rgba[hidden][:, :3].astype(int) - colour).max(axis=1).mean() < 30
    assert record["status"] == "completed" and record["prompt"] == f"a {label}"
    assert (tmp_path / "out" / state.result_prefix / "prompt.txt").read_text() == f"a {label}"


def test_truncated_target_extends_beyond_border(tmp_path):
    scene = truncated_scene()
    state, store, _ = run_scene(tmp_path, scene, "melon")
    _, amodal, _, offsets, _ = read_result(store, state.result_prefix)
    assert state.truncated == ["left"]
    assert offsets["x"] < 0  # the result reaches left of the input image
    assert offsets["x"] + offsets["width"] > 0


def test_unoccluded_target_gives_visible_cutout(tmp_path):
    scene = unoccluded_scene()
    state, store, oracle = run_scene(tmp_path, scene, "ball")
    assert state.status == "unoccluded"
    assert "inpaint" not in oracle.calls
    rgba, amodal, visible, offsets, _ = read_result(store, state.result_prefix)
    np.testing.assert_array_equal(amodal, visible)
    truth = truth_in_result_frame(scene, "ball", offsets)
    assert iou(amodal, truth) >= 0.99
    np.testing.assert_array_equal(rgba[..., 3] > 0, amodal)


def test_given_mask_skips_grounding(tmp_path):
    state, store, oracle = run_scene(tmp_path, occluded_scene(), "ball", given_mask=True)
    assert state.status == "completed"
    assert "ground" not in oracle.calls
    assert state.backends["ground"] == "given"


def test_no_target(tmp_path):
    state, store, _ = run_scene(tmp_path, occluded_scene(), "giraffe")
    assert state.status == "no_target"
    record = json.loads(store.get(f"{state.result_prefix}/job.json"))
    assert record["status"] == "no_target" and "giraffe" in record["message"]
    assert not store.exists(f"{state.result_prefix}/amodal_completion.png")


def test_tiny_target_is_not_completed(tmp_path):
    scene = Scene(400, 400, [Shape("ball", (220, 40, 40), "disc", 200, 200, 10, 10, depth=1)])
    state, _, oracle = run_scene(tmp_path, scene, "ball")
    assert state.status == "unoccluded" and "minimum" in state.message
    assert "tag" not in oracle.calls


def test_pass_limit_is_respected(tmp_path):
    """An occluder that never goes (the inpainter paints it back each time) stops at max_passes."""
    scene = occluded_scene()
    settings = ROBUST.replace(max_passes=2)

    class Stubborn(Oracle):
        def inpaint(self, requests):
            self._count("inpaint")
            return [np.where(r.mask[..., None], np.array(scene.shape("box").colour, np.uint8), r.image)
                    for r in requests]

        def occluders_of(self, images, targets, others):
            return [np.ones(len(rest)) for rest in others]

    inputs = LocalStorage(tmp_path / "in")
    inputs.put("scene.png", encode_png(scene.render()))
    store = LocalStorage(tmp_path / "out")
    oracle = Stubborn(scene)
    ctx = Context(store=store, inputs=inputs, models=oracle, background=neutral_background())
    state = JobState(job_id="j2", dataset="d", image_key="scene.png", query="ball", settings=settings.to_dict(),
                     result_prefix="r/j2")
    run_job(state, ctx)
    assert state.status == "completed" and state.passes == 2 and oracle.calls["inpaint"] == 2
    assert "limit" in state.message and state.stop == "limit"
    assert "stopped_at_limit" in json.loads(store.get("r/j2/job.json"))["flags"]


def test_artifacts_cleaned_but_state_kept(tmp_path):
    state, store, _ = run_scene(tmp_path, occluded_scene(), "ball")
    leftovers = list(store.list("jobs/j1/"))
    assert leftovers == []  # the local loop keeps no state record; workers write one


def test_fixed_passes_overrides_the_stop_rules(tmp_path):
    """Benchmarks fix the work: exactly N passes even when the object is complete after one."""
    state, store, oracle = run_scene(tmp_path, occluded_scene(), "ball", ROBUST.replace(fixed_passes=3))
    assert state.status == "completed" and state.passes == 3 and oracle.calls["inpaint"] == 3
    record = json.loads(store.get(f"{state.result_prefix}/job.json"))
    assert set(record["timings"]) >= {"ground", "segment", "occlusion", "inpaint"}
    assert all(t >= 0 for t in record["timings"].values())


def test_unoccluded_target_is_still_inpainted_with_fixed_passes(tmp_path):
    state, _, oracle = run_scene(tmp_path, unoccluded_scene(), "ball", ROBUST.replace(fixed_passes=1))
    assert state.status == "completed" and oracle.calls["inpaint"] == 1


def test_max_instances_keeps_the_best_detections():
    from amodal.models.base import Detection
    from amodal.scene import SceneRequest, segment_scenes

    class Many:
        def detect(self, images, labels):
            return [[Detection("x", (0.0, 0.0, 4.0 + i, 4.0 + i), score=i / 10) for i in range(10)] for _ in images]

        def segment(self, images, boxes):
            out = []
            for image, image_boxes in zip(images, boxes):
                out.append([])
                for box in image_boxes:
                    m = np.zeros(image.shape[:2], bool)
                    m[: int(box[3]), : int(box[2])] = True
                    out[-1].append(m)
            return out

    image = np.zeros((40, 40, 3), np.uint8)
    requests = [SceneRequest(image, ["x"], ROBUST.replace(max_instances=n)) for n in (3, 1)]
    scenes = segment_scenes(requests, Many(), Many())
    assert [m.sum() for m in scenes[0].masks] == [13 * 13, 12 * 12, 11 * 11]  # the three best scores
    assert [m.sum() for m in scenes[1].masks] == [13 * 13]  # each image under its own settings


def test_max_tags_keeps_the_best_tags(tmp_path):
    class Wordy(Oracle):
        def tag(self, images):
            return [tags + [f"thing{i}" for i in range(50)] for tags in super().tag(images)]

    scene = occluded_scene()
    state, store, _ = run_scene(tmp_path, scene, "ball", ROBUST.replace(max_tags=3), oracle_type=Wordy)
    expected = Wordy(scene).tag([scene.render()])[0][:3]
    assert state.status == "completed" and state.tags == expected
    assert json.loads(store.get(f"{state.result_prefix}/job.json"))["tags"] == expected


def test_jobs_batched_together_end_as_they_do_one_by_one(tmp_path):
    from amodal.stages import BATCHED_STAGES
    from amodal.steps import run_batch, run_step

    scene = Scene(240, 200, [*occluded_scene().shapes, *truncated_scene().shapes])
    queries = ["ball", "melon", "box", "ball"]
    settings = [ROBUST, ROBUST, ROBUST, ROBUST.replace(fixed_passes=2)]

    def run(folder: str, together: bool):
        inputs = LocalStorage(tmp_path / "in")
        inputs.put("scene.png", encode_png(scene.render()))
        store, oracle = LocalStorage(tmp_path / folder), Oracle(scene)
        ctx = Context(store=store, inputs=inputs, models=oracle, background=neutral_background())
        states = [JobState(job_id=f"j{i}", dataset="d", image_key="scene.png", query=q, settings=s.to_dict(),
                           result_prefix=f"results/d/j{i}") for i, (q, s) in enumerate(zip(queries, settings))]
        if not together:
            for state in states:
                run_job(state, ctx)
        while together and (live := [s for s in states if s.stage != "done"]):
            stage = live[0].stage
            same = [s for s in live if s.stage == stage]
            if stage in BATCHED_STAGES:
                run_batch(stage, same, ctx)
            else:
                for state in same:
                    run_step(state, ctx)
        return states, store, oracle

    alone, alone_store, alone_oracle = run("alone", together=False)
    batched, batched_store, batched_oracle = run("batched", together=True)
    assert [s.status for s in alone] == ["completed", "completed", "unoccluded", "completed"]
    assert [(s.status, s.passes, s.prompt, s.tags) for s in batched] == [(s.status, s.passes, s.prompt, s.tags) for s in alone]
    for state in alone:
        files = sorted(alone_store.list(state.result_prefix + "/"))
        assert files == sorted(batched_store.list(state.result_prefix + "/"))
        for key in files:
            if not key.endswith("job.json"):
                assert alone_store.get(key) == batched_store.get(key), key
    for model in ("tag", "detect", "segment", "choose", "occlusion", "inpaint"):
        assert batched_oracle.calls[model] < alone_oracle.calls[model], model  # fewer, larger calls
