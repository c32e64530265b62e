"""Grounding DINO: open-vocabulary boxes for text labels, through ``transformers``.

Reads a folder in the layout of ``IDEA-Research/grounding-dino-tiny`` (``config.json``,
``model.safetensors``, ``preprocessor_config.json`` and a BERT WordPiece tokenizer), or that hub id.
Labels are lowercased, joined as Grounding DINO expects (``"cat. dog."``), and split into several
prompts where they would not fit the text encoder's ``max_text_len`` tokens. Each box's phrase (its
tokens above the text threshold) is mapped back to the given label it shares the most words with.
Only the ``max_detections`` best-scoring queries of each prompt are post-processed (the scene keeps that
many at most anyway). Post-processing is ``transformers``' (``post_process_grounded_object_detection``:
sigmoid scores, box threshold, the phrase of tokens over the text threshold, first and last position
excluded) done for the whole batch on the device and brought to the host in one copy: ``transformers``'
own loop reads each box's tokens one element at a time, a host synchronisation each, which cost 0.4 s
per call of 4 images beside a running UNet (bench/gpu_profile.py).

``detect`` batches across images: each (image, prompt) pair is a row, and rows go through the model
together, ``batch_size`` at most, only with rows whose preprocessed pixels have the same shape, so image
padding never enters. Shorter prompts are padded on the right and their pad tokens masked (the attention
mask, and ``transformers``' special-token self-attention mask never lets a real token see one; a truncated
prompt is the longest and never padded), so batching changes a row's result only by float rounding.
"""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
)
from transformers.image_transforms import center_to_corners_format

from amodal.models.base import Detection
from amodal.models.base import require


def normalize_label(label: str) -> str:
    """Lowercase, no dots (the label separator), single spaces."""
    return " ".join(label.lower().replace(".", " ").split())


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text))


def match_label(phrase: str, labels: Sequence[str]) -> int | None:
    """Index of the label whose words best match the phrase's (Jaccard; ties: the first label).

    ``labels`` are written the way the tokenizer decodes them. ``None`` when no label shares a word.
    """
    said = _words(phrase)
    best, best_score = None, 0.0
    for i, label in enumerate(labels):
        words = _words(label)
        score = len(said & words) / len(said | words) if words else 0.0
        if score > best_score:
            best, best_score = i, score
    return best


def chunk_labels(token_counts: Sequence[int], max_tokens: int) -> list[range]:
    """Split consecutive labels into runs whose prompt fits ``max_tokens``.

    A label costs its tokens plus its ``"."``; each prompt adds ``[CLS]`` and ``[SEP]``. A label too
    long to fit alone gets a run of its own (the tokenizer then truncates it).
    """
    chunks: list[range] = []
    start, used = 0, 2
    for i, count in enumerate(token_counts):
        if i > start and used + count + 1 > max_tokens:
            chunks.append(range(start, i))
            start, used = i, 2
        used += count + 1
    if start < len(token_counts):
        chunks.append(range(start, len(token_counts)))
    return chunks


def _clamp(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    w, h = float(width), float(height)
    return (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))


