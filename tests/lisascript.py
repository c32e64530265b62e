"""Scripted decoding for LISA tests: random weights alone would rarely say ``[SEG]``."""
from __future__ import annotations

from contextlib import contextmanager
from itertools import count
from typing import Iterator, Sequence

import torch

from amodal.models.lisa import LisaGrounder


@contextmanager
def scripted(grounder: LisaGrounder, tokens: Sequence[int] | Sequence[Sequence[int]]) -> Iterator[None]:
    """Make greedy decoding emit ``tokens``: a test-only hook on LLaMA's output layer replaces its
    logits, one step at a time. ``tokens`` is one script for every row (it may run on over several
    calls), or one script per row of a single batched call (a row past its script's end repeats its
    last token)."""
    per_row = [list(t) for t in tokens] if tokens and not isinstance(tokens[0], int) else None
    steps, step = iter(tokens), count()

    def force(module, inputs, logits):
        forced = torch.full_like(logits, -1e4)
        if per_row is None:
            forced[:, -1, next(steps)] = 1e4
        else:
            t = next(step)
            for row, script in enumerate(per_row):
                forced[row, -1, script[min(t, len(script) - 1)]] = 1e4
        return forced

    handle = grounder.llm.lm_head.register_forward_hook(force)
    try:
        yield
    finally:
        handle.remove()
