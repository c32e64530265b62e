"""A tiny random-weight LISA in the published folder layout (see ``amodal.models.lisa_checkpoint``).

LLaMA 32 wide and 2 layers deep, a 2-block 32-d SAM encoder at 256 px (the published prompt encoder
and mask decoder), a 16-d 2-layer CLIP at 224 px with 14 px patches (256 patches, as ViT-L/14), and a
SentencePiece BPE tokenizer of 320 pieces (byte fallback, as LLaMA's) trained here on a few
sentences, plus ``[SEG]``, ``<im_start>``, ``<im_end>`` as added tokens. Files are written as
transformers 4.31 wrote the published ones: two ``.bin`` shards with an index (weights in bfloat16,
LLaMA's per-layer ``rotary_emb.inv_freq`` buffers in float32), ``added_tokens.json``, and the CLIP tower in
``clip-vit-large-patch14/`` with OpenAI's ``preprocessor_config.json``.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import sentencepiece
import torch
from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM

from amodal.models.lisa_checkpoint import (
    IM_END,
    IM_START,
    SEG_TOKEN,
    VISION_TOWER,
    LisaExtras,
    config_dict,
    llama_config,
)
from amodal.models.sam import PROMPT_DIM, TINY, build_sam

SHARDS = 2
# SAM at 256 px input (16x16 embeddings) keeps a CPU forward short; the published one takes 1024 px.
TINY_TOWER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
SPM_PIECES = 320
_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: what is the mammal in this image? ASSISTANT: Sure, it is the cat.",
    "Please output segmentation mask and explain why.",
    "Sure, the segmentation result is here.",
)
OPENAI_CLIP_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def _added_token(content: str, **extra) -> dict:
    return {**extra, "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_tiny_tokenizer(folder: Path) -> int:
    """Write a tiny LLaMA-style SentencePiece tokenizer with LISA's added tokens; return its vocabulary size."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=model, model_type="bpe", vocab_size=SPM_PIECES,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    added = {token: pieces + i for i, token in enumerate((SEG_TOKEN, IM_START, IM_END))}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2, sort_keys=True))
    special = {name: _added_token(token) for name, token in
               (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<unk>"), ("unk_token", "<unk>"))}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>", __type="AddedToken"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>", __type="AddedToken"),
        "model_max_length": 512,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>", __type="AddedToken"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return pieces + len(added)


def _rotary_buffers(config: dict) -> dict[str, torch.Tensor]:
    """The per-layer ``inv_freq`` buffers that transformers 4.31 saved with LLaMA."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(config["num_hidden_layers"])}


def write_shards(folder: Path, state: dict[str, torch.Tensor], shards: int = SHARDS) -> None:
    """Save ``state`` as ``pytorch_model-0000i-of-0000n.bin`` shards and their index, in key order."""
    keys = list(state)
    per_shard = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].contiguous().clone() for k in keys[i * per_shard : (i + 1) * per_shard]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_tiny(folder: Path) -> None:
    """Write a tiny random-weight LISA into ``folder`` (the published layout; same weights on every write)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config_dict(
        vocab_size=write_tiny_tokenizer(folder), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, mm_hidden_size=TINY_TOWER["hidden_size"],
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                  "transformers_version": "4.31.0"}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        llm = LlamaForCausalLM(llama_config(config))
        extras = LisaExtras(build_sam(TINY), config["mm_hidden_size"], config["hidden_size"], PROMPT_DIM)
        encoder = extras.visual_model.image_encoder  # the published init zeroes these
        encoder.pos_embed.normal_(std=0.02)
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.02)
            block.attn.rel_pos_w.normal_(std=0.02)
        clip = CLIPModel(CLIPConfig(
            text_config={**TINY_TOWER, "vocab_size": 64, "max_position_embeddings": 77,
                         "bos_token_id": 62, "eos_token_id": 63, "pad_token_id": 63},
            vision_config={**TINY_TOWER, "image_size": 224, "patch_size": 14},
            projection_dim=16,
        ))
    state = {k: v.to(torch.bfloat16) for k, v in llm.state_dict().items()}
    state.update(_rotary_buffers(config))
    state.update({"model." + k: v.to(torch.bfloat16) for k, v in extras.state_dict().items()})
    write_shards(folder, state)
    clip_folder = folder / Path(VISION_TOWER).name
    clip.save_pretrained(clip_folder)
    (clip_folder / "preprocessor_config.json").write_text(json.dumps(OPENAI_CLIP_PREPROCESSOR, indent=2))
