"""SAM (Segment Anything): boxes to masks, built with the ``segment_anything`` package.

The published checkpoints (``sam_vit_{h,l,b}_*.pth``) are plain state dicts. The image encoder's
architecture is read from the tensors themselves, so one loader reads all three and the tiny test
checkpoint:

- embed dim and patch size: ``image_encoder.patch_embed.proj.weight`` ``[embed, 3, patch, patch]``;
- input size: the ``pos_embed`` grid ``[1, grid, grid, embed]`` times the patch size;
- depth: the number of ``image_encoder.blocks.N`` blocks;
- heads: embed dim / head dim, the head dim being the width of the ``rel_pos_h`` tables
  (1280/80 = 16 for ViT-H, 1024/64 = 16 for ViT-L, 768/64 = 12 for ViT-B, as published);
- global-attention blocks: those whose ``rel_pos_h`` spans the whole grid (``2 * grid - 1`` rows);
  the window size comes from the other blocks' tables (``2 * window - 1`` rows).

The prompt encoder and mask decoder are the published ones (256-d prompts, two-way transformer of
depth 2). The image encoder runs in the requested precision; prompt encoding and mask decoding run
in float32 (they are small, and the masks are thresholded logits).

``segment_anything``'s attention builds its relative-position index on the host and indexes the
device's table with it, two copies to the device in every block (64 for ViT-H), each one a wait that
lasts another process's time slice when stages share a GPU. :func:`device_rel_pos` takes its place: the
same index, built once per (sizes, device) and kept there.

With ``compile_encoder`` the image encoder runs through ``torch.compile`` (1.6x faster on ViT-H at
4 images, bench/results/sam_encoder.json): every call then encodes a full batch of
:data:`ENCODER_BATCH`, short ones padded, so one static graph serves every call and a job's
features do not depend on what shares its batch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling import image_encoder
from segment_anything.utils.transforms import ResizeLongestSide

from amodal.models.base import Box
from amodal.models.base import require

PROMPT_DIM = 256
DECODER_BATCH = 32  # boxes per mask-decoder call; bounds the (boxes x 256 x 64 x 64) activations
ENCODER_BATCH = 4  # images per image-encoder call; bounds the global-attention activations (ViT-H: 4096 tokens)


@cache
def _relative_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """``segment_anything``'s relative-position index for these sizes, on ``device``."""
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return ((q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)).long().to(device)


_host_rel_pos = image_encoder.get_rel_pos


def device_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """``segment_anything.modeling.image_encoder.get_rel_pos`` with its index kept on the table's device
    (a table that must be resized first, which the published models never need, takes the original)."""
    if rel_pos.shape[0] != 2 * max(q_size, k_size) - 1:
        return _host_rel_pos(q_size, k_size, rel_pos)
    return rel_pos[_relative_index(q_size, k_size, rel_pos.device)]


image_encoder.get_rel_pos = device_rel_pos  # add_decomposed_rel_pos looks it up at each call


@dataclass(frozen=True)
class SamArchitecture:
    """The image encoder's shape; everything else is the published SAM."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    patch_size: int = 16
    img_size: int = 1024


VIT_H = SamArchitecture(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), window_size=14)
"""The published ViT-H encoder (``sam_vit_h_4b8939.pth``)."""
TINY = SamArchitecture(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=8, img_size=256)
"""The tests' encoder: 32-d at 256 px, 2 blocks, the second global."""


def _tensor(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"not a SAM checkpoint: missing {key}")
    tensor = state[key]
    if tensor.ndim != ndim:
        raise ValueError(f"not a SAM checkpoint: {key} has shape {tuple(tensor.shape)}, expected {ndim} dims")
    return tensor


def infer_architecture(state: Mapping[str, torch.Tensor]) -> SamArchitecture:
    """Read the image encoder's architecture from a SAM state dict (rules in the module docstring)."""
    embed_dim, _, patch_size, _ = _tensor(state, "image_encoder.patch_embed.proj.weight", 4).shape
    grid = _tensor(state, "image_encoder.pos_embed", 4).shape[1]
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    if not block_ids:
        raise ValueError("not a SAM checkpoint: no image_encoder.blocks.N.* keys")
    depth = max(block_ids) + 1
    tables = [_tensor(state, f"image_encoder.blocks.{i}.attn.rel_pos_h", 2) for i in range(depth)]
    head_dim = tables[0].shape[1]
    global_ids = tuple(i for i, t in enumerate(tables) if t.shape[0] == 2 * grid - 1)
    window_rows = {t.shape[0] for i, t in enumerate(tables) if i not in global_ids}
    if len(window_rows) > 1:
        raise ValueError(f"not a SAM checkpoint: rel_pos_h tables of several window sizes {sorted(window_rows)}")
    window_size = (window_rows.pop() + 1) // 2 if window_rows else 0
    return SamArchitecture(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=global_ids,
        window_size=window_size,
        patch_size=patch_size,
        img_size=grid * patch_size,
    )


