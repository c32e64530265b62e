"""LISA (``xinlai/LISA-13B-llama2-v1``): reasoning segmentation, a query to the visible mask of its target.

How the published model runs (``chat.py`` and ``model/LISA.py`` of the LISA repository):

1. Prompt: LLaVA v1's conversation with the image in the user's turn,
   ``"{system} USER: <im_start><image><im_end>\\n{query} ASSISTANT:"``; the query goes in verbatim.
   The tokenizer LISA was trained with (transformers 4.31's slow ``LlamaTokenizer``) cuts the text
   at its added tokens, strips the whitespace on both sides of each of them and encodes every piece
   on its own (with SentencePiece's leading ``▁``), so the newline after ``<im_end>`` is dropped;
   ``encode_prompt`` does the same, so the ids do not depend on the installed transformers.
   ``<image>`` stands for the image's 256 patch features.
2. Image features: CLIP ViT-L/14 at 224 px (the CLIP image processor: shortest side 224, centre
   crop), the hidden states of the second-to-last layer without the CLS token, through the linear
   ``mm_projector`` into LLaMA's width.
3. Greedy decoding, at most 512 new tokens.
4. Mask: for the first ``[SEG]`` in the answer, LLaMA's last-layer (normed) hidden state at the
   position that predicted it (the one before ``[SEG]``, as LISA's code picks it) goes through
   ``text_hidden_fcs`` into a 256-d sparse prompt for SAM (no points, boxes or masks; the "no mask"
   dense embedding). SAM sees the image resized to its encoder's input size on the long side (1024
   in the published checkpoint), normalised and padded; the mask decoder runs with one output
   (``multimask_output=False``), the logits are resized back to the input's size and thresholded at 0.

Many jobs are grounded in one call (``ground_batch``): their prompts, left-padded, go through one
``generate``, and SAM encodes their images in its encoder's batches; each row's answer and mask are
the ones it gets on its own, up to rounding.

LLaMA, CLIP and SAM's image encoder run in the requested precision (LLaMA in 8 or 4 bits on request,
with bitsandbytes); SAM's prompt encoder and mask decoder run in float32, as in ``amodal.models.sam``.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import (
    BitsAndBytesConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModel,
    GenerationConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

from amodal.models.base import Grounding
from amodal.models.lisa_checkpoint import (
    IM_END,
    IM_START,
    SEG_TOKEN,
    LisaExtras,
    llama_config,
    read_config,
    read_state,
    split_state,
    vision_tower_source,
)
from amodal.models.lisa_tiny import write_tiny
from amodal.models.base import require
from amodal.models.sam import ENCODER_BATCH, SamSegmenter

__all__ = ["IMAGE_PLACEHOLDER", "Generation", "LisaGrounder", "encode_prompt", "prompt_text", "write_tiny"]

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = -200  # the id that stands for the image features in a prompt
MAX_NEW_TOKENS = 512
_PIECES = re.compile(f"({re.escape(IM_START)}|{re.escape(IMAGE_TOKEN)}|{re.escape(IM_END)})")


def prompt_text(query: str, im_start_end: bool = True) -> str:
    """The published prompt for ``query`` (LLaVA v1 template, image first in the user's turn)."""
    image = f"{IM_START}{IMAGE_TOKEN}{IM_END}" if im_start_end else IMAGE_TOKEN
    return f"{SYSTEM} USER: {image}\n{query} ASSISTANT:"


def encode_prompt(tokenizer: LlamaTokenizer, text: str) -> list[int]:
    """Token ids of a prompt as LISA's tokenizer made them; ``IMAGE_PLACEHOLDER`` marks ``<image>``."""
    ids = [tokenizer.bos_token_id]
    for piece in _PIECES.split(text):
        if piece == IMAGE_TOKEN:
            ids.append(IMAGE_PLACEHOLDER)
        elif piece in (IM_START, IM_END):
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece.strip():
            ids.extend(tokenizer(piece.strip(), add_special_tokens=False).input_ids)
    return ids


@dataclass(frozen=True)
class Generation:
    """A decoded answer: its new token ids ``(T,)`` and, for each, the last-layer hidden state
    ``(T, hidden_size)`` at the position that predicted it."""

    ids: torch.Tensor
    hidden: torch.Tensor


def _quantization(
    load_in_8bit: bool, load_in_4bit: bool, device: torch.device, dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for LLaMA (``chat.py``'s: int8, or nf4 with double quantisation)."""
    if not (load_in_8bit or load_in_4bit):
        return None
    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of load_in_8bit and load_in_4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("8-bit and 4-bit loading of LISA's LLaMA need the bitsandbytes package")
    if device.type != "cuda":
        raise ValueError(f"8-bit and 4-bit loading need a CUDA device, not {device}")
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4"
    )


class LisaGrounder:
    """LISA as a ``Grounder``: images and queries in, the mask of each answer's first ``[SEG]`` out."""

    name = "lisa"

    def __init__(
        self,
        llm: LlamaForCausalLM,
        vision: CLIPVisionModel,
        extras: LisaExtras,
        tokenizer: LlamaTokenizer,
        image_processor: CLIPImageProcessorPil,
        device: torch.device,
        dtype: torch.dtype,
        *,
        select_layer: int = -2,
        im_start_end: bool = True,
        max_new_tokens: int = MAX_NEW_TOKENS,
        compile_sam: bool = False,
    ) -> None:
        missing = [t for t in (SEG_TOKEN, IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the LISA tokenizer lacks the tokens {missing}")
        self.device = device
        self.dtype = dtype
        self.llm = llm.eval()
        self.vision = vision.to(device, dtype).eval()
        self.extras = extras.to(device).eval()
        self.extras.mm_projector.to(dtype)
        self.extras.text_hidden_fcs.to(dtype)
        self.sam = SamSegmenter(extras.visual_model, device=device, dtype=dtype, compile_encoder=compile_sam)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.select_layer = select_layer
        self.im_start_end = im_start_end
        self.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        self.generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.unk_token_id,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        max_new_tokens: int = MAX_NEW_TOKENS,
        compile_sam: bool = False,
    ) -> LisaGrounder:
        """Load a LISA folder in the published layout (see ``amodal.models.lisa_checkpoint``);
        ``compile_sam`` compiles its SAM's image encoder (``amodal.models.sam``)."""
        folder = require(Path(path))
        quantization = _quantization(load_in_8bit, load_in_4bit, device, dtype)
        config = read_config(folder)
        try:
            llm_state, extras = split_state(config, read_state(folder))
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        llm = LlamaForCausalLM.from_pretrained(
            None, config=llama_config(config), state_dict=llm_state, dtype=dtype,
            device_map={"": device}, quantization_config=quantization,
        )
        vision_source = vision_tower_source(folder, config)
        return cls(
            llm,
            CLIPModel.from_pretrained(vision_source, dtype=dtype).vision_model,  # the text tower is dropped
            extras,
            LlamaTokenizer.from_pretrained(folder),
            CLIPImageProcessorPil.from_pretrained(vision_source),
            device,
            dtype,
            select_layer=config["mm_vision_select_layer"],
            im_start_end=config["mm_use_im_start_end"],
            max_new_tokens=max_new_tokens,
            compile_sam=compile_sam,
        )

    @torch.inference_mode()
    def image_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The images as LLaMA input embeddings, shape ``(images, patches, hidden_size)``."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        states = self.vision(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        return self.extras.mm_projector(states[self.select_layer][:, 1:])

    def _prompt_embeds(self, features: torch.Tensor, query: str) -> torch.Tensor:
        """One prompt's input embeddings ``(tokens, hidden_size)``, the image's features at ``<image>``."""
        ids = encode_prompt(self.tokenizer, prompt_text(query, self.im_start_end))
        at = ids.index(IMAGE_PLACEHOLDER)
        tokens = self.llm.get_input_embeddings()(torch.tensor(ids, device=self.device).clamp(min=0))
        return torch.cat([tokens[:at], features.to(tokens.dtype), tokens[at + 1 :]])

    @torch.inference_mode()
    def generate(self, images: Sequence[np.ndarray], queries: Sequence[str]) -> list[Generation]:
        """Greedy answers, one per image and query, decoded together: the prompts are left-padded
        (padding masked out, positions counted from each prompt's first token) into one ``generate``."""
        # 1. prompts: token embeddings with each image's features in place of <image>
        rows = [self._prompt_embeds(f, q) for f, q in zip(self.image_features(images), queries, strict=True)]
        # 2. left padding to the longest prompt
        length = max(len(r) for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
        attention = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            embeds[i, length - len(row) :] = row
            attention[i, length - len(row) :] = 1
        # 3. decoding; forward t's last position is the one that predicted new token t (a KV cache is in use).
        # Only the final norm's output there is kept: output_hidden_states would hold every layer's states
        # of every prompt position until the end (2 GiB for LISA-13B at 16 prompts). A copy, not a view, so that
        # the prefill's whole output is not kept alive by its last position.
        last: list[torch.Tensor] = []
        hook = self.llm.model.norm.register_forward_hook(
            lambda _module, _args, out: last.append(out[:, -1].clone())
        )
        try:
            sequences = self.llm.generate(
                inputs_embeds=embeds, attention_mask=attention, generation_config=self.generation_config
            )
        finally:
            hook.remove()
        hidden = torch.stack(last, dim=1)
        # 4. each answer up to its end-of-sequence token (the rows that ended earlier are padded after it)
        return [self._answer(ids, h) for ids, h in zip(sequences, hidden, strict=True)]

    def _answer(self, ids: torch.Tensor, hidden: torch.Tensor) -> Generation:
        ends = (ids == self.tokenizer.eos_token_id).nonzero()
        length = int(ends[0, 0]) + 1 if len(ends) else len(ids)
        return Generation(ids=ids[:length], hidden=hidden[:length])

    @torch.inference_mode()
    def seg_prompt(self, generation: Generation) -> torch.Tensor | None:
        """SAM's sparse prompt ``(256,)`` (float32) for the first ``[SEG]``, ``None`` if there is none."""
        positions = (generation.ids == self.seg_token_id).nonzero()
        if len(positions) == 0:
            return None
        hidden = generation.hidden[positions[0, 0]].to(self.device, self.dtype)
        return self.extras.seg_embedding(hidden).float()

    @torch.inference_mode()
    def masks_from_generations(
        self, images: Sequence[np.ndarray], generations: Sequence[Generation]
    ) -> list[np.ndarray | None]:
        """For each image, the bool mask of its answer's first ``[SEG]`` at the image's size; ``None`` if the
        answer has no ``[SEG]`` or the mask is empty. Only images with a ``[SEG]`` are encoded, in SAM's
        encoder batches; segment_anything's mask decoder pairs one image with its prompts, so each image's
        prompt is decoded on its own (a few milliseconds against the encoder's hundreds)."""
        prompts = [self.seg_prompt(g) for g in generations]
        todo = [i for i, p in enumerate(prompts) if p is not None]
        masks: list[np.ndarray | None] = [None] * len(images)
        sam = self.sam.model
        for start in range(0, len(todo), ENCODER_BATCH):
            chunk = todo[start : start + ENCODER_BATCH]
            for i, embedding in zip(chunk, self.sam.encode([images[i] for i in chunk])):
                sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
                low_res, _ = sam.mask_decoder(
                    image_embeddings=embedding.features,
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=torch.cat([sparse, prompts[i][None, None]], dim=1),
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                logits = sam.postprocess_masks(low_res, embedding.input_size, embedding.original_size)[0, 0]
                mask = (logits > sam.mask_threshold).cpu().numpy()
                masks[i] = mask if mask.any() else None
        return masks

    def ground_batch(self, images: Sequence[np.ndarray], queries: Sequence[str]) -> list[Grounding]:
        """One grounding per image and query: one ``generate`` over all of them, then SAM on the answers
        that say ``[SEG]``. Each row's result is the one it gets on its own (up to rounding)."""
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images for {len(queries)} queries")
        if not images:
            return []
        for image, query in zip(images, queries):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
            if not query.strip():
                raise ValueError("empty query")
        generations = self.generate(images, [q.strip() for q in queries])
        masks = self.masks_from_generations(images, generations)
        return [
            Grounding(mask=mask, text=self.tokenizer.decode(g.ids, skip_special_tokens=True).strip())
            for g, mask in zip(generations, masks)
        ]

    def ground(self, image: np.ndarray, query: str) -> Grounding:
        return self.ground_batch([image], [query])[0]
