"""The method as step functions over a :class:`JobState` (docs/design.md steps 1-6).

Each step reads the job's artifacts, does its work, writes new artifacts under keys that depend
only on the job and the pass (so a repeated step rewrites the same keys with the same content),
and moves ``state.stage`` on. :func:`run_step` is the one way to run a step; the local runner calls
it in a loop, the stage workers call it once per message.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from amodal import artifacts as art
from amodal import keys
from amodal.artifacts import in_pass
from amodal.canvas import Window
from amodal.composite import compose_paper, compose_rgba
from amodal.geometry import bbox, resize_image, resize_mask
from amodal.images import InvalidInput, encode_png, load_image, load_mask
from amodal.loop import SKIPS, STOPS, next_pass, paste_inpainted, plan_first_pass, resegment, truncated_sides, window_occluders
from amodal.models.base import InpaintRequest
from amodal.stages import NAMES
from amodal.settings import Settings
from amodal.quality import clip_similarities, pass_entry, record_resegment, result_flags, result_quality
from amodal.scene import (Instances, OcclusionQuery, SceneRequest, detection_classes, occluder_masks,
                          prompt_candidates, segment_scenes)
from amodal.state import JobState
from amodal.storage import ObjectNotFound, Storage


IO_THREADS = 8  # a batch's artifacts are read and written in parallel (PNG coding and storage calls release the GIL)


@dataclass
class Context:
    """What steps need besides the job: storages, models and the clean background."""

    store: Storage  # artifacts and results
    inputs: Storage  # where jobs' images and given masks live
    models: Any  # amodal.models.registry.ModelSet or stand-ins with the same attributes
    background: np.ndarray


def _get_rgb(state: JobState, ctx: Context, name: str) -> np.ndarray:
    return art.get_rgb(ctx.store, state.key(name))


def _get_mask(state: JobState, ctx: Context, name: str) -> np.ndarray:
    return art.get_mask(ctx.store, state.key(name))


def _read_input(ctx: Context, key: str, what: str) -> bytes:
    try:
        return ctx.inputs.get(key)
    except ObjectNotFound:
        raise InvalidInput(f"{what} not found: {key}") from None


def ground(states: Sequence[JobState], ctx: Context) -> None:
    """Step 1 for a batch of jobs: the visible mask, given with the job or found from its query; the jobs
    without a given mask are grounded together, in one grounder call. A job's bad input ends it ``invalid``."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        # 1. each job's image and given mask (None where it is to be grounded or its input was bad)
        inputs = list(pool.map(lambda state: _ground_input(state, ctx), states))
        ready = [i for i, (image, _) in enumerate(inputs) if image is not None]
        # 2. the queries of the jobs without a mask, grounded together
        todo = [i for i in ready if not states[i].mask_key]
        if todo:
            grounder = ctx.models.grounder
            found = grounder.ground_batch([inputs[i][0] for i in todo], [states[i].query for i in todo])
            for i, grounding in zip(todo, found, strict=True):
                inputs[i] = (inputs[i][0], grounding.mask)
                states[i].grounder_text, states[i].backends["ground"] = grounding.text, grounder.name
        # 3. each job's outcome, and its image and visible mask
        list(pool.map(lambda i: _ground_output(states[i], ctx, *inputs[i]), ready))


def _ground_input(state: JobState, ctx: Context) -> tuple[np.ndarray | None, np.ndarray | None]:
    s = state.job_settings()
    try:
        image = load_image(_read_input(ctx, state.image_key, "image"), max_pixels=s.max_pixels, min_side=s.min_side)
        state.image_size = image.shape[:2]
        if not state.mask_key:
            return image, None
        state.backends["ground"] = "given"
        return image, load_mask(_read_input(ctx, state.mask_key, "visible mask"), image.shape[:2])
    except InvalidInput as exc:
        state.finish("invalid", str(exc))
        return None, None


def _ground_output(state: JobState, ctx: Context, image: np.ndarray, visible: np.ndarray | None) -> None:
    s = state.job_settings()
    if visible is None or not visible.any():
        state.finish("no_target", f"nothing in the image matched the query {state.query!r}")
        return
    art.put_rgb(ctx.store, state.key(art.IMAGE), image)
    art.put_mask(ctx.store, state.key(art.VISIBLE), visible)
    fraction = float(visible.mean())
    if fraction < s.min_target_fraction:
        state.finish("unoccluded", f"not completed: the target covers {fraction:.2%} of the image, "
                                   f"under the {s.min_target_fraction:.0%} minimum; result is its visible cut-out")
        return
    state.stage = "segment"


