"""The quality record of a result: ``quality`` and ``flags`` in ``job.json`` and the manifest
(docs/design.md, "Results and the manifest").

Per pass (kept in ``JobState.passes_log``, filled as the loop runs): the inpainted fraction of the
window, whether the target was re-detected, its amodal pixels and growth over the previous mask, and
the CLIP similarity of the completion to its prompt. Per result: visible and amodal pixel counts, the
growth ratio, whether the amodal mask touches the window's edge (a cut completion). Flags name the
conditions a user should look at; their thresholds are ``Settings`` fields.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from amodal.geometry import near_sides
from amodal.settings import Settings

FLAGS = ("target_lost", "runaway_growth", "window_edge", "stopped_at_limit", "low_clip_similarity")


def pass_entry(n: int, inpaint_mask: np.ndarray) -> dict:
    """The record of pass ``n`` when its inpainting is done."""
    return {"pass": n, "inpainted_fraction": round(float(inpaint_mask.mean()), 4)}


def record_resegment(entry: dict, redetected: bool, previous: np.ndarray, amodal: np.ndarray) -> None:
    """Add the re-segmentation's outcome to a pass's record."""
    before, after = int(np.count_nonzero(previous)), int(np.count_nonzero(amodal))
    entry.update(redetected=redetected, amodal_px=after, growth=round(after / max(before, 1), 4))


def clip_similarities(clip: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                      texts: Sequence[str]) -> list[float]:
    """Cosine similarity of each image, blacked out outside its mask, to its text.

    ``clip`` is an ``amodal.models.clip.Clip`` (or anything with its ``image_features`` and
    ``text_features``, both L2-normalised).
    """
    if not images:
        return []
    cutouts = [np.where(m[..., None], image, 0).astype(np.uint8) for image, m in zip(images, masks, strict=True)]
    cosines = (clip.image_features(cutouts) * clip.text_features(list(texts))).sum(-1)
    return [round(float(c), 4) for c in cosines.tolist()]


def result_quality(visible: np.ndarray, amodal: np.ndarray, passes_log: list[dict], windowed: bool,
                   s: Settings) -> dict:
    """The ``quality`` record of a result; ``windowed``: the amodal mask lies in the loop's window."""
    visible_px, amodal_px = int(np.count_nonzero(visible)), int(np.count_nonzero(amodal))
    similarity = [p["clip_similarity"] for p in passes_log if p.get("clip_similarity") is not None]
    return {
        "visible_px": visible_px,
        "amodal_px": amodal_px,
        "growth_ratio": round(amodal_px / max(visible_px, 1), 4),
        "passes": passes_log,
        "window_edge": windowed and bool(near_sides(amodal, s.touch_margin)),
        "clip_similarity": similarity[-1] if similarity else None,
    }


def result_flags(quality: dict, stop: str, s: Settings) -> list[str]:
    """The named conditions of ``FLAGS`` that hold for a result."""
    holds = {
        "target_lost": any(p.get("redetected") is False for p in quality["passes"]),
        "runaway_growth": quality["growth_ratio"] > s.flag_growth_ratio,
        "window_edge": quality["window_edge"],
        "stopped_at_limit": stop == "limit",
        "low_clip_similarity": quality["clip_similarity"] is not None
        and quality["clip_similarity"] < s.flag_clip_similarity,
    }
    return [f for f in FLAGS if holds[f]]
