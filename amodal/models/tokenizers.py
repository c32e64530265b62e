"""Tiny tokenizers in the published file formats, for the tiny test checkpoints.

A tiny CLIP tokenizer keeps CLIP's byte-level BPE scheme and file layout (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``): every byte has a symbol and
an end-of-word symbol, so any text encodes, and a handful of merges exercise the BPE step.
"""
from __future__ import annotations

import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# A few merges, enough to turn "a photo of a ..." into multi-byte tokens.
_MERGES = (
    ("p", "h"), ("o", "t"), ("ph", "ot"), ("phot", "o</w>"), ("o", "f</w>"),
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r</w>"),
)


def byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE uses for bytes, in CLIP's vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes follow as ``chr(256 + n)``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def tiny_clip_vocab() -> dict[str, int]:
    """Token -> id in CLIP's order: byte symbols, their end-of-word forms, merges, then specials."""
    tokens = [*byte_symbols()]
    tokens += [s + "</w>" for s in tokens]
    tokens += [a + b for a, b in _MERGES]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tiny_clip_tokenizer(folder: Path, pad_token: str = EOS) -> None:
    """Write a tiny CLIP tokenizer into ``folder``.

    ``pad_token`` is ``<|endoftext|>`` for OpenAI CLIP and ``!`` for Stable Diffusion 2's tokenizer.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
