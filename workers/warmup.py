"""Load a stage's models in each worker process and run them once before it takes work."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from celery.signals import worker_process_init

from amodal.models.base import InpaintRequest
from amodal.stages import BY_NAME

log = logging.getLogger(__name__)
WARM_MESSAGE = "models loaded and warmed"


def _warm_inpainter(models, image: np.ndarray, mask: np.ndarray, size: int, batch: int) -> None:
    """A compiled UNet and VAE run a full ``batch``, then 2, then 1 image, so every graph a call can need is
    compiled before the worker takes work: the full batch's, a dynamic one for the sizes from 2 up, and one
    image's (torch.compile keeps a batch of 1 static). Warmed with 1 after the full batch alone, a first short
    call of 12 compiled for 55 s while the stage held every job (gpu_throughput_lisa_mps_finalize2.json)."""
    request = InpaintRequest(np.resize(image, (size, size, 3)), np.resize(mask, (size, size)), "an object", seed=0)
    compiled = getattr(models.inpainter, "compiled", False)
    for n in dict.fromkeys(n for n in (batch, 2, 1) if n <= batch) if compiled else (1,):
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


@contextmanager
def first_on_this_host(stage: str, key: dict) -> Iterator[None]:
    """Let one process of ``stage`` at a time into the block until one has finished it for ``key``, then every one
    at once.

    torch.compile keeps what it compiles in Inductor's on-disk cache, one per host and user
    (``TORCHINDUCTOR_CACHE_DIR``), and which batch sizes went dynamic beside it: a process that warms after another
    loads the first one's graphs instead of compiling them again, while processes warming together each compile
    every graph, competing for the host's cores. The mark of a finished warm-up lives in that cache, so clearing
    the cache clears it."""
    import torch
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = Path(cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    key = {**key, "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    done = folder / f"amodal-{stage}-{digest}.warmed"
    with open(folder / f"amodal-{stage}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        if not done.exists():
            yield
            done.touch()
            return
    yield


@worker_process_init.connect
def _warm_this_process(**_) -> None:
    from amodal.config import environment, resolve_settings

    stage = environment().worker_stage
    if not stage or not BY_NAME[stage].models:
        return
    from tasks.batching import batch_size
    from tasks.stage import models_for

    settings = resolve_settings()
    start = time.perf_counter()
    size, batch = settings.inpaint_size, batch_size(stage)
    with first_on_this_host(stage, {"settings": settings.to_dict(), "size": size, "batch": batch}):
        warm(stage, models_for(settings), size, batch)
    log.warning("%s worker: %s in %.1f s", stage, WARM_MESSAGE, time.perf_counter() - start)
