"""Tiny random-weight checkpoints of every model, in the published formats and the model-folder layout.

They let a deployment's wiring be checked without downloading weights; their results are noise.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from tqdm import tqdm

from amodal.models.lpips import LPIPS_DIR
from amodal.models.registry import (
    CLIP_DIR,
    GROUNDING_DINO_DIR,
    INSTAORDER_FILE,
    LISA_DIR,
    RAM_PLUS_FILE,
    SAM_FILES,
    SD_INPAINT_DIR,
)

SEED = 0
# (adapter module with a ``write_tiny(target)``, path in the model folder)
TINY_MODELS: tuple[tuple[str, str], ...] = (
    ("amodal.models.sam", SAM_FILES["vit_h"]),
    ("amodal.models.grounding_dino", GROUNDING_DINO_DIR),
    ("amodal.models.clip", CLIP_DIR),
    ("amodal.models.sd_inpaint", SD_INPAINT_DIR),
    ("amodal.models.instaorder", INSTAORDER_FILE),
    ("amodal.models.lisa", LISA_DIR),
    ("amodal.models.ram_plus", RAM_PLUS_FILE),
    ("amodal.models.lpips", LPIPS_DIR),  # metric weights of ``amodal eval``
)


def write_tiny_models(model_dir: Path, progress: bool = True) -> list[Path]:
    """Write each adapter's tiny checkpoint at its registry path under ``model_dir``; return the paths.

    The same weights are written on every call.
    """
    model_dir = Path(model_dir)
    written: list[Path] = []
    for module_name, relative in tqdm(TINY_MODELS, desc="tiny models", unit="model", disable=not progress):
        target = model_dir / relative
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            importlib.import_module(module_name).write_tiny(target)
        written.append(target)
    return written
