"""Pipeline settings. Defaults are the paper's (see docs/design.md, "The method, step by step").

Every radius, kernel, margin and threshold of the method is here; a deliberate difference from the
paper's code is a named setting whose comment says why.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Settings:
    # Rows
    all_labels: bool = False  # a paper-format entry gives a job per label (else its first label only, the paper)
    # Scene (step 2)
    tag_threshold: float = 0.6
    max_tags: int = 0  # tags kept per image, the first ones in the tagger's order; 0 keeps every one (the paper)
    box_threshold: float = 0.35
    text_threshold: float = 0.35
    background_erode_radius: int = 2
    background_min_area: int = 100
    background_filled: bool = True  # background segments are the regions their outer contours enclose (the paper:
    # one around the target contains it, and may be put over it) | their connected pixels, holes left out
    background_class: bool = True  # "background" is a class to detect and a prompt CLIP may choose (the paper)
    class_pass: Literal["when_missing", "windows"] = "when_missing"  # the target's class alone through G-DINO: "when_missing" (the paper: on
    # the input and on windows, its boxes added only when no phrase of the joint pass names it) | "windows"
    same_instance_iou: float = 0.0  # an instance this close to the target is the target itself and never its
    # occluder; 0 asks about every instance (the paper skips only the target's own mask)
    max_instances: int = 0  # detections kept per detection pass, highest scores first; 0 keeps every one (the paper)
    # Occlusion (step 4)
    occlusion_threshold: float = 0.5
    border_margin: int = 10
    min_target_fraction: float = 0.01
    # Completion loop (step 5)
    canvas_scale: int = 6
    crop_margin: int = 60
    truncation_extra: int = 150
    max_passes: int = 4  # the paper's code stops once its pass counter exceeds 3, after the 4th pass
    fixed_passes: int = 0  # > 0: exactly this many passes whatever the stop and skip rules (benchmarks, and
    # evaluations that force tiny models through inpainting)
    edge_strip: int = 5
    first_mask_kernel: int = 5  # pass 1: (occluders + unfilled) dilated with this square kernel ...
    first_mask_iterations: int = 3  # ... this many times
    next_mask_kernel: int = 3  # later passes: (occluders + unfilled) & pass 1's mask before dilation, dilated ...
    next_mask_iterations: int = 1  # ... this many times
    touch_margin: int = 1  # masks this close touch (an occluder and the target, for truncation through occluders)
    truncation_through_occluders: bool = False  # also truncated where an occluder touching the target reaches
    # the border (the target may go on under it, past the image); off in the paper, whose window then cuts it
    background_fit: Literal["paste", "fit"] = "paste"  # the clean background in the window: "paste" (the paper: 1:1 from its
    # top-left; a window larger than it ends the row "skipped") | "fit" (resized, or tiled when much larger)
    keep_outside_mask: bool = False  # keep the window's pixels outside the inpaint mask; the paper takes the
    # inpainter's whole output, so the VAE's round trip reaches the visible object too
    join_visible: bool = False  # the new amodal mask also covers the visible mask (the paper: the detection alone)
    skip_undetected: bool = True  # an input image or window on which nothing is detected ends the row "skipped"
    # (the paper's code: its SAM call fails on no boxes and the row is skipped)
    lost_redetection: Literal["paper", "keep"] = "paper"  # a window where the target is not re-detected: "paper" (its mask kept, the
    # occluders of the window's first detection) | "keep" (its mask kept with its own occluders)
    inpaint_size: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = -1  # the noise of pass k comes from seed + k; -1 draws fresh noise each call (the paper)
    background: str = ""  # clean background image for mixed context; "" = the paper's gray wallpaper (shipped)
    # Output (step 6)
    composite: Literal["paper", "feather"] = "paper"  # "paper": the visible pixels pasted where the visible mask survives a 5x5 erosion
    # and a 10 px shrink, alpha = amodal or shrunk visible | "feather": a feathered seam, alpha = amodal mask
    feather: int = 5  # "feather": the seam's width
    visible_erode: int = 5  # "paper": the visible mask's square erosion before the shrink
    visible_shrink: int = 10
    cutout_when_unoccluded: bool = False  # an unoccluded or tiny target still gets its visible cut-out as result
    paper_files: bool = True  # also write the paper's result files (window-sized RGBA, its origin) under paper/
    # Quality flags (job.json "flags")
    flag_growth_ratio: float = 10.0  # runaway_growth: amodal area over this many times the visible (10: 90% hidden)
    flag_clip_similarity: float = 0.2  # low_clip_similarity: completion-to-prompt CLIP cosine under this
    # Ways in and backends
    grounder: Literal["lisa", "gdino_sam"] = "lisa"  # "lisa" (the paper) | "gdino_sam" (lighter)
    tagger: Literal["ram_plus", "clip"] = "ram_plus"  # "ram_plus" (the paper) | "clip" (lighter)
    sam_variant: str = "vit_h"
    lisa_quantization: str = ""  # "" (half precision) | "8bit" | "4bit" (bitsandbytes, CUDA only)
    # Input limits
    max_pixels: int = 40_000_000
    min_side: int = 16
    max_query_chars: int = 512
    # Runtime (each worker's own: it loads the models once)
    device: str = "auto"
    precision: Literal["paper", "bf16"] = "paper"  # on CUDA: "paper" (G-DINO, SAM, InstaOrder and RAM++ in float32; SD, CLIP and
    # LISA in float16) | "bf16" (every model in bfloat16: faster); float32 on CPU either way
    dtype: str = "auto"  # "auto" follows ``precision``; a dtype name forces every model to it
    compile_unet: bool = True  # torch.compile the diffusion UNet on CUDA (once per worker; faster steps)
    compile_vae: bool = True  # torch.compile the diffusion VAE on CUDA (once per worker; faster en- and decoding)
    compile_sam: bool = True  # torch.compile SAM's image encoder on CUDA (once per worker; faster encoding)

    RUNTIME_FIELDS = ("device", "precision", "dtype", "compile_unet", "compile_vae", "compile_sam")

    @classmethod
    def preset(cls, name: str) -> "Settings":
        """The defaults (``"paper"``) or a named preset's departures from them (docs/design.md, "Departures")."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (one of {', '.join(PRESETS)})")
        return cls(**PRESETS[name])

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


# Deliberate departures from the paper's code, gathered so that one word turns them all on
# (``--set preset=robust``); each is a field above, and docs/design.md's "Departures" table says why.
PRESETS: dict[str, dict] = {
    "paper": {},
    "robust": {
        "all_labels": True, "max_tags": 40, "max_instances": 32, "background_filled": False, "background_class": False, "class_pass": "windows",
        "same_instance_iou": 0.8, "max_passes": 3, "truncation_through_occluders": True, "background_fit": "fit",
        "keep_outside_mask": True, "join_visible": True, "skip_undetected": False, "lost_redetection": "keep", "seed": 0,
        "composite": "feather", "cutout_when_unoccluded": True, "paper_files": False, "precision": "bf16",
    },
}