@dataclass(frozen=True)
class _Segmentable:
    image: np.ndarray  # the input image (first visit) or the last inpainted window
    visible: np.ndarray  # the target's visible mask in it
    current: np.ndarray  # the target's mask before this pass (the visible mask on the first visit)


def segment(states: Sequence[JobState], ctx: Context) -> None:
    """Step 2 for a batch of jobs, each on its image (first visit: tags, prompt, scene with background
    segments) or on its last inpainted window (scene, re-segmentation of the target, CLIP similarity of
    the completion to its prompt); every model runs once for the whole batch."""
    models = ctx.models
    with ThreadPoolExecutor(IO_THREADS) as pool:
        inputs = list(pool.map(lambda state: _segment_input(state, ctx), states))
        first = [i for i, state in enumerate(states) if state.passes == 0]
        later = [i for i, state in enumerate(states) if state.passes > 0]
        # 1. tags of each input image
        for i, tags in zip(first, models.tagger.tag([inputs[i].image for i in first])):
            cap = states[i].job_settings().max_tags
            states[i].tags = list(tags)[:cap] if cap else list(tags)
            states[i].backends["tag"] = models.tagger.name
        # 2. the target's class (the inpainting prompt), on each input image
        choices = models.prompt_chooser.choose(
            [inputs[i].image for i in first], [inputs[i].visible for i in first],
            [prompt_candidates(states[i].tags, states[i].query, states[i].job_settings()) for i in first])
        for i, choice in zip(first, choices):
            states[i].target_class, states[i].prompt = choice, f"a {choice}"
        # 3. scenes: the tags' instances; background segments on input images only
        requests = [SceneRequest(x.image, detection_classes(state.tags, state.query, state.target_class, state.passes > 0,
                                                            state.job_settings()),
                                 state.job_settings(), target=x.visible if state.passes == 0 else None,
                                 target_class=state.target_class) for state, x in zip(states, inputs)]
        scenes = segment_scenes(requests, models.detector, models.segmenter)
        for i in first:
            states[i].detections = sum(not label.startswith("background_") for label in scenes[i].labels)
        # 4. on windows: the target's new amodal mask, and how it came out
        amodal = {i: _resegment(states[i], scenes[i], inputs[i]) for i in later}
        # 5. on windows: the completion's CLIP similarity to its prompt
        similarities = clip_similarities(models.clip, [inputs[i].image for i in later], [amodal[i] for i in later],
                                         [states[i].prompt for i in later]) if later else []
        for i, similarity in zip(later, similarities):
            states[i].passes_log[-1]["clip_similarity"] = similarity
        list(pool.map(lambda i: _segment_output(states[i], ctx, scenes[i], inputs[i].visible.shape, amodal.get(i)),
                      range(len(states))))


def _segment_input(state: JobState, ctx: Context) -> _Segmentable:
    if state.passes == 0:
        visible = _get_mask(state, ctx, art.VISIBLE)
        return _Segmentable(_get_rgb(state, ctx, art.IMAGE), visible, visible)
    visible = _get_mask(state, ctx, art.WINDOW_VISIBLE)
    current = visible if state.passes == 1 else _get_mask(state, ctx, in_pass(state.passes - 1, art.AMODAL))
    return _Segmentable(_get_rgb(state, ctx, in_pass(state.passes, art.WINDOW)), visible, current)


def _resegment(state: JobState, scene: Instances, x: _Segmentable) -> np.ndarray:
    amodal, state.target_index = resegment(scene, x.current, x.visible, state.job_settings())
    record_resegment(state.passes_log[-1], state.target_index is not None, x.current, amodal)
    return amodal


def _segment_output(state: JobState, ctx: Context, scene: Instances, shape: tuple[int, int],
                    amodal: np.ndarray | None) -> None:
    if amodal is not None:
        art.put_mask(ctx.store, state.key(in_pass(state.passes, art.AMODAL)), amodal)
    art.put_instances(ctx.store, state.key(in_pass(state.passes, art.SCENE)), scene.labels, scene.masks, shape)
    state.stage = "occlusion"


