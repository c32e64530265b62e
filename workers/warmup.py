"""Load a stage's models in each worker process and run them once before it takes work."""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
from celery.signals import worker_process_init

from amodal.logs import silence_loaded_libraries
from amodal.models.base import InpaintRequest
from amodal.stages import BY_NAME

log = logging.getLogger(__name__)
WARM_MESSAGE = "models loaded and warmed"


def _warm_inpainter(models, image: np.ndarray, mask: np.ndarray, size: int, batch: int) -> None:
    """A compiled UNet and VAE run a full ``batch``, then 1 image, so every graph a call can need is compiled before
    the worker takes work: the one for every batch above 1 and the VAE's for a single image (kept static). A first
    short call that compiled took 55 s while the stage held every job (gpu_throughput_lisa_mps_finalize2.json)."""
    request = InpaintRequest(np.resize(image, (size, size, 3)), np.resize(mask, (size, size)), "an object", seed=0)
    compiled = getattr(models.inpainter, "compiled", False)
    for n in dict.fromkeys((batch, 1)) if compiled else (1,):
        models.inpainter.inpaint([request] * n)


# One synthetic call per ModelSet attribute (amodal.stages names each stage's).
WARMERS: dict[str, Callable[..., object]] = {
    "grounder": lambda models, image, mask, size, batch: models.grounder.ground_batch([image] * batch, ["object"] * batch),
    "tagger": lambda models, image, mask, size, batch: models.tagger.tag([image]),
    "detector": lambda models, image, mask, size, batch: models.detector.detect([image], [["object"]]),
    "segmenter": lambda models, image, mask, size, batch: models.segmenter.segment([image], [[(64.0, 64.0, 192.0, 192.0)]]),
    "prompt_chooser": lambda models, image, mask, size, batch: models.prompt_chooser.choose([image], [mask], [["object"]]),
    "clip": lambda models, image, mask, size, batch: models.clip.text_features(["an object"]),
    "occlusion": lambda models, image, mask, size, batch: models.occlusion.occluders_of(
        [image], [mask], [[np.roll(mask, 40, axis=1)]]),
    "inpainter": _warm_inpainter,
}


def warm(stage: str, models, size: int = 512, batch: int = 1) -> None:
    """Touch every model of ``stage`` (loading it) and run it once on a synthetic image."""
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[64:192, 64:192] = True
    for model in BY_NAME[stage].models:
        WARMERS[model](models, image, mask, size, batch)


@worker_process_init.connect
def _warm_this_process(**_) -> None:
    from amodal.config import environment, resolve_settings

    stage = environment().worker_stage
    if not stage or not BY_NAME[stage].models:
        return
    from tasks.batching import batch_size
    from tasks.stage import models_for

    silence_loaded_libraries()
    settings = resolve_settings()
    start = time.perf_counter()
    warm(stage, models_for(settings), settings.inpaint_size, batch_size(stage))
    log.info("%s worker: %s in %.1f s", stage, WARM_MESSAGE, time.perf_counter() - start)
