"""What makes two jobs the same work: the bytes of their inputs and the weights of the models that run them.

A job id (amodal.state.job_id) covers a digest of the input image's and visible mask's bytes and the
fingerprint of every checkpoint the stack loads with the job's settings, so a changed image, mask or
weight file gives a new job, and the same bytes resume.

A checkpoint's fingerprint is the SHA-256 over its files (a checkpoint may be a folder), each by its
path inside the checkpoint, its size and a digest of its bytes: the whole file up to
``WHOLE_FILE_LIMIT``, else ``SAMPLED_BLOCKS`` blocks of ``BLOCK`` bytes spread evenly over it, first and
last included (a re-trained or re-quantized weight file differs throughout; reading 40 GB of weights
whole on every run would cost minutes). Fingerprints are kept per process by (path, size, mtime).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from amodal.models.registry import stage_checkpoints
from amodal.settings import Settings
from amodal.stages import NAMES as STAGES

WHOLE_FILE_LIMIT = 64 * 2**20
BLOCK = 2**20
SAMPLED_BLOCKS = 32


def inputs_digest(image_sha256: str, mask_sha256: str | None) -> str:
    """The digest of a job's input files from their SHA-256s (part of the job id)."""
    return hashlib.sha256(json.dumps([image_sha256, mask_sha256]).encode()).hexdigest()[:16]


def folder_digest(folder: str) -> str:
    """The digest of a local folder's files by path, size and modification time ("" for a storage URL): a
    file changed under the same name changes it, without reading any file."""
    if "://" in folder:
        return ""
    # os.walk, not Path.rglob: a million-file folder is walked once, without Path objects
    entries = sorted([os.path.relpath(os.path.join(root, name), folder), st.st_size, st.st_mtime_ns]
                     for root, _, names in os.walk(folder) for name in names
                     for st in [os.stat(os.path.join(root, name))])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= WHOLE_FILE_LIMIT:
            return hashlib.file_digest(file, "sha256").hexdigest()
        for index in range(SAMPLED_BLOCKS):
            file.seek((size - BLOCK) * index // (SAMPLED_BLOCKS - 1))
            digest.update(file.read(BLOCK))
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """The digest of one file's bytes (sampled past ``WHOLE_FILE_LIMIT``), kept per (path, size, mtime)."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def checkpoint_fingerprint(path: Path) -> str:
    """The fingerprint of one checkpoint file or folder (its files by relative path, size and bytes)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    entries = [[p.relative_to(path).as_posix() if path.is_dir() else p.name, p.stat().st_size, file_digest(p)]
               for p in files]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def stack_checkpoints(settings: Settings) -> list[str]:
    """The model folder's entries every stage loads with these settings, in a fixed order."""
    return sorted({entry for stage in STAGES for entry in stage_checkpoints(stage, settings)})


def weight_fingerprints(model_dir: Path, settings: Settings) -> dict[str, str]:
    """Entry -> fingerprint of each checkpoint the stack loads with ``settings``; an absent one is ``missing``
    (its loader then says which)."""
    return {entry: checkpoint_fingerprint(model_dir / entry) if os.path.exists(model_dir / entry) else "missing"
            for entry in stack_checkpoints(settings)}


def weights_digest(fingerprints: dict[str, str]) -> str:
    """One digest of the weight fingerprints (part of the job id)."""
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]
