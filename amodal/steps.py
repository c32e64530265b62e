"""The method as step functions over a :class:`JobState` (DESIGN.md steps 1-6).

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
from amodal.canvas import Window, fit_background, place_window
from amodal.composite import compose_rgba
from amodal.geometry import dilate, edge_strips, near_sides, resize_image, resize_mask
from amodal.images import InvalidInput, encode_png, load_image, load_mask
from amodal.models.base import InpaintRequest
from amodal.scene import Instances, best_match, candidate_classes, occluder_masks, segment_scenes
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


def _pass_key(state: JobState, name: str, n: int | None = None) -> str:
    return state.key(f"p{state.passes if n is None else n}/{name}")


def _read_input(ctx: Context, key: str, what: str) -> bytes:
    try:
        return ctx.inputs.get(key)
    except ObjectNotFound:
        raise InvalidInput(f"{what} not found: {key}") from None


def ground(state: JobState, ctx: Context) -> None:
    """Step 1: the visible mask, given with the job or found from the query."""
    s = state.job_settings()
    image = load_image(_read_input(ctx, state.image_key, "image"), max_pixels=s.max_pixels, min_side=s.min_side)
    state.image_size = image.shape[:2]
    if state.mask_key:
        visible = load_mask(_read_input(ctx, state.mask_key, "visible mask"), image.shape[:2])
        state.backends["ground"] = "given"
    else:
        grounder = ctx.models.grounder
        found = grounder.ground(image, state.query)
        visible, state.grounder_text = found.mask, found.text
        state.backends["ground"] = grounder.name
    if visible is None or not visible.any():
        state.finish("no_target", f"nothing in the image matched the query {state.query!r}")
        return
    art.put_rgb(ctx.store, state.key("image.png"), image)
    art.put_mask(ctx.store, state.key("visible.png"), visible)
    fraction = float(visible.mean())
    if fraction < s.min_target_fraction:
        state.finish("unoccluded", f"not completed: the target covers {fraction:.2%} of the image, "
                                   f"under the {s.min_target_fraction:.0%} minimum; result is its visible cut-out")
        return
    state.stage = "segment"


def segment(states: Sequence[JobState], ctx: Context) -> None:
    """Step 2 for a batch of jobs, each on its image (first visit: tags, scene, prompt) or on its last
    inpainted window; every model runs once for the whole batch."""
    models = ctx.models
    with ThreadPoolExecutor(IO_THREADS) as pool:
        inputs = list(pool.map(lambda state: _segment_input(state, ctx), states))
        first = [i for i, state in enumerate(states) if state.passes == 0]
        for i, tags in zip(first, models.tagger.tag([inputs[i][0] for i in first])):
            states[i].tags = list(tags)[: states[i].job_settings().max_tags]
            states[i].backends["tag"] = models.tagger.name
        classes = [candidate_classes(state.tags, state.query) for state in states]
        scenes = segment_scenes([image for image, _ in inputs], classes, models.detector, models.segmenter,
                                [state.job_settings() for state in states])
        choices = models.prompt_chooser.choose([inputs[i][0] for i in first], [inputs[i][1] for i in first],
                                               [classes[i] for i in first])
        for i, choice in zip(first, choices):
            states[i].prompt = f"a {choice}"
        list(pool.map(lambda state, scene, i: _segment_output(state, ctx, scene, i[1]), states, scenes, inputs))


def _segment_input(state: JobState, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """The image to segment and the target's visible mask in it."""
    if state.passes == 0:
        return art.get_rgb(ctx.store, state.key("image.png")), art.get_mask(ctx.store, state.key("visible.png"))
    return art.get_rgb(ctx.store, _pass_key(state, "window.png")), art.get_mask(ctx.store, state.key("window/visible.png"))


def _segment_output(state: JobState, ctx: Context, scene: Instances, visible: np.ndarray) -> None:
    if state.passes > 0:
        art.put_mask(ctx.store, _pass_key(state, "amodal.png"), best_match(scene, visible))
    art.put_instances(ctx.store, _pass_key(state, "scene.npz"), scene.labels, scene.masks, visible.shape)
    state.stage = "occlusion"


def occlusion(states: Sequence[JobState], ctx: Context) -> None:
    """Step 4 for a batch of jobs (one occlusion-model call), then each job's loop decision: finish, or
    plan its next inpainting pass."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        inputs = list(pool.map(lambda state: _occlusion_input(state, ctx), states))
        occluders = occluder_masks([i[0] for i in inputs], [i[1] for i in inputs], [i[2] for i in inputs],
                                   ctx.models.occlusion, [state.job_settings() for state in states])
        list(pool.map(lambda state, i, o: _decide(state, ctx, i[0], i[1], o), states, inputs, occluders))


def _occlusion_input(state: JobState, ctx: Context) -> tuple[np.ndarray, np.ndarray, Instances]:
    """The image, the target's mask in it (visible on the first visit, amodal after) and its scene."""
    scene = Instances(*art.get_instances(ctx.store, _pass_key(state, "scene.npz")))
    if state.passes == 0:
        return art.get_rgb(ctx.store, state.key("image.png")), art.get_mask(ctx.store, state.key("visible.png")), scene
    return art.get_rgb(ctx.store, _pass_key(state, "window.png")), art.get_mask(ctx.store, _pass_key(state, "amodal.png")), scene


