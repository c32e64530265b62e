"""Benchmark-only decoding for random-weight LISA: every answer is ``tokens`` long, ``[SEG]`` before its end.

LISA's random weights would not say ``[SEG]`` (nor stop). ``install`` makes each ``LisaGrounder.generate``
call emit a fixed answer through the tests' scripted decoding (a hook on LLaMA's output layer that
replaces the logits it has computed), so every decoding step still runs in full: the prefill, ``tokens``
steps of the whole batch, the hidden states kept for ``[SEG]``. ``sitecustomize`` writes a module that
installs it in every Python process started with that folder on ``PYTHONPATH`` (the benchmark's workers)
once ``amodal.models.lisa`` is imported, so nothing imports torch before a worker pins its GPU.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ANSWER_TOKENS = 32  # as bench/lisa_full_size.py; LISA's own answers ("Sure, it is [SEG].") are shorter


def install(tokens: int = ANSWER_TOKENS) -> None:
    from amodal.models.lisa import LisaGrounder
    from tests.lisascript import scripted

    if getattr(LisaGrounder.generate, "scripted", False):
        return

    generate = LisaGrounder.generate

    def answering(self, images, queries):
        word, eos = self.tokenizer.convert_tokens_to_ids("▁the"), self.tokenizer.eos_token_id
        with scripted(self, [word] * (tokens - 2) + [self.seg_token_id, eos]):
            return generate(self, images, queries)

    answering.scripted = True
    LisaGrounder.generate = answering


class InstallOnImport(importlib.abc.MetaPathFinder):
    """Runs ``install`` right after ``amodal.models.lisa`` is first imported."""

    MODULE = "amodal.models.lisa"

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def find_spec(self, name, path, target=None):
        if name != self.MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module, tokens = spec.loader.exec_module, self.tokens

        def exec_and_install(module):
            exec_module(module)
            install(tokens)

        spec.loader.exec_module = exec_and_install
        return spec


def sitecustomize(folder: Path, tokens: int = ANSWER_TOKENS) -> Path:
    """Write ``folder/sitecustomize.py`` that installs the scripted answers; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import sys\nfrom bench.lisa_answer import InstallOnImport\nsys.meta_path.insert(0, InstallOnImport({tokens}))\n")
    return folder
