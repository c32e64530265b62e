"""Fetch the published checkpoints into a model folder (the layout of ``amodal.models.registry``).

Hugging Face repositories come down with ``huggingface_hub`` (incremental: files already there are
kept); single files come by URL, streamed into a temporary file beside the target and renamed into
place only when complete, so an interrupted download never leaves a partial checkpoint behind. A file
already present is not fetched again.

The InstaOrder weights are published on Google Drive inside a 3.5 GB archive, which cannot be fetched
unattended: without ``AMODAL_INSTAORDER_URL`` (a URL of the ``.pth.tar`` file itself) the command
prints where to get the file and where to put it.
"""
from __future__ import annotations

import http.client
import os
import sys
import tempfile
import urllib.error
from pathlib import Path
from urllib.request import urlopen

from huggingface_hub import hf_hub_download, snapshot_download
from tqdm import tqdm

from amodal.config import environment
from amodal.models.registry import (
    CLIP_DIR,
    GROUNDING_DINO_DIR,
    INSTAORDER_FILE,
    LISA_DIR,
    RAM_PLUS_FILE,
    SAM_FILES,
    SD_INPAINT_DIR,
)

# Model names accepted by ``which``, in download order (small first).
MODELS = ("sam", "grounding_dino", "clip", "lpips", "sd_inpaint", "instaorder", "ram_plus", "lisa")

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/{name}"
# Other frameworks' weights and monolithic duplicates of the diffusers folders are not needed.
OTHER_FRAMEWORKS = ["*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite"]
HF_REPOS = {  # name -> [(repo id, folder in the model folder, ignore patterns)]
    "grounding_dino": [("IDEA-Research/grounding-dino-tiny", GROUNDING_DINO_DIR, OTHER_FRAMEWORKS)],
    "clip": [("openai/clip-vit-base-patch32", CLIP_DIR, OTHER_FRAMEWORKS)],
    # stabilityai/stable-diffusion-2-inpainting was withdrawn from the hub; this mirrors it.
    "sd_inpaint": [(
        "sd2-community/stable-diffusion-2-inpainting",
        SD_INPAINT_DIR,
        [*OTHER_FRAMEWORKS, "*.ckpt", "512-inpainting-ema.*", "*.fp16.*"],
    )],
    # LISA's CLIP vision tower is not in its checkpoint; it is read from a folder inside LISA's.
    "lisa": [
        ("xinlai/LISA-13B-llama2-v1", LISA_DIR, OTHER_FRAMEWORKS),
        ("openai/clip-vit-large-patch14", f"{LISA_DIR}/clip-vit-large-patch14", OTHER_FRAMEWORKS),
    ],
}
RAM_PLUS_REPO = "xinyu1205/recognize-anything-plus-model"
INSTAORDER_URL_ENV = "AMODAL_INSTAORDER_URL"
INSTAORDER_ARCHIVE = "https://drive.google.com/file/d/1_GEmCmofLSkJZnidfp4vsQb2Nqq5aqBU/view"
CHUNK = 1 << 20
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads its switches


class DownloadError(RuntimeError):
    """A checkpoint could not be fetched."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_VALUES


def _note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def fetch_url(url: str, target: Path) -> Path:
    """Stream ``url`` to ``target`` with a progress bar; atomic, and skipped if ``target`` exists."""
    target = Path(target)
    if target.exists():
        _note(f"{target}: already present")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and bar.n != total:
                raise DownloadError(f"could not fetch {url}: got {bar.n} of {total} bytes")
        os.replace(partial, target)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
        raise DownloadError(f"could not fetch {url}: {err}") from err
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _instaorder(target: Path) -> None:
    url = environment().instaorder_url
    if url:
        fetch_url(url, target)
    elif target.exists():
        _note(f"{target}: already present")
    else:
        _note(
            f"InstaOrder: its weights are published on Google Drive, inside InstaOrder_ckpt.zip (3.5 GB):\n"
            f"  {INSTAORDER_ARCHIVE}\n"
            f"download it, extract {target.name} and place it at\n"
            f"  {target}\n"
            f"or set {INSTAORDER_URL_ENV} to a URL of that file and run this again."
        )


def _lpips(model_dir: Path) -> None:
    """``amodal eval``'s LPIPS: torchvision's AlexNet file, and the linear layers torchmetrics ships."""
    from amodal.models.lpips import BACKBONE_FILE, BACKBONE_URL, install_linear_layers

    fetch_url(BACKBONE_URL, model_dir / BACKBONE_FILE)
    install_linear_layers(model_dir)


def download_models(model_dir: Path, which: list[str] | None = None, sam_variant: str = "vit_h") -> None:
    """Fetch the published checkpoints of ``which`` (default: all of ``MODELS``) into ``model_dir``."""
    model_dir = Path(model_dir)
    names = list(MODELS) if which is None else list(dict.fromkeys(which))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose among {list(MODELS)}")
    if sam_variant not in SAM_FILES:
        raise ValueError(f"unknown SAM variant {sam_variant!r}; choose among {list(SAM_FILES)}")
    if _offline():
        raise DownloadError(
            "HF_HUB_OFFLINE is set: checkpoints cannot be fetched offline. Unset it to download, "
            "copy in a model folder fetched elsewhere, or write tiny test models with `amodal models tiny DIR`."
        )
    for name in sorted(names, key=MODELS.index):
        if name == "sam":
            target = model_dir / SAM_FILES[sam_variant]
            fetch_url(SAM_URL.format(name=target.name), target)
        elif name == "lpips":
            _lpips(model_dir)
        elif name == "instaorder":
            _instaorder(model_dir / INSTAORDER_FILE)
        elif name == "ram_plus":
            target = model_dir / RAM_PLUS_FILE
            if target.exists():
                _note(f"{target}: already present")
            else:
                hf_hub_download(RAM_PLUS_REPO, target.name, local_dir=target.parent)
        else:
            for repo_id, folder, ignore in HF_REPOS[name]:
                _note(f"{repo_id} -> {model_dir / folder}")
                snapshot_download(repo_id, local_dir=model_dir / folder, ignore_patterns=ignore)
