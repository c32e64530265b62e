"""Benchmark-only: the time of each model call in a worker process, for the time split of a stage.

``install`` wraps the model methods the steps call (``CLOCKED``); each outermost call (a method called
from another clocked one is not counted twice) synchronises the GPU before and after and logs
``model clock: Class.method SECONDS s`` to the worker's log. A step's time less its model calls' is its
work on the CPU (decoding, pre- and post-processing, storage).
"""
from __future__ import annotations

import functools
import logging
import re
import sys
import time

CLOCKED: dict[str, list[tuple[str, str]]] = {
    "amodal.models.ram_plus": [("RamPlusTagger", "tag")],
    "amodal.models.grounding_dino": [("GroundingDino", "detect")],
    "amodal.models.sam": [("SamSegmenter", "segment")],
    "amodal.models.clip": [("ClipPromptChooser", "choose"), ("Clip", "image_features"), ("Clip", "text_features")],
    "amodal.models.instaorder": [("InstaOrder", "occluders_of")],
    "amodal.models.sd_inpaint": [("StableDiffusionInpainter", "inpaint")],
    "amodal.models.lisa": [("LisaGrounder", "generate"), ("LisaGrounder", "masks_from_generations")],
}
LINE = re.compile(r"model clock: (\S+) ([\d.]+) s")
_depth = [0]
log = logging.getLogger(__name__)  # the worker's log format stamps each line with its time


def _clocked(name: str, method):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    @functools.wraps(method)
    def timed(*args, **kwargs):
        if _depth[0]:
            return method(*args, **kwargs)
        _depth[0] += 1
        try:
            sync()
            start = time.perf_counter()
            result = method(*args, **kwargs)
            sync()
            log.info("model clock: %s %.4f s", name, time.perf_counter() - start)
            return result
        finally:
            _depth[0] -= 1

    return timed


def install(module_name: str) -> None:
    """Wrap the clocked methods of one module of ``CLOCKED`` (once each)."""
    module = sys.modules[module_name]
    for cls_name, method_name in CLOCKED[module_name]:
        cls = getattr(module, cls_name)
        method = cls.__dict__[method_name]
        if not getattr(method, "clocked", False):
            wrapped = _clocked(f"{cls_name}.{method_name}", method)
            wrapped.clocked = True
            setattr(cls, method_name, wrapped)
