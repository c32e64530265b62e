"""The RAM++ network and its published checkpoint layout.

RAM++ ("Open-Set Image Tagging with Multi-Grained Text Supervision", released as
``ram_plus_swin_large_14m.pth``) scores every tag of a fixed list against an image:

- ``visual_encoder``: a Swin Transformer at 384 px (Swin-L: embed 192, depths 2-2-18-2, heads
  6-12-24-48, window 12, patch 4). Its output is the mean of the final tokens followed by the
  144 tokens themselves, ``(B, 145, 1536)``.
- ``image_proj``: 1536 -> 512, the width of the tag embeddings.
- ``label_embed``: ``(4585 * 51, 512)``, 51 text embeddings (LLM-written descriptions) per tag.
  Per image, each tag's 51 descriptions are mixed by a softmax over
  ``exp(reweight_scale) * <normalised mean image token, description>``.
- ``wordvec_proj`` (512 -> 768) and a ReLU turn the mixed embeddings into one query per tag.
- ``tagging_head``: a 2-layer BERT-style decoder (hidden 768, 4 heads, MLP 3072) whose layers keep
  only the cross-attention to the projected image tokens (their self-attention and the word
  embeddings are deleted, as in Query2Label), then ``fc`` (768 -> 1): one logit per tag.

The checkpoint is the training script's ``{"model", "optimizer", "config", "epoch"}`` dict;
``model`` holds the state dict of the model above and nothing else (the published file's
3,010,210,801 bytes are that state dict in float32 plus AdamW's two moments of every parameter but
the frozen ``label_embed``); the entries beside it are training state, never read. The Swin keys
are those of Microsoft's implementation (``visual_encoder.layers.2.blocks.5.attn.qkv.weight``);
the blocks here are torchvision's, whose names differ only in the MLP (``mlp.0`` / ``mlp.3`` for
``mlp.fc1`` / ``mlp.fc2``; transformers' ``SwinModel`` would need the fused ``qkv`` split). The
checkpoint's ``relative_position_index`` and ``attn_mask`` buffers follow from the window size
and are recomputed, as the reference loader does. The architecture is read from the shapes, so
the published network and the tiny test one load through the same code.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import PatchMerging, ShiftedWindowAttention, SwinTransformerBlock

INPUT_SIZE = 384
DESCRIPTIONS = 51  # descriptions per tag in label_embed
DECODER_HEADS = 4  # the tagging head's attention heads (q2l_config.json); not visible in the shapes
BERT_LAYER_NORM_EPS = 1e-12
REWEIGHT_SCALE_INIT = math.log(1 / 0.07)
# Renames between the checkpoint's Swin MLP names and torchvision's.
_MLP_NAMES = ((".mlp.fc1.", ".mlp.0."), (".mlp.fc2.", ".mlp.3."))
# Buffers of the checkpoint's Swin blocks that follow from the window size; recomputed, not loaded.
_DERIVED = re.compile(r"^visual_encoder\..*\.(relative_position_index|attn_mask)$")
# Earlier checkpoints of the model family name the tagging head ``vision_multi``; the reference loader renames it.
_OLD_HEAD_PREFIX = "vision_multi."


@dataclass(frozen=True)
class RamPlusArchitecture:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    windows: tuple[int, ...]  # per stage
    mlp_ratio: float
    patch_size: int
    width: int  # tag and image embedding width
    hidden: int  # tagging head width
    decoder_layers: int
    intermediate: int
    num_tags: int

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def stage_resolution(self, stage: int) -> int:
        return INPUT_SIZE // self.patch_size // 2**stage

    def shift(self, stage: int, block: int) -> int:
        """Odd blocks shift by half a window, unless the window covers the whole feature map."""
        window = self.windows[stage]
        return 0 if block % 2 == 0 or self.stage_resolution(stage) <= window else window // 2


# ram_plus_swin_large_14m.pth: config_swinL_384.json and q2l_config.json
PUBLISHED = RamPlusArchitecture(
    embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), windows=(12, 12, 12, 12), mlp_ratio=4.0,
    patch_size=4, width=512, hidden=768, decoder_layers=2, intermediate=3072, num_tags=4585,
)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, H/p, W/p, C)``."""
        return self.norm(self.proj(pixels).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    def __init__(self, arch: RamPlusArchitecture, stage: int) -> None:
        super().__init__()
        dim, window = arch.stage_dim(stage), arch.windows[stage]
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, arch.num_heads[stage], [window, window], [arch.shift(stage, j)] * 2, mlp_ratio=arch.mlp_ratio
            )
            for j in range(arch.depths[stage])
        )
        self.downsample = PatchMerging(dim) if stage < len(arch.depths) - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class SwinEncoder(nn.Module):
    """Swin v1 from torchvision's blocks, laid out under Microsoft's module names."""

    def __init__(self, arch: RamPlusArchitecture) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(arch.patch_size, arch.embed_dim)
        self.layers = nn.ModuleList(SwinStage(arch, i) for i in range(len(arch.depths)))
        self.norm = nn.LayerNorm(arch.stage_dim(len(arch.depths) - 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 384, 384)`` -> the mean token and the final tokens, ``(B, 1 + L, C)``."""
        x = self.patch_embed(pixels)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x.flatten(1, 2))
        return torch.cat([x.mean(1, keepdim=True), x], dim=1)


class _Projections(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(width, hidden)
        self.value = nn.Linear(width, hidden)


class _ResidualNorm(nn.Module):
    """BERT's output sublayer: ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=BERT_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class TaggingLayer(nn.Module):
    """A BERT layer without self-attention: cross-attention to the image, then the MLP.

    Not transformers' ``BertLayer``: its cross-attention projects keys and values from the hidden
    width, while here they come from the narrower image embedding, and it always self-attends.
    """

    def __init__(self, hidden: int, width: int, intermediate: int) -> None:
        super().__init__()
        self.crossattention = nn.ModuleDict(
            {"self": _Projections(hidden, width), "output": _ResidualNorm(hidden, hidden)}
        )
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(hidden, intermediate)})
        self.output = _ResidualNorm(intermediate, hidden)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        proj = self.crossattention["self"]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (DECODER_HEADS, -1)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(proj.query(queries)), heads(proj.key(image)), heads(proj.value(image))
        )
        x = self.crossattention["output"](attended.transpose(1, 2).flatten(2), queries)
        return self.output(F.gelu(self.intermediate["dense"](x)), x)