def occlusion(states: Sequence[JobState], ctx: Context) -> None:
    """Step 4 for a batch of jobs (one occlusion-model call), then each job's loop decision: finish, or
    plan its next inpainting pass."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        queries = list(pool.map(lambda state: _occlusion_input(state, ctx), states))
        asked = [i for i, q in enumerate(queries) if q is not None]
        occluders = occluder_masks([queries[i] for i in asked], ctx.models.occlusion,
                                   [states[i].job_settings() for i in asked])
        list(pool.map(lambda i, o: _decide(states[i], ctx, queries[i].image, queries[i].exclude, o), asked, occluders))


def _occlusion_input(state: JobState, ctx: Context) -> OcclusionQuery | None:
    """Whose occluders to find: on the input image, the visible target's; on a window, the re-detected
    target's. A window where the target was lost asks, as ``lost_redetection`` says, about its first
    detection (the paper) or about the kept mask. With ``skip_undetected``, an image or window with no
    detection at all ends the row."""
    s = state.job_settings()
    scene = Instances(*art.get_instances(ctx.store, state.key(in_pass(state.passes, art.SCENE))))
    detected = state.detections if state.passes == 0 else len(scene.masks)
    if s.skip_undetected and not detected and not s.fixed_passes:
        _skip(state, "no_instances", where="the window" if state.passes else "the image")
        return None
    if state.passes == 0:
        visible = _get_mask(state, ctx, art.VISIBLE)
        return OcclusionQuery(_get_rgb(state, ctx, art.IMAGE), visible, scene, visible)
    image = _get_rgb(state, ctx, in_pass(state.passes, art.WINDOW))
    amodal = _get_mask(state, ctx, in_pass(state.passes, art.AMODAL))
    if state.target_index is not None:
        return OcclusionQuery(image, amodal, scene, amodal, own=state.target_index)
    if s.lost_redetection == "keep" or not scene.masks:
        return OcclusionQuery(image, amodal, scene, amodal)
    return OcclusionQuery(image, scene.masks[0], scene, amodal, own=0)


def _decide(state: JobState, ctx: Context, image: np.ndarray, target: np.ndarray, occluders: np.ndarray) -> None:
    """The loop's decision after the occlusion step: finish, or plan the next pass (amodal.loop)."""
    s = state.job_settings()
    if state.passes == 0:
        state.backends["occlusion"] = ctx.models.occlusion.name
        state.truncated = truncated_sides(target, occluders, s)
        if not occluders.any() and not state.truncated and not s.fixed_passes:
            _stop(state, "unoccluded")
            return
        _plan_first_pass(state, ctx, image, target, occluders, s)
        return
    unfilled = _get_mask(state, ctx, in_pass(state.passes, art.UNFILLED))
    stop, mask = next_pass(state.passes, window_occluders(occluders, target, s), unfilled,
                           _get_mask(state, ctx, art.FIRST_MASK), s)
    if stop is not None:
        _stop(state, stop)
        return
    art.put_mask(ctx.store, state.key(in_pass(state.passes, art.INPAINT_MASK)), mask)
    state.stage = "inpaint"


def _stop(state: JobState, reason: str) -> None:
    state.stop = reason
    state.finish("unoccluded" if reason == "unoccluded" else "completed", STOPS[reason].format(n=state.passes))


def _skip(state: JobState, reason: str, **details) -> None:
    """End the row with no result, where the paper's code skips it."""
    state.stop = reason
    state.finish("skipped", SKIPS[reason].format(**details))


def _plan_first_pass(state: JobState, ctx: Context, image: np.ndarray, visible: np.ndarray,
                     occluders: np.ndarray, s: Settings) -> None:
    """Write pass 1's inputs: window, first inpaint mask and the mixed-context image (or skip the row)."""
    plan = plan_first_pass(image, visible, occluders, state.truncated, ctx.background, s)
    state.window = plan.window.to_dict()
    if not plan.first_mask.any() and not s.fixed_passes:
        _skip(state, "empty_mask")
        return
    if plan.mixed is None:
        _skip(state, "background", size=plan.window.size, bg="x".join(map(str, ctx.background.shape[1::-1])))
        return
    art.put_rgb(ctx.store, state.key(art.WINDOW_ORIGINAL), plan.original)
    art.put_mask(ctx.store, state.key(art.WINDOW_VISIBLE), plan.visible)
    art.put_mask(ctx.store, state.key(art.FIRST_MASK), plan.first_mask)
    art.put_mask(ctx.store, state.key(in_pass(0, art.UNFILLED)), plan.unfilled)
    art.put_mask(ctx.store, state.key(in_pass(0, art.INPAINT_MASK)), plan.inpaint_mask)
    art.put_rgb(ctx.store, state.key(in_pass(0, art.WINDOW)), plan.mixed)
    state.stage = "inpaint"