def build_sam(arch: SamArchitecture) -> Sam:
    """An untrained SAM of the given encoder architecture and the published prompt/mask parts."""
    grid = arch.img_size // arch.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=arch.img_size,
            patch_size=arch.patch_size,
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=4,
            out_chans=PROMPT_DIM,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=arch.window_size,
            global_attn_indexes=arch.global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


def load_sam(state: Mapping[str, torch.Tensor]) -> Sam:
    """Build SAM from a state dict; a key of the wrong shape, missing or unknown is named in the error."""
    model = build_sam(infer_architecture(state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"not a SAM checkpoint: {err}") from None
    return model.eval()


@dataclass(frozen=True)
class SamEmbedding:
    """One encoded image: its features and the sizes that map boxes in and masks out."""

    features: torch.Tensor  # (1, 256, grid, grid), float32
    input_size: tuple[int, int]  # the resized image inside the square model input
    original_size: tuple[int, int]


class SamSegmenter:
    """Boxes to masks: images encoded in batches (every image is padded to the same square input, so
    batching does not change a result), each image's boxes decoded together."""

    def __init__(self, model: Sam, device: torch.device, dtype: torch.dtype, compile_encoder: bool = False) -> None:
        self.device = device
        self.dtype = dtype
        self.model = model.to(device).eval()
        self.model.image_encoder.to(dtype)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.compiled = compile_encoder
        if compile_encoder:
            self.model.image_encoder.compile()

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device, dtype: torch.dtype,
                        compile_encoder: bool = False) -> SamSegmenter:
        state = torch.load(require(Path(path)), map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: not a SAM checkpoint (expected a state dict)")
        try:
            return cls(load_sam(state), device=device, dtype=dtype, compile_encoder=compile_encoder)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> list[SamEmbedding]:
        """Encode at most :data:`ENCODER_BATCH` uint8 RGB images in one batched image-encoder call."""
        if not images:
            return []
        if len(images) > ENCODER_BATCH:
            raise ValueError(f"encode takes at most {ENCODER_BATCH} images, got {len(images)}")
        inputs, sizes = [], []
        for image in images:
            resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
            inputs.append(self.model.preprocess(resized.permute(2, 0, 1).float()))
            sizes.append((tuple(resized.shape[:2]), tuple(image.shape[:2])))
        batch = torch.stack(inputs).to(self.dtype)
        if self.compiled and len(inputs) < ENCODER_BATCH:  # the compiled graph's one shape
            batch = torch.cat([batch, batch.new_zeros((ENCODER_BATCH - len(inputs), *batch.shape[1:]))])
        features = self.model.image_encoder(batch)[:len(inputs)].float()
        return [
            SamEmbedding(features=f[None], input_size=input_size, original_size=original_size)
            for f, (input_size, original_size) in zip(features, sizes)
        ]

    @torch.inference_mode()
    def decode(self, embedding: SamEmbedding, boxes: Sequence[Box]) -> list[np.ndarray]:
        """One bool mask at the original image's size per ``(x0, y0, x1, y1)`` box."""
        if not boxes:
            return []
        scaled = self.transform.apply_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), embedding.original_size)
        scaled = torch.as_tensor(scaled, dtype=torch.float32, device=self.device)
        masks: list[np.ndarray] = []
        for chunk in scaled.split(DECODER_BATCH):
            sparse, dense = self.model.prompt_encoder(points=None, boxes=chunk, masks=None)
            low_res, _ = self.model.mask_decoder(
                image_embeddings=embedding.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits = self.model.postprocess_masks(low_res, embedding.input_size, embedding.original_size)
            masks.extend((logits[:, 0] > self.model.mask_threshold).cpu().numpy())
        return masks

    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]]) -> list[list[np.ndarray]]:
        """For each image, one mask per box of its own; images without boxes are not encoded."""
        masks: list[list[np.ndarray]] = [[] for _ in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        for start in range(0, len(todo), ENCODER_BATCH):
            chunk = todo[start:start + ENCODER_BATCH]
            for i, embedding in zip(chunk, self.encode([images[i] for i in chunk])):
                masks[i] = self.decode(embedding, boxes[i])
        return masks


def write_tiny(path: Path) -> None:
    """Write a tiny random-weight SAM state dict (:data:`TINY`)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # same weights on every write
        torch.manual_seed(0)
        model = build_sam(TINY)
        # The published init zeroes these; random values exercise them.
        model.image_encoder.pos_embed.normal_(std=0.02)
        for block in model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.02)
            block.attn.rel_pos_w.normal_(std=0.02)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