class TaggingHead(nn.Module):
    def __init__(self, arch: RamPlusArchitecture) -> None:
        super().__init__()
        layers = (TaggingLayer(arch.hidden, arch.width, arch.intermediate) for _ in range(arch.decoder_layers))
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(layers)})

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder["layer"]:
            queries = layer(queries, image)
        return queries


class RamPlusNet(nn.Module):
    """RAM++ at inference: normalised pixels ``(B, 3, 384, 384)`` -> tag logits ``(B, num_tags)``."""

    def __init__(self, arch: RamPlusArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.visual_encoder = SwinEncoder(arch)
        self.image_proj = nn.Linear(arch.stage_dim(len(arch.depths) - 1), arch.width)
        self.label_embed = nn.Parameter(torch.zeros(arch.num_tags * DESCRIPTIONS, arch.width))
        self.reweight_scale = nn.Parameter(torch.tensor(REWEIGHT_SCALE_INIT))
        self.wordvec_proj = nn.Linear(arch.width, arch.hidden)
        self.tagging_head = TaggingHead(arch)
        self.fc = nn.Linear(arch.hidden, 1)

    def tag_queries(self, image: torch.Tensor) -> torch.Tensor:
        """One query per tag: its descriptions mixed by their match with the mean image token."""
        batch, (tags, width) = image.shape[0], (self.arch.num_tags, self.arch.width)
        mean_token = F.normalize(image[:, 0], dim=-1)
        match = self.reweight_scale.exp() * mean_token @ self.label_embed.T
        weights = match.float().view(batch, tags, DESCRIPTIONS).softmax(-1).to(image.dtype)
        mixed = torch.einsum("btd,tde->bte", weights, self.label_embed.view(tags, DESCRIPTIONS, width))
        return F.relu(self.wordvec_proj(mixed))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = self.image_proj(self.visual_encoder(pixels))
        return self.fc(self.tagging_head(self.tag_queries(image), image)).squeeze(-1)


def _require(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        raise ValueError(f"not a RAM++ checkpoint: no {ndim}-d {key}")
    return value


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    found = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    if not found or found != set(range(len(found))):
        raise ValueError(f"not a RAM++ checkpoint: keys {pattern!r} missing or not numbered from 0")
    return sorted(found)


def infer_architecture(state: Mapping[str, torch.Tensor]) -> RamPlusArchitecture:
    """The architecture of a checkpoint's ``model`` state dict, from its key names and shapes."""
    embed_dim, _, patch_size, _ = _require(state, "visual_encoder.patch_embed.proj.weight", 4).shape
    stages = _indices(state, r"visual_encoder\.layers\.(\d+)\.")
    depths, heads, windows = [], [], []
    for i in stages:
        depths.append(len(_indices(state, rf"visual_encoder\.layers\.{i}\.blocks\.(\d+)\.")))
        table = f"visual_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table"
        positions, num_heads = _require(state, table, 2).shape
        window = (math.isqrt(positions) + 1) // 2
        if (2 * window - 1) ** 2 != positions:
            raise ValueError(f"visual_encoder.layers.{i}: {positions} relative positions is no (2w - 1)^2 window")
        heads.append(num_heads)
        windows.append(window)
    mlp_hidden = _require(state, "visual_encoder.layers.0.blocks.0.mlp.fc1.weight", 2).shape[0]
    rows, width = _require(state, "label_embed", 2).shape
    if rows % DESCRIPTIONS:
        raise ValueError(f"label_embed has {rows} rows, not {DESCRIPTIONS} descriptions per tag")
    arch = RamPlusArchitecture(
        embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), windows=tuple(windows),
        mlp_ratio=mlp_hidden / embed_dim, patch_size=patch_size, width=width,
        hidden=_require(state, "fc.weight", 2).shape[1],
        decoder_layers=len(_indices(state, r"tagging_head\.encoder\.layer\.(\d+)\.")),
        intermediate=_require(state, "tagging_head.encoder.layer.0.intermediate.dense.weight", 2).shape[0],
        num_tags=rows // DESCRIPTIONS,
    )
    for i in stages:
        if arch.stage_resolution(i) % arch.windows[i]:
            raise ValueError(f"visual_encoder.layers.{i}: window {arch.windows[i]} does not tile "
                             f"the {arch.stage_resolution(i)}-token feature map of a {INPUT_SIZE} px input")
    return arch


def _current_name(key: str) -> str:
    return "tagging_head." + key.removeprefix(_OLD_HEAD_PREFIX) if key.startswith(_OLD_HEAD_PREFIX) else key


def _module_key(key: str) -> str:
    """The module's name for a checkpoint key."""
    for theirs, ours in _MLP_NAMES:
        key = key.replace(theirs, ours)
    return key


def _checkpoint_key(key: str) -> str:
    """The checkpoint's name for a module key."""
    for theirs, ours in _MLP_NAMES:
        key = key.replace(ours, theirs)
    return key


def load_network(checkpoint: Mapping) -> RamPlusNet:
    """Build the network from the published checkpoint dict; a missing, unknown or misshapen key is named.

    Everything under ``model`` must be used, except the Swin blocks' derived buffers; the entries
    beside it (``optimizer``, ``config``, ``epoch``) are training state and are not read.
    """
    state = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError("not a RAM++ checkpoint: expected a dict with a 'model' entry")
    state = {_current_name(k): v for k, v in state.items() if not _DERIVED.match(k)}
    arch = infer_architecture(state)
    with torch.device("meta"):
        net = RamPlusNet(arch)
    expected = {
        _checkpoint_key(k): v.shape for k, v in net.state_dict().items() if not k.endswith(".relative_position_index")
    }
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"missing keys {', '.join(missing)}")
    if unexpected := sorted(state.keys() - expected.keys()):
        problems.append(f"unexpected keys {', '.join(unexpected)}")
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}"
        for k, shape in expected.items() if k in state and state[k].shape != shape
    ]
    if problems:
        raise ValueError(f"not a RAM++ checkpoint of {arch}: " + "; ".join(problems))
    net.load_state_dict({_module_key(k): v for k, v in state.items()}, strict=False, assign=True)
    for module in net.modules():
        if isinstance(module, ShiftedWindowAttention):
            module.define_relative_position_index()  # derived from the window size, off the meta device
    return net.eval()


def _shift_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """A shifted block's ``(windows, window**2, window**2)`` attention mask: -100 across the regions the shift joins."""
    bands = torch.zeros(resolution, dtype=torch.long)
    bands[-window:] = 1
    bands[-shift:] = 2
    regions = bands[:, None] * 3 + bands[None, :]
    per_window = regions.view(resolution // window, window, resolution // window, window).permute(0, 2, 1, 3)
    per_window = per_window.reshape(-1, window * window)
    return torch.where(per_window[:, None, :] != per_window[:, :, None], -100.0, 0.0)


def checkpoint_state(net: RamPlusNet) -> dict[str, torch.Tensor]:
    """``net``'s state dict as the published checkpoint holds it: Swin names and derived buffers included."""
    arch = net.arch
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith(".relative_position_index"):  # stored square, (window**2, window**2)
            value = value.view(math.isqrt(value.numel()), -1)
        state[_checkpoint_key(key)] = value
    for i, depth in enumerate(arch.depths):
        for j in range(depth):
            if shift := arch.shift(i, j):
                mask = _shift_mask(arch.stage_resolution(i), arch.windows[i], shift)
                state[f"visual_encoder.layers.{i}.blocks.{j}.attn_mask"] = mask
    return state
