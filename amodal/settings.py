"""Pipeline settings. Defaults are the paper's (see docs/design.md, "The method, step by step").

Every radius, kernel, margin and threshold of the method is here; a deliberate difference from the
paper's code is a named setting whose comment says why.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    # Scene (step 2)
    tag_threshold: float = 0.6
    max_tags: int = 40  # tags kept per image, highest scores first (bounds G-DINO's prompts to about one)
    box_threshold: float = 0.35
    text_threshold: float = 0.35
    background_erode_radius: int = 2
    background_min_area: int = 100
    same_instance_iou: float = 0.8  # an instance this close to the target is the target itself
    max_instances: int = 32  # detections kept per scene, highest scores first (bounds the pairs)
    # Occlusion (step 4)
    occlusion_threshold: float = 0.5
    border_margin: int = 10
    min_target_fraction: float = 0.01
    # Completion loop (step 5)
    canvas_scale: int = 6
    crop_margin: int = 60
    truncation_extra: int = 150
    max_passes: int = 3
    fixed_passes: int = 0  # > 0: exactly this many passes whatever the stop rules (benchmarks)
    edge_strip: int = 5
    first_mask_kernel: int = 5  # pass 1: (occluders + unfilled) dilated with this square kernel ...
    first_mask_iterations: int = 3  # ... this many times
    next_mask_kernel: int = 3  # later passes: (occluders + unfilled) & the first mask, dilated with this kernel ...
    next_mask_iterations: int = 1  # ... this many times
    touch_margin: int = 1  # masks this close touch (an occluder and the target; the amodal mask and the window's edge)
    truncation_through_occluders: bool = False  # also truncated where an occluder touching the target reaches
    # the border (the target may go on under it, past the image); off in the paper, whose window then cuts it
    inpaint_size: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    background: str = ""  # clean background image for mixed context; "" = the paper's gray wallpaper (shipped)
    # Output (step 6)
    feather: int = 5
    visible_shrink: int = 10
    # Quality flags (job.json "flags")
    flag_growth_ratio: float = 10.0  # runaway_growth: amodal area over this many times the visible (10: 90% hidden)
    flag_clip_similarity: float = 0.2  # low_clip_similarity: completion-to-prompt CLIP cosine under this
    # Ways in and backends
    grounder: str = "lisa"  # "lisa" (the paper) | "gdino_sam" (lighter)
    tagger: str = "ram_plus"  # "ram_plus" (the paper) | "clip" (lighter)
    sam_variant: str = "vit_h"
    lisa_quantization: str = ""  # "" (half precision) | "8bit" | "4bit" (bitsandbytes, CUDA only)
    # Input limits
    max_pixels: int = 40_000_000
    min_side: int = 16
    max_query_chars: int = 512
    # Runtime (does not change results)
    device: str = "auto"
    dtype: str = "auto"  # "auto" -> bfloat16 (or float16) on CUDA, float32 on CPU
    compile_unet: bool = True  # torch.compile the diffusion UNet on CUDA (once per worker; faster steps)
    compile_vae: bool = True  # torch.compile the diffusion VAE on CUDA (once per worker; faster en- and decoding)
    compile_sam: bool = True  # torch.compile SAM's image encoder on CUDA (once per worker; faster encoding)

    RUNTIME_FIELDS = ("device", "dtype", "compile_unet", "compile_vae", "compile_sam")

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return cls(**data)

    def result_fingerprint(self) -> str:
        """Hash of the settings that change a job's result (part of the job id)."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def settings_from_env() -> Settings:
    """Defaults with the overrides in ``AMODAL_SETTINGS`` (a JSON object), for producers and workers."""
    return Settings.from_dict(json.loads(os.environ.get("AMODAL_SETTINGS", "{}")))
