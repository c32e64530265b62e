"""CLIP (``openai/clip-vit-base-patch32``): the inpainting prompt choice and a zero-shot tagger."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from amodal.models.tokenizers import BOS, EOS, tiny_clip_vocab, write_tiny_clip_tokenizer

PROMPT_TEMPLATE = "a photo of a {}"
LOGIT_SCALE = 100.0  # CLIP's logit scale: softmax(100 x cosine)
BACKGROUND = "background"


class Clip:
    """One CLIP model and its processor; text features are cached per text."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: torch.device, dtype: torch.dtype) -> "Clip":
        model = CLIPModel.from_pretrained(str(path_or_id), dtype=dtype).to(device)
        processor = CLIPProcessor.from_pretrained(str(path_or_id))
        return cls(model, processor, device, dtype)

    @torch.inference_mode()
    def image_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """L2-normalised float32 image embeddings, shape ``(len(images), projection_dim)``."""
        pil_images = [Image.fromarray(image) for image in images]
        pixels = self.processor(images=pil_images, return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings, shape ``(len(texts), projection_dim)``."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            tokens = self.processor(text=missing, return_tensors="pt", padding=True, truncation=True)
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            ).pooler_output
            features = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
            self._text_cache.update(zip(missing, features))
        return torch.stack([self._text_cache[t] for t in texts])


class ClipPromptChooser:
    """Picks the candidate class whose "a photo of a {c}" best matches the visible target.

    The image is the full frame with everything outside the visible mask blacked out. The paper
    takes the argmax of softmax(100 x cosine); softmax is monotone, so that is the argmax of the
    cosine. ``background`` is never a candidate.
    """

    def __init__(self, clip: Clip) -> None:
        self.clip = clip

    def choose(self, images: Sequence[np.ndarray], visibles: Sequence[np.ndarray],
               candidates: Sequence[Sequence[str]]) -> list[str]:
        """For each image, its best candidate; all cut-outs go through the image tower in one call."""
        cutouts, names = [], []
        for image, visible, classes in zip(images, visibles, candidates, strict=True):
            if visible.shape != image.shape[:2]:
                raise ValueError(f"mask shape {visible.shape} does not match image shape {image.shape[:2]}")
            kept = [c for c in dict.fromkeys(classes) if c.strip().lower() != BACKGROUND]
            if not kept:
                raise ValueError(f"no prompt candidates besides {BACKGROUND!r}: {list(classes)}")
            cutouts.append(np.where(visible[..., None], image, 0).astype(np.uint8))
            names.append(kept)
        if not cutouts:
            return []
        image_features = self.clip.image_features(cutouts)
        return [
            kept[int((features @ self.clip.text_features([PROMPT_TEMPLATE.format(c) for c in kept]).T).argmax())]
            for features, kept in zip(image_features, names)
        ]


def default_vocabulary() -> list[str]:
    """The tag vocabulary shipped with the package (``amodal/data/tag_vocabulary.txt``)."""
    text = resources.files("amodal").joinpath("data/tag_vocabulary.txt").read_text(encoding="utf-8")
    return text.splitlines()


class ClipTagger:
    """Zero-shot multi-label tagging with CLIP over a fixed vocabulary.

    Rule: each word is scored by softmax over the whole vocabulary of 100 x cosine between the
    image and "a photo of a {word}"; the tags are the words with probability >= ``min_prob``, at
    most ``top_k`` of them, most probable first. The vocabulary is stripped of blank lines and
    duplicates, and its text features are computed once.
    """

    name = "clip"

    def __init__(
        self, clip: Clip, vocabulary: list[str] | None = None, top_k: int = 10, min_prob: float = 0.01
    ) -> None:
        words = default_vocabulary() if vocabulary is None else vocabulary
        self.vocabulary = [w for w in dict.fromkeys(w.strip() for w in words) if w]
        if not self.vocabulary:
            raise ValueError("empty tag vocabulary")
        self.clip = clip
        self.top_k = top_k
        self.min_prob = min_prob
        self.text_features = clip.text_features([PROMPT_TEMPLATE.format(w) for w in self.vocabulary])

    def tag(self, images: Sequence[np.ndarray]) -> list[list[str]]:
        if not images:
            return []
        logits = LOGIT_SCALE * self.clip.image_features(list(images)) @ self.text_features.T
        probs, indices = logits.softmax(-1).topk(min(self.top_k, len(self.vocabulary)))
        return [
            [self.vocabulary[i] for p, i in zip(row_p, row_i) if p >= self.min_prob]
            for row_p, row_i in zip(probs.tolist(), indices.tolist())
        ]


def write_tiny(folder: Path) -> None:
    """Write a tiny random-weight CLIP in the ``openai/clip-vit-base-patch32`` folder format."""
    folder = Path(folder)
    write_tiny_clip_tokenizer(folder)
    vocab = tiny_clip_vocab()
    towers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **towers, "vocab_size": len(vocab), "max_position_embeddings": 77,
            "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS],
        },
        vision_config={**towers, "image_size": 224, "patch_size": 32},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