def _inpaint_input(state: JobState, ctx: Context) -> tuple[np.ndarray, np.ndarray, InpaintRequest]:
    s = state.job_settings()
    image = _get_rgb(state, ctx, in_pass(state.passes, art.WINDOW))
    mask = _get_mask(state, ctx, in_pass(state.passes, art.INPAINT_MASK))
    size = (s.inpaint_size, s.inpaint_size)
    request = InpaintRequest(resize_image(image, size), resize_mask(mask, size), state.prompt,
                             seed=s.seed + state.passes if s.seed >= 0 else None,
                             window=Window.from_dict(state.window).image_box)
    return image, mask, request


def _inpaint_output(state: JobState, ctx: Context, image: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    painted, unfilled = paste_inpainted(image, mask, out, _get_mask(state, ctx, in_pass(state.passes, art.UNFILLED)),
                                        state.job_settings())
    state.passes += 1
    state.passes_log.append(pass_entry(state.passes, mask))
    art.put_rgb(ctx.store, state.key(in_pass(state.passes, art.WINDOW)), painted)
    art.put_mask(ctx.store, state.key(in_pass(state.passes, art.UNFILLED)), unfilled)
    state.backends["inpaint"] = ctx.models.inpainter.name
    state.stage = "segment"


def inpaint(states: Sequence[JobState], ctx: Context) -> None:
    """Step 5's diffusion pass for a batch of jobs, in one inpainter call."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        inputs = list(pool.map(lambda state: _inpaint_input(state, ctx), states))
        outputs = ctx.models.inpainter.inpaint([request for _, _, request in inputs])
        list(pool.map(lambda state, i, out: _inpaint_output(state, ctx, i[0], i[1], out), states, inputs, outputs))


def finalize(states: Sequence[JobState], ctx: Context) -> None:
    """Step 6 for each job."""
    _each(states, ctx, _finalize)


def _finalize(state: JobState, ctx: Context) -> None:
    """Step 6: write the result folder (images only for completed rows, and, with ``cutout_when_unoccluded``,
    the visible cut-out of unoccluded ones) and ``job.json`` with the result's ``quality`` and ``flags``
    (amodal.quality)."""
    s = state.job_settings()
    prefix = state.result_prefix
    summary: dict = {"quality": None, "flags": []}
    if state.status == "completed":
        summary = _write_completion(state, ctx, s)
    elif state.status == "unoccluded" and s.cutout_when_unoccluded:
        image = _get_rgb(state, ctx, art.IMAGE)
        visible = _get_mask(state, ctx, art.VISIBLE)
        rgba, box = compose_rgba(image, image, visible, visible, feather=s.feather, shrink=0)
        summary = _write_images(ctx.store, prefix, state.prompt, rgba, visible, visible, box, 0, 0)
        summary["quality"] = result_quality(visible, visible, state.passes_log, False, s)
    if summary.get("quality") is not None:
        summary["flags"] = result_flags(summary["quality"], state.stop, s)
        state.flags = list(summary["flags"])
    ctx.store.put(f"{prefix}/{keys.JOB_RECORD}", json.dumps(job_record(state, summary), indent=2).encode())
    _clean_artifacts(state, ctx.store)
    state.stage = "done"


def _write_completion(state: JobState, ctx: Context, s: Settings) -> dict:
    """A completed row's result images, composed as ``composite`` says, and its quality record."""
    window = Window.from_dict(state.window)
    visible = _get_mask(state, ctx, art.WINDOW_VISIBLE)
    amodal = _get_mask(state, ctx, in_pass(state.passes, art.AMODAL))
    completed = _get_rgb(state, ctx, in_pass(state.passes, art.WINDOW))
    original = _get_rgb(state, ctx, art.WINDOW_ORIGINAL)
    if s.composite == "paper":
        full = compose_paper(completed, original, visible, amodal, erode=s.visible_erode, shrink=s.visible_shrink)
        box = bbox(full[..., 3] > 0)
        x0, y0, x1, y1 = box
        rgba = full[y0:y1, x0:x1]
    else:
        rgba, box = compose_rgba(completed, original, visible, amodal, feather=s.feather, shrink=s.visible_shrink)
        full = None
    ox, oy = window.offset
    summary = _write_images(ctx.store, state.result_prefix, state.prompt, rgba, amodal, visible, box, ox, oy)
    if s.paper_files:
        _write_paper_files(ctx.store, state, full if full is not None else _uncrop(rgba, box, window.size),
                           amodal, (oy, ox))
    summary["quality"] = result_quality(visible, amodal, state.passes_log, True, s)
    return summary


def _uncrop(rgba: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    full = np.zeros((size, size, 4), np.uint8)
    x0, y0, x1, y1 = box
    full[y0:y1, x0:x1] = rgba
    return full


def _write_paper_files(store: Storage, state: JobState, rgba: np.ndarray, amodal: np.ndarray,
                       origin: tuple[int, int]) -> None:
    """The result as the paper's code writes it, under ``paper/``: the window-sized RGBA, the amodal mask (RGB,
    0 or 255), the window's origin in the input image as ``{"<class>_<n>": [row, col]}`` (``n``: the
    detections on the input image) and the chosen class."""
    prefix = f"{state.result_prefix}/{keys.PAPER_FOLDER}"
    store.put(f"{prefix}/{keys.COMPLETION}", encode_png(rgba))
    store.put(f"{prefix}/{keys.PAPER_SEGMENTATION}", encode_png(np.repeat(np.where(amodal, 255, 0).astype(np.uint8)[..., None], 3, 2)))
    store.put(f"{prefix}/{keys.OFFSETS}", json.dumps({f"{state.target_class}_{state.detections}": list(origin)},
                                                   sort_keys=True, indent=4).encode())
    store.put(f"{prefix}/{keys.PROMPT}", state.target_class.encode())


def _write_images(store: Storage, prefix: str, prompt: str, rgba: np.ndarray, amodal: np.ndarray,
                  visible: np.ndarray, box: tuple[int, int, int, int], ox: int, oy: int) -> dict:
    """The result images, cropped to ``box``; ``(ox, oy)`` is the arrays' origin in the input image."""
    x0, y0, x1, y1 = box
    offsets = {"x": ox + x0, "y": oy + y0, "width": x1 - x0, "height": y1 - y0}
    store.put(f"{prefix}/{keys.COMPLETION}", encode_png(rgba))
    store.put(f"{prefix}/{keys.AMODAL_MASK}", encode_png(np.where(amodal[y0:y1, x0:x1], 255, 0).astype(np.uint8)))
    store.put(f"{prefix}/{keys.VISIBLE_MASK}", encode_png(np.where(visible[y0:y1, x0:x1], 255, 0).astype(np.uint8)))
    store.put(f"{prefix}/{keys.OFFSETS}", json.dumps(offsets).encode())
    store.put(f"{prefix}/{keys.PROMPT}", prompt.encode())
    return {"offsets": offsets}


def job_record(state: JobState, extra: dict) -> dict:
    """What ``job.json`` says about a job: its outcome, how it got there, and its settings."""
    return {
        "job_id": state.job_id, "dataset": state.dataset, "image": state.image_key, "query": state.query,
        "visible_mask": state.mask_key, "status": state.status, "message": state.message,
        "prompt": state.prompt, "tags": state.tags, "backends": state.backends,
        "grounder_text": state.grounder_text, "passes": state.passes, "stop": state.stop,
        "truncated": state.truncated, "window": _window_record(state.window),
        "image_size": state.image_size, "timings": state.timings, "settings": state.settings, **extra,
    }


def _window_record(window: dict | None) -> dict | None:
    """The working window in input-image coordinates (it may reach outside the image)."""
    if window is None:
        return None
    w = Window.from_dict(window)
    x, y = w.offset
    return {"x": x, "y": y, "size": w.size}


def _clean_artifacts(state: JobState, store: Storage) -> None:
    """Drop the job's working arrays; its state records stay (small, and the job's history)."""
    keep = state.key("state/")
    for key in list(store.list(state.key_prefix + "/")):
        if not key.startswith(keep):
            store.delete(key)


def _each(states: Sequence[JobState], ctx: Context, step: Callable[[JobState, Context], None]) -> None:
    """Run a step that takes one job at a time over a batch; a job's bad input ends it ``invalid``."""
    for state in states:
        try:
            step(state, ctx)
        except InvalidInput as exc:
            state.finish("invalid", str(exc))


# Each stage of the table (amodal.stages) runs the step function of its name.
STEPS: dict[str, Callable[[Sequence[JobState], Context], None]] = {name: globals()[name] for name in NAMES}


def run_batch(stage: str, states: Sequence[JobState], ctx: Context) -> None:
    """Run the step of ``stage`` (amodal.stages) over several jobs in one call; each job is charged its share
    of the time."""
    start = time.perf_counter()
    STEPS[stage](states, ctx)
    share = (time.perf_counter() - start) / len(states)
    for state in states:
        state.add_time(stage, share)
        state.version += 1


def run_step(state: JobState, ctx: Context) -> None:
    """Run the job's current step alone; bad input ends the job as ``invalid`` instead of raising."""
    stage = state.stage
    try:
        run_batch(stage, [state], ctx)
    except InvalidInput as exc:
        state.finish("invalid", str(exc))
        state.version += 1