def _decide(state: JobState, ctx: Context, image: np.ndarray, target: np.ndarray, occluders: np.ndarray) -> None:
    s = state.job_settings()
    if state.passes == 0:
        state.backends["occlusion"] = ctx.models.occlusion.name
        state.truncated = near_sides(target, s.border_margin)
        if not occluders.any() and not state.truncated and not s.fixed_passes:
            state.finish("unoccluded", "nothing hides the target")
            return
        _plan_first_pass(state, ctx, image, target, occluders)
        return
    occluders = occluders | edge_strips(target.shape, near_sides(target, s.border_margin), s.edge_strip)
    if s.fixed_passes:
        if state.passes >= s.fixed_passes:
            state.finish("completed", f"stopped after the fixed {s.fixed_passes} pass(es)")
            return
    elif not occluders.any():
        state.finish("completed", f"complete after {state.passes} pass(es)")
        return
    elif state.passes >= s.max_passes:
        state.finish("completed", f"stopped at the limit of {s.max_passes} pass(es)")
        return
    unfilled = art.get_mask(ctx.store, _pass_key(state, "unfilled.png"))
    first = art.get_mask(ctx.store, state.key("window/first_mask.png"))
    mask = dilate(occluders | unfilled, 3) & first
    if not mask.any():
        if not s.fixed_passes:
            state.finish("completed", f"complete after {state.passes} pass(es): nothing left to repaint")
            return
        mask = first
    art.put_mask(ctx.store, _pass_key(state, "inpaint_mask.png"), mask)
    state.stage = "inpaint"


def _plan_first_pass(state: JobState, ctx: Context, image: np.ndarray, visible: np.ndarray,
                     occluders: np.ndarray) -> None:
    """Canvas, window, first inpaint mask and the mixed-context input of pass 1."""
    s = state.job_settings()
    window = place_window(visible, state.truncated, scale=s.canvas_scale, margin=s.crop_margin,
                          extra=s.truncation_extra)
    state.window = window.to_dict()
    original = window.crop(image, 255)
    visible_w = window.crop(visible, False)
    unfilled = window.outside_image()
    mask = dilate(window.crop(occluders, False) | unfilled, 5, iterations=3)
    mixed = np.where(visible_w[..., None], original, fit_background(ctx.background, window.size))
    art.put_rgb(ctx.store, state.key("window/original.png"), original)
    art.put_mask(ctx.store, state.key("window/visible.png"), visible_w)
    art.put_mask(ctx.store, state.key("window/first_mask.png"), mask)
    art.put_mask(ctx.store, _pass_key(state, "unfilled.png"), unfilled)
    art.put_mask(ctx.store, _pass_key(state, "inpaint_mask.png"), mask)
    art.put_rgb(ctx.store, _pass_key(state, "window.png"), mixed)
    state.stage = "inpaint"


def _inpaint_input(state: JobState, ctx: Context) -> tuple[np.ndarray, np.ndarray, InpaintRequest]:
    s = state.job_settings()
    image = art.get_rgb(ctx.store, _pass_key(state, "window.png"))
    mask = art.get_mask(ctx.store, _pass_key(state, "inpaint_mask.png"))
    size = (s.inpaint_size, s.inpaint_size)
    request = InpaintRequest(resize_image(image, size), resize_mask(mask, size), state.prompt,
                             seed=s.seed + state.passes, window=Window.from_dict(state.window).image_box)
    return image, mask, request


