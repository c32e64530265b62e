"""Scripted decoding for LISA tests: random weights alone would rarely say ``[SEG]``."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from amodal.models.lisa import LisaGrounder


@contextmanager
def scripted(grounder: LisaGrounder, tokens: Sequence[int]) -> Iterator[None]:
    """Make greedy decoding emit ``tokens``: a test-only hook on LLaMA's output layer replaces its
    logits, one step at a time."""
    steps = iter(tokens)

    def force(module, inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[:, -1, next(steps)] = 1e4
        return forced

    handle = grounder.llm.lm_head.register_forward_hook(force)
    try:
        yield
    finally:
        handle.remove()
