"""What ``amodal settings`` prints: every field of :class:`~amodal.settings.Settings` with its type,
default and meaning, read from the dataclass itself. A field's meaning is its comment in
``amodal/settings.py`` (with the comment lines that continue it); a field without one takes its
meaning from :data:`MEANINGS`, else from the section comment above it, so a new field is never left out.
A section comment starts with a capital letter; a field's comment continued on the next line does not."""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
from dataclasses import dataclass

from amodal.settings import Settings

# Meanings of the fields whose line in amodal/settings.py carries no comment.
MEANINGS = {
    "tag_threshold": "tagger score a scene tag needs to be kept",
    "box_threshold": "Grounding DINO box score a detection needs",
    "text_threshold": "Grounding DINO text score a detection's label needs",
    "background_erode_radius": "radius (px) the background mask is eroded by",
    "background_min_area": "smallest background region (px) kept",
    "occlusion_threshold": "occlusion-order score above which an instance hides the target",
    "border_margin": "distance (px) from the image border within which the target counts as cut by it",
    "min_target_fraction": "smallest target, as a fraction of the image, worth completing",
    "canvas_scale": "the completion canvas is at most this many times the target's size",
    "crop_margin": "margin (px) around the target in the inpainting window",
    "truncation_extra": "canvas (px) added past a border that cuts the target",
    "max_passes": "inpainting passes at most",
    "edge_strip": "width (px) of the window's edge strip checked for a cut completion",
    "inpaint_size": "side (px) of the square the inpainting model works at",
    "num_inference_steps": "denoising steps per inpainting pass",
    "guidance_scale": "classifier-free guidance scale of the inpainting model",
    "seed": "random seed of the inpainting noise",
    "feather": "radius (px) the completion's alpha is feathered by",
    "visible_shrink": "pixels the visible mask is shrunk by before it is pasted back",
    "sam_variant": "SAM backbone: vit_h (the paper), vit_l or vit_b",
    "max_pixels": "largest input image, in pixels",
    "min_side": "smallest input image side, in pixels",
    "max_query_chars": "longest text query, in characters",
    "device": "\"auto\" (CUDA if present, else CPU), \"cpu\" or \"cuda\"",
}


@dataclass(frozen=True)
class SettingDoc:
    name: str
    type: str
    default: object
    meaning: str
    section: str


def _comments() -> tuple[dict[str, str], dict[str, str]]:
    """(field -> its comment, continuation lines included; field -> the section comment above it)."""
    source = inspect.getsource(Settings)
    names = {f.name for f in dataclasses.fields(Settings)}
    own: dict[str, str] = {}
    section: dict[str, str] = {}
    current_section, last_field, last_line = "", None, 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        line = token.line.strip()
        if token.type == tokenize.NAME and token.start[1] == 4 and token.string in names and ":" in line:
            last_field, last_line = token.string, token.start[0]
            section.setdefault(last_field, current_section)
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if token.start[0] == last_line and last_field:  # the field's own comment
                own[last_field] = text
            elif line.startswith("#") and last_field in own and token.start[0] == last_line + 1 \
                    and text[:1].islower():
                own[last_field] += " " + text  # a comment continued on the next line (a section's starts upper-case)
                last_line += 1
            elif line.startswith("#"):
                current_section, last_field = text, None
    return own, section


def describe_settings() -> list[SettingDoc]:
    """Every setting, in the dataclass's order."""
    own, section = _comments()
    docs = []
    for f in dataclasses.fields(Settings):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        meaning = own.get(f.name) or MEANINGS.get(f.name) or section.get(f.name, "")
        docs.append(SettingDoc(f.name, kind, f.default, meaning, section.get(f.name, "")))
    return docs
