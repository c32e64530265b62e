"""The model folder: where each checkpoint lives, and one lazily loaded set of models per process.

Importing this module does not import torch (producers and the worker parent import it).

A stage worker touches only the models of its stage, so each model loads on first use and stays
resident after that.
"""
from __future__ import annotations

import functools
from pathlib import Path

from amodal.models.base import MissingCheckpointError, require
from amodal.settings import Settings
from amodal.stages import BY_NAME, NAMES as STAGES

# Paths inside a model folder; the names are those of the published checkpoints.
SAM_FILES = {
    "vit_h": "sam/sam_vit_h_4b8939.pth",
    "vit_l": "sam/sam_vit_l_0b3195.pth",
    "vit_b": "sam/sam_vit_b_01ec64.pth",
}
GROUNDING_DINO_DIR = "grounding-dino-tiny"
CLIP_DIR = "clip-vit-base-patch32"
SD_INPAINT_DIR = "stable-diffusion-2-inpainting"
INSTAORDER_FILE = "instaorder/InstaOrder_InstaOrderNet_od.pth.tar"
LISA_DIR = "LISA-13B-llama2-v1"
RAM_PLUS_FILE = "ram/ram_plus_swin_large_14m.pth"


def model_files(model: str, settings: Settings) -> list[str]:
    """The model folder's entries the :class:`ModelSet` attribute ``model`` loads with these settings."""
    sam = SAM_FILES[settings.sam_variant]
    return {
        "grounder": [LISA_DIR] if settings.grounder == "lisa" else [GROUNDING_DINO_DIR, sam],
        "tagger": [RAM_PLUS_FILE] if settings.tagger == "ram_plus" else [CLIP_DIR],
        "detector": [GROUNDING_DINO_DIR], "segmenter": [sam], "clip": [CLIP_DIR], "prompt_chooser": [CLIP_DIR],
        "occlusion": [INSTAORDER_FILE], "inpainter": [SD_INPAINT_DIR],
    }[model]


def stage_checkpoints(stage: str, settings: Settings) -> list[str]:
    """The model folder's entries the ``stage`` worker loads with these settings (amodal.stages)."""
    return list(dict.fromkeys(f for model in BY_NAME[stage].models for f in model_files(model, settings)))


def check_model_dir(model_dir: Path, settings: Settings, stages: tuple[str, ...] = STAGES) -> None:
    """Raise the missing-checkpoint error for the first entry ``stages`` need that ``model_dir`` lacks."""
    if not model_dir.is_dir():
        raise MissingCheckpointError(str(model_dir))
    for stage in stages:
        for relative in stage_checkpoints(stage, settings):
            require(model_dir / relative)


class ModelSet:
    """The models of one process, loaded once on first use."""

    def __init__(self, model_dir: str | Path, settings: Settings | None = None) -> None:
        # torch, only where models run
        from amodal.models.runtime import limit_cpu_threads, resolve_device, resolve_dtype

        self.model_dir = Path(model_dir)
        self.settings = settings or Settings()
        self.device = resolve_device(self.settings.device)
        limit_cpu_threads(self.device)
        s = self.settings
        self.dtype = resolve_dtype(s.dtype, self.device, s.precision, half=True)  # SD, CLIP, LISA
        self.exact_dtype = resolve_dtype(s.dtype, self.device, s.precision, half=False)  # G-DINO, SAM, InstaOrder, RAM++

    def path(self, relative: str) -> Path:
        return require(self.model_dir / relative)

    @functools.cached_property
    def segmenter(self):
        from amodal.models.sam import SamSegmenter

        return SamSegmenter.from_checkpoint(
            self.path(SAM_FILES[self.settings.sam_variant]), device=self.device, dtype=self.exact_dtype,
            compile_encoder=self.settings.compile_sam and self.device.type == "cuda",
        )

    @functools.cached_property
    def detector(self):
        from amodal.models.grounding_dino import GroundingDino

        s = self.settings
        return GroundingDino.from_pretrained(
            self.path(GROUNDING_DINO_DIR), device=self.device, dtype=self.exact_dtype,
            box_threshold=s.box_threshold, text_threshold=s.text_threshold,
            max_detections=s.max_instances or 900,  # 0: no cap, every one of G-DINO's 900 queries
        )

    @functools.cached_property
    def clip(self):
        from amodal.models.clip import Clip

        return Clip.from_pretrained(self.path(CLIP_DIR), device=self.device, dtype=self.dtype)

    @functools.cached_property
    def prompt_chooser(self):
        from amodal.models.clip import ClipPromptChooser

        return ClipPromptChooser(self.clip)

    @functools.cached_property
    def tagger(self):
        if self.settings.tagger == "clip":
            from amodal.models.clip import ClipTagger

            return ClipTagger(self.clip)
        if self.settings.tagger == "ram_plus":
            from amodal.models.ram_plus import RamPlusTagger

            return RamPlusTagger.from_checkpoint(
                self.path(RAM_PLUS_FILE), device=self.device, dtype=self.exact_dtype,
                threshold=self.settings.tag_threshold,
            )
        raise ValueError(f"unknown tagger {self.settings.tagger!r}")

    @functools.cached_property
    def grounder(self):
        if self.settings.grounder == "gdino_sam":
            from amodal.models.grounding import GdinoSamGrounder

            return GdinoSamGrounder(self.detector, self.segmenter)
        if self.settings.grounder == "lisa":
            from amodal.models.lisa import LisaGrounder

            quantization = self.settings.lisa_quantization
            if quantization not in ("", "8bit", "4bit"):
                raise ValueError(f"unknown lisa_quantization {quantization!r} (one of '', '8bit', '4bit')")
            return LisaGrounder.from_pretrained(
                self.path(LISA_DIR), device=self.device, dtype=self.dtype, load_in_8bit=quantization == "8bit",
                load_in_4bit=quantization == "4bit", compile_sam=self.settings.compile_sam and self.device.type == "cuda",
            )
        raise ValueError(f"unknown grounder {self.settings.grounder!r}")

    @functools.cached_property
    def occlusion(self):
        from amodal.models.instaorder import InstaOrder

        return InstaOrder.from_checkpoint(self.path(INSTAORDER_FILE), device=self.device, dtype=self.exact_dtype)

    @functools.cached_property
    def inpainter(self):
        from amodal.models.sd_inpaint import StableDiffusionInpainter

        s = self.settings
        return StableDiffusionInpainter.from_pretrained(
            self.path(SD_INPAINT_DIR), device=self.device, dtype=self.dtype,
            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
            compile_unet=s.compile_unet and self.device.type == "cuda",
            compile_vae=s.compile_vae and self.device.type == "cuda",
        )
