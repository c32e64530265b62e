"""The published LISA checkpoint (``xinlai/LISA-13B-llama2-v1``): its config, key names and loading.

The folder holds ``config.json`` (``model_type`` ``llava``, ``architectures`` ``LISAForCausalLM``),
a sharded state dict (``pytorch_model-0000N-of-0000M.bin`` with ``pytorch_model.bin.index.json``, or
the same as ``model-*.safetensors`` with ``model.safetensors.index.json``) and a SentencePiece LLaMA
tokenizer with the added tokens ``[SEG]``, ``<im_start>``, ``<im_end>``. Key names:

- LLaMA as ``LlamaForCausalLM`` names it: ``model.embed_tokens``, ``model.layers.N.*``,
  ``model.norm``, ``lm_head``. Checkpoints saved by transformers 4.31 also hold
  ``model.layers.N.self_attn.rotary_emb.inv_freq``: derived buffers, ignored here.
- ``model.mm_projector.{weight,bias}``: one linear map from CLIP features to LLaMA's width.
- ``model.text_hidden_fcs.0.{0,2}.*``: the MLP (Linear, ReLU, Linear) from LLaMA's width to SAM's
  256-d prompt space.
- ``model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*``: SAM (ViT-H in the published
  one; the architecture is read from the tensors, see ``amodal.models.sam``).

The CLIP vision tower is not in the checkpoint: ``mm_vision_tower`` names it
(``openai/clip-vit-large-patch14``). It is read from the folder of that name's last part inside the
LISA folder (``clip-vit-large-patch14/``) if there is one, else from the hub by name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from segment_anything.modeling import Sam
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from amodal.models.base import MissingCheckpointError
from amodal.models.sam import PROMPT_DIM, build_sam, infer_architecture

ARCHITECTURE = "LISAForCausalLM"
SEG_TOKEN = "[SEG]"  # the tokenizer's added tokens, in the order of their ids
IM_START = "<im_start>"
IM_END = "<im_end>"
VISION_TOWER = "openai/clip-vit-large-patch14"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
EXTRAS_PREFIXES = ("model.visual_model.", "model.mm_projector.", "model.text_hidden_fcs.")
SAM_PREFIX = "model.visual_model."
DERIVED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)


class LisaExtras(nn.Module):
    """The parts of LISA beside LLaMA and CLIP; their state-dict keys are the published ones less ``model.``."""

    def __init__(self, sam: Sam, mm_hidden_size: int, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.visual_model = sam
        self.mm_projector = nn.Linear(mm_hidden_size, hidden_size)
        self.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out_dim))]
        )

    def seg_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """LLaMA's last hidden state(s) ``(..., hidden_size)`` to SAM prompt embeddings ``(..., 256)``."""
        return self.text_hidden_fcs[0](hidden)


def read_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``, checked for what this adapter supports."""
    path = folder / "config.json"
    if not path.exists():
        raise MissingCheckpointError(str(path))
    config = json.loads(path.read_text())
    if ARCHITECTURE not in config.get("architectures", []):
        raise ValueError(f"{path}: not a LISA checkpoint (architectures {config.get('architectures')})")
    checks = {
        "out_dim": (config.get("out_dim"), PROMPT_DIM),
        "mm_vision_select_feature": (config.get("mm_vision_select_feature", "patch"), "patch"),
        "mm_projector_type": (config.get("mm_projector_type", "linear"), "linear"),
    }
    for field, (value, supported) in checks.items():
        if value != supported:
            raise ValueError(f"{path}: {field} {value!r} is not supported (only {supported!r})")
    return config


def config_dict(
    *, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
    num_attention_heads: int, mm_hidden_size: int,
) -> dict[str, Any]:
    """A ``config.json`` with the published one's fields and values, for the given dimensions."""
    return {
        "architectures": [ARCHITECTURE], "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": True,
        "hidden_act": "silu", "hidden_size": hidden_size, "image_aspect_ratio": "square",
        "image_grid_pinpoints": None, "initializer_range": 0.02, "intermediate_size": intermediate_size,
        "max_position_embeddings": 4096, "mm_hidden_size": mm_hidden_size, "mm_resampler_type": None,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": True, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": VISION_TOWER, "model_type": "llava",
        "num_attention_heads": num_attention_heads, "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_attention_heads, "out_dim": PROMPT_DIM, "pad_token_id": 0,
        "pretrain_mm_mlp_adapter": None, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "train_mask_decoder": True,
        "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False,
        "use_cache": False, "use_mm_proj": True, "vision_tower": VISION_TOWER, "vocab_size": vocab_size,
    }


def llama_config(config: Mapping[str, Any]) -> LlamaConfig:
    """The LLaMA part of a LISA config."""
    return LlamaConfig(**{k: config[k] for k in LLAMA_FIELDS if k in config})


def vision_tower_source(folder: Path, config: Mapping[str, Any]) -> str:
    """Where the CLIP vision tower is read from: a folder inside the LISA folder, else the hub id."""
    name = config["mm_vision_tower"]
    local = folder / Path(name).name
    return str(local) if local.is_dir() else name


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the sharded checkpoint, on the CPU (``.bin`` shards memory-mapped)."""
    index = next((folder / name for name in INDEX_FILES if (folder / name).exists()), None)
    if index is None:
        raise MissingCheckpointError(str(folder / INDEX_FILES[-1]))
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        shard = folder / name
        if not shard.exists():
            raise MissingCheckpointError(str(shard))
        if shard.suffix == ".safetensors":
            state.update(load_file(shard))
        else:
            state.update(torch.load(shard, map_location="cpu", mmap=True, weights_only=True))
    return state


def build_extras(config: Mapping[str, Any], sam_state: Mapping[str, torch.Tensor]) -> LisaExtras:
    """Untrained extras whose SAM has the architecture of ``sam_state`` (keys without ``model.visual_model.``)."""
    try:
        sam = build_sam(infer_architecture(sam_state))
    except ValueError as err:
        raise ValueError(f"{SAM_PREFIX}*: {err}") from None
    return LisaExtras(sam, config["mm_hidden_size"], config["hidden_size"], config["out_dim"])


def check_state(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor]) -> None:
    """Raise one error naming every missing, unexpected and wrongly shaped key."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k])})"
        for k in sorted(expected.keys() & found.keys())
        if found[k].shape != expected[k]
    ]
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise ValueError("not a LISA checkpoint of this config: " + "; ".join(problems))


def split_state(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], LisaExtras]:
    """Check the whole checkpoint against ``config``; return LLaMA's tensors and the loaded extras (CPU, fp32)."""
    state = {k: v for k, v in state.items() if not DERIVED_KEY.fullmatch(k)}
    llm_state = {k: v for k, v in state.items() if not k.startswith(EXTRAS_PREFIXES)}
    sam_state = {k[len(SAM_PREFIX):]: v for k, v in state.items() if k.startswith(SAM_PREFIX)}
    extras = build_extras(config, sam_state)
    with torch.device("meta"):  # shapes only
        llm_shapes = {k: v.shape for k, v in LlamaForCausalLM(llama_config(config)).state_dict().items()}
    expected = {**llm_shapes, **{"model." + k: v.shape for k, v in extras.state_dict().items()}}
    check_state(expected, state)
    extras.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith(EXTRAS_PREFIXES)})
    return llm_state, extras.eval()