class GroundingDino:
    """Boxes for text labels, scored and thresholded as in Grounding DINO."""

    def __init__(
        self,
        model: GroundingDinoForObjectDetection,
        processor: GroundingDinoProcessor,
        device: torch.device,
        dtype: torch.dtype,
        box_threshold: float,
        text_threshold: float,
        max_detections: int = 900,
        batch_size: int = 8,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.max_detections = max_detections
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        box_threshold: float,
        text_threshold: float,
        max_detections: int = 900,
        batch_size: int = 8,
    ) -> GroundingDino:
        if isinstance(path_or_id, Path):
            require(path_or_id)
        model = GroundingDinoForObjectDetection.from_pretrained(path_or_id, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path_or_id)
        return cls(model, processor, device, dtype, box_threshold, text_threshold, max_detections, batch_size)

    @property
    def max_text_len(self) -> int:
        return self.model.config.max_text_len

    def prompts(self, labels: Sequence[str]) -> list[list[str]]:
        """The normalized, de-duplicated labels, grouped into prompts that fit the text encoder."""
        unique = list(dict.fromkeys(n for n in map(normalize_label, labels) if n))
        tokenizer = self.processor.tokenizer
        counts = [len(ids) for ids in tokenizer(unique, add_special_tokens=False)["input_ids"]] if unique else []
        return [unique[c.start:c.stop] for c in chunk_labels(counts, self.max_text_len)]

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[str]]) -> list[list[Detection]]:
        """For each uint8 RGB image, boxes for its own labels, best first, each with the given label it matched
        (at most ``max_detections`` per prompt)."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label lists")
        pixels: dict[int, dict[str, torch.Tensor]] = {}
        rows_by_shape: dict[tuple[int, ...], list[tuple[int, list[str]]]] = {}
        for i, (image, names) in enumerate(zip(images, labels)):
            prompts = self.prompts(names)
            if prompts:
                pixels[i] = dict(self.processor.image_processor(Image.fromarray(image), return_tensors="pt"))
                rows_by_shape.setdefault(tuple(pixels[i]["pixel_values"].shape), []).extend((i, p) for p in prompts)
        detections: list[list[Detection]] = [[] for _ in images]
        for rows in rows_by_shape.values():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                results = self._forward(batch, pixels, [images[i].shape[:2] for i, _ in batch])
                for (i, prompt), result in zip(batch, results):
                    detections[i].extend(self._as_detections(result, prompt, labels[i], images[i].shape[:2]))
        return [sorted(found, key=lambda d: -d.score) for found in detections]

    def _forward(
        self, rows: Sequence[tuple[int, list[str]]], pixels: dict[int, dict[str, torch.Tensor]],
        sizes: Sequence[tuple[int, int]],
    ) -> list[dict]:
        """Post-processed outputs for rows of (image index, prompt) whose pixels have one shape."""
        text = self.processor.tokenizer(
            [". ".join(prompt) + "." for _, prompt in rows],
            padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt",
        ).to(self.device)
        inputs = {k: torch.cat([pixels[i][k] for i, _ in rows]).to(self.device) for k in pixels[rows[0][0]]}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs, **text)
        best = outputs.logits.amax(-1).topk(min(self.max_detections, outputs.logits.shape[1]), dim=-1).indices
        logits = torch.take_along_dim(outputs.logits, best[..., None], dim=1).float()
        boxes = torch.take_along_dim(outputs.pred_boxes, best[..., None], dim=1).float()
        return self._post_process(logits, boxes, text["input_ids"], sizes)

    def _post_process(self, logits: torch.Tensor, boxes: torch.Tensor, input_ids: torch.Tensor,
                      sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """``post_process_grounded_object_detection``'s results (scores, xyxy boxes in pixels, phrases), computed
        for all rows at once and copied to the host once."""
        probs = torch.sigmoid(logits)  # (rows, queries, text positions)
        scores = probs.amax(-1)
        scale = torch.tensor([(w, h, w, h) for h, w in sizes], dtype=torch.float32).to(boxes.device)
        corners = center_to_corners_format(boxes) * scale[:, None, :]
        posmap = probs > self.text_threshold
        posmap[..., 0] = False  # the first and the last position never join a phrase
        posmap[..., -1] = False
        host = [t.cpu().numpy() for t in (scores, corners, posmap, input_ids)]
        results = []
        for scores_r, boxes_r, posmap_r, ids in zip(*host):
            keep = scores_r > self.box_threshold
            phrases = self.processor.batch_decode([ids[np.flatnonzero(row)].tolist() for row in posmap_r[keep]])
            results.append({"scores": scores_r[keep], "boxes": boxes_r[keep], "text_labels": phrases})
        return results

    def _as_detections(
        self, result: dict, prompt: Sequence[str], labels: Sequence[str], size: tuple[int, int]
    ) -> list[Detection]:
        """One row's boxes whose phrase matches a label of its prompt, named by the first given label of that
        normal form."""
        by_normal: dict[str, str] = {}
        for label in labels:
            by_normal.setdefault(normalize_label(label), label)
        height, width = size
        decoded = self._as_decoded(prompt)
        detections = []
        for score, box, phrase in zip(result["scores"].tolist(), result["boxes"].tolist(), result["text_labels"]):
            index = match_label(self._strip_special(phrase), decoded)
            if index is not None:
                detections.append(Detection(label=by_normal[prompt[index]], box=_clamp(box, width, height), score=score))
        return detections

    def _as_decoded(self, labels: Sequence[str]) -> list[str]:
        """Labels as the tokenizer gives them back (accents stripped, unknown pieces as [UNK])."""
        tokenizer = self.processor.tokenizer
        ids = tokenizer(list(labels), add_special_tokens=False)["input_ids"]
        return [self._strip_special(tokenizer.decode(i)) for i in ids]

    def _strip_special(self, phrase: str) -> str:
        for token in self.processor.tokenizer.all_special_tokens:
            phrase = phrase.replace(token, " ")
        return phrase


def tiny_vocabulary() -> list[str]:
    """A WordPiece vocabulary laid out like ``bert-base-uncased`` where Grounding DINO needs it.

    The model hard-codes the ids of ``[CLS]`` (101), ``[SEP]`` (102), ``.`` (1012) and ``?`` (1029),
    so the special tokens and the ASCII characters sit at bert-base-uncased's ids; then ``##`` pieces
    for letters and digits, so every lowercase word tokenizes, and a few whole words.
    """
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 994)]
    vocab += [c for c in map(chr, range(33, 127)) if not c.isupper()]
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += ["the", "cat", "dog", "person", "background", "mammal", "tree", "car"]
    return vocab


def write_tiny(folder: Path) -> None:
    """Write a tiny random-weight Grounding DINO in the ``grounding-dino-tiny`` folder layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocabulary()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    GroundingDinoImageProcessor(size={"shortest_edge": 160, "longest_edge": 256}).save_pretrained(folder)
    config = GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "embed_dim": 16,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 1, 1],
            "window_size": 7,
            "out_features": ["stage2", "stage3", "stage4"],
            "out_indices": [2, 3, 4],
        },
        text_config={
            "model_type": "bert",
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # the box-head weight tying needs at least two
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=5,
    )
    with torch.random.fork_rng(devices=[]):  # same weights on every write
        torch.manual_seed(0)
        model = GroundingDinoForObjectDetection(config)
    model.save_pretrained(folder)
