"""Benchmark-only decoding for random-weight LISA: every answer is ``tokens`` long, ``[SEG]`` before its end.

LISA's random weights would not say ``[SEG]`` (nor stop). ``install`` makes each ``LisaGrounder.generate``
call emit a fixed answer through the tests' scripted decoding (a hook on LLaMA's output layer that
replaces the logits it has computed), so every decoding step still runs in full: the prefill, ``tokens``
steps of the whole batch, the hidden states kept for ``[SEG]``. Installed in the workers by
``bench/site_hooks.py``.
"""
from __future__ import annotations

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