def _inpaint_output(state: JobState, ctx: Context, image: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    side = image.shape[0]
    painted = np.where(mask[..., None], resize_image(out, (side, side)), image)
    unfilled = art.get_mask(ctx.store, _pass_key(state, "unfilled.png")) & ~mask
    state.passes += 1
    art.put_rgb(ctx.store, _pass_key(state, "window.png"), painted)
    art.put_mask(ctx.store, _pass_key(state, "unfilled.png"), unfilled)
    state.backends["inpaint"] = ctx.models.inpainter.name
    state.stage = "segment"


def inpaint(states: Sequence[JobState], ctx: Context) -> None:
    """Step 5's diffusion pass for a batch of jobs, in one inpainter call."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        inputs = list(pool.map(lambda state: _inpaint_input(state, ctx), states))
        outputs = ctx.models.inpainter.inpaint([request for _, _, request in inputs])
        list(pool.map(lambda state, i, out: _inpaint_output(state, ctx, i[0], i[1], out), states, inputs, outputs))


def finalize(state: JobState, ctx: Context) -> None:
    """Step 6: write the result folder (images only for jobs that found their target)."""
    s = state.job_settings()
    prefix = state.result_prefix
    summary: dict = {}
    if state.status == "completed":
        window = Window.from_dict(state.window)
        visible = art.get_mask(ctx.store, state.key("window/visible.png"))
        amodal = art.get_mask(ctx.store, _pass_key(state, "amodal.png"))
        rgba, box = compose_rgba(
            art.get_rgb(ctx.store, _pass_key(state, "window.png")),
            art.get_rgb(ctx.store, state.key("window/original.png")),
            visible, amodal, feather=s.feather, shrink=s.visible_shrink,
        )
        ox, oy = window.offset
        summary = _write_images(ctx.store, prefix, state.prompt, rgba, amodal, visible, box, ox, oy)
    elif state.status == "unoccluded":
        image = art.get_rgb(ctx.store, state.key("image.png"))
        visible = art.get_mask(ctx.store, state.key("visible.png"))
        rgba, box = compose_rgba(image, image, visible, visible, feather=s.feather, shrink=0)
        summary = _write_images(ctx.store, prefix, state.prompt, rgba, visible, visible, box, 0, 0)
    ctx.store.put(f"{prefix}/job.json", json.dumps(job_record(state, summary), indent=2).encode())
    _clean_artifacts(state, ctx.store)
    state.stage = "done"


def _write_images(store: Storage, prefix: str, prompt: str, rgba: np.ndarray, amodal: np.ndarray,
                  visible: np.ndarray, box: tuple[int, int, int, int], ox: int, oy: int) -> dict:
    """The result images, cropped to ``box``; ``(ox, oy)`` is the arrays' origin in the input image."""
    x0, y0, x1, y1 = box
    offsets = {"x": ox + x0, "y": oy + y0, "width": x1 - x0, "height": y1 - y0}
    store.put(f"{prefix}/amodal_completion.png", encode_png(rgba))
    store.put(f"{prefix}/amodal_mask.png", encode_png(np.where(amodal[y0:y1, x0:x1], 255, 0).astype(np.uint8)))
    store.put(f"{prefix}/visible_mask.png", encode_png(np.where(visible[y0:y1, x0:x1], 255, 0).astype(np.uint8)))
    store.put(f"{prefix}/offsets.json", json.dumps(offsets).encode())
    store.put(f"{prefix}/prompt.txt", prompt.encode())
    return {"offsets": offsets}


def job_record(state: JobState, extra: dict) -> dict:
    """What ``job.json`` says about a job: its outcome, how it got there, and its settings."""
    return {
        "job_id": state.job_id, "dataset": state.dataset, "image": state.image_key, "query": state.query,
        "visible_mask": state.mask_key, "status": state.status, "message": state.message,
        "prompt": state.prompt, "tags": state.tags, "backends": state.backends,
        "grounder_text": state.grounder_text, "passes": state.passes, "truncated": state.truncated,
        "image_size": state.image_size, "timings": state.timings, "settings": state.settings, **extra,
    }


def _clean_artifacts(state: JobState, store: Storage) -> None:
    """Drop the job's working arrays; its state records stay (small, and the job's history)."""
    keep = state.key("state/")
    for key in list(store.list(state.key_prefix + "/")):
        if not key.startswith(keep):
            store.delete(key)


BATCHED: dict[str, Callable[[Sequence[JobState], Context], None]] = {
    "segment": segment, "occlusion": occlusion, "inpaint": inpaint,
}
STEPS: dict[str, Callable[[JobState, Context], None]] = {
    "ground": ground,
    "segment": lambda state, ctx: segment([state], ctx),
    "occlusion": lambda state, ctx: occlusion([state], ctx),
    "inpaint": lambda state, ctx: inpaint([state], ctx),
    "finalize": finalize,
}


def run_batch(stage: str, states: Sequence[JobState], ctx: Context) -> None:
    """Run a batched step (``BATCHED``) of several jobs in one call; each job is charged its share of the time."""
    start = time.perf_counter()
    BATCHED[stage](states, ctx)
    share = (time.perf_counter() - start) / len(states)
    for state in states:
        state.add_time(stage, share)
        state.version += 1


def run_step(state: JobState, ctx: Context) -> None:
    """Run the job's current step; bad input ends the job as ``invalid`` instead of raising."""
    stage = state.stage
    start = time.perf_counter()
    try:
        STEPS[stage](state, ctx)
    except InvalidInput as exc:
        state.finish("invalid", str(exc))
    state.add_time(stage, time.perf_counter() - start)
    state.version += 1
