"""Stable Diffusion 2 inpainting on a tiny random-weight pipeline in the published folder layout."""
from __future__ import annotations

import dataclasses
import logging
import re
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amodal.models.base import InpaintRequest
from amodal.models.sd_inpaint import StableDiffusionInpainter, write_tiny
from tests.paths import EXAMPLES

IMAGES = EXAMPLES / "images"
SIZE = 512


def square(name: str) -> np.ndarray:
    image = Image.open(IMAGES / name).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BICUBIC))


def box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stable-diffusion-2-inpainting")
    write_tiny(path)
    return path


@pytest.fixture(scope="module")
def inpainter(folder) -> StableDiffusionInpainter:
    return StableDiffusionInpainter.from_pretrained(
        folder, device=torch.device("cpu"), dtype=torch.float32, num_inference_steps=2, guidance_scale=7.5
    )


@pytest.fixture(scope="module")
def cat_request() -> InpaintRequest:
    return InpaintRequest(square("cat-7875506_640_cat.jpg"), box_mask(120, 360, 200, 420), "a cat", seed=3)


def test_tiny_pipeline_has_published_layout(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    for sub, files in {
        "unet": ["config.json"], "vae": ["config.json"], "text_encoder": ["config.json"],
        "scheduler": ["scheduler_config.json"], "feature_extractor": ["preprocessor_config.json"],
        "tokenizer": ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"],
    }.items():
        assert index[sub][1] is not None
        assert all((folder / sub / f).is_file() for f in files), sub
    unet = json.loads((folder / "unet" / "config.json").read_text())
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert vae["latent_channels"] == 4 and vae["scaling_factor"] == 0.18215
    assert len(vae["block_out_channels"]) == 4  # three downsamplings: 8x


def test_loads_with_sdpa_attention_and_no_safety_checker(inpainter):
    pipeline = inpainter.pipeline
    assert pipeline.safety_checker is None
    assert pipeline.vae_scale_factor == 8
    assert pipeline.tokenizer.pad_token == "!"
    processors = {type(p).__name__ for p in pipeline.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}


def test_inpaint_is_deterministic_and_independent_of_the_batch(inpainter, cat_request):
    (single,) = inpainter.inpaint([cat_request])
    assert single.shape == (SIZE, SIZE, 3) and single.dtype == np.uint8
    assert single.std() > 1.0

    (again,) = inpainter.inpaint([cat_request])
    np.testing.assert_array_equal(again, single)

    bird = InpaintRequest(square("bird-8951872_640_bird.jpg"), box_mask(0, 200, 0, 512), "a bird", seed=11)
    batch = inpainter.inpaint([bird, cat_request])
    assert len(batch) == 2 and all(b.shape == (SIZE, SIZE, 3) and b.dtype == np.uint8 for b in batch)
    assert np.abs(batch[1].astype(int) - single).max() <= 2  # same request, other batch position
    assert np.abs(batch[0].astype(int) - single).mean() > 5

    (reseeded,) = inpainter.inpaint([dataclasses.replace(cat_request, seed=4)])
    assert np.abs(reseeded.astype(int) - single).mean() > 1


def test_device_side_conversions_paint_what_the_pipelines_own_do(inpainter, cat_request):
    """Tensors in, 8-bit out on the device: the same pixels as PIL images in and NumPy out."""
    other = dataclasses.replace(cat_request, mask=box_mask(0, 200, 0, 512), seed=8)
    requests = [cat_request, other]
    own = inpainter.pipeline(
        prompt=[r.prompt for r in requests], image=[Image.fromarray(r.image) for r in requests],
        mask_image=[Image.fromarray(r.mask.astype(np.uint8) * 255) for r in requests], height=SIZE, width=SIZE,
        num_inference_steps=2, guidance_scale=7.5, output_type="np",
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
    ).images
    expected = np.clip(np.rint(own * 255), 0, 255).astype(np.uint8)
    ours = inpainter.inpaint(requests)
    assert [o.dtype for o in ours] == [np.uint8] * 2 and ours[0].shape == (SIZE, SIZE, 3)
    assert np.array_equal(np.stack(ours), expected)


def test_inpaint_rejects_bad_batches(inpainter, cat_request):
    assert inpainter.inpaint([]) == []
    small = InpaintRequest(cat_request.image[:256, :256], cat_request.mask[:256, :256], "a cat", seed=0)
    with pytest.raises(ValueError, match="one size"):
        inpainter.inpaint([cat_request, small])
    odd = InpaintRequest(cat_request.image[:100, :100], cat_request.mask[:100, :100], "a cat", seed=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        inpainter.inpaint([odd])


@pytest.mark.slow
def test_compiled_unet_paints_what_the_eager_one_does(folder, inpainter, cat_request):
    compiled = StableDiffusionInpainter.from_pretrained(
        folder, device=torch.device("cpu"), dtype=torch.float32, num_inference_steps=2, guidance_scale=7.5,
        compile_unet=True,
    )
    assert compiled.compiled and not inpainter.compiled
    for batch in ([cat_request], [cat_request, dataclasses.replace(cat_request, seed=5)]):  # a second shape
        for ours, eager in zip(compiled.inpaint(batch), inpainter.inpaint(batch)):
            assert np.abs(ours.astype(int) - eager).max() <= 2


def test_unet_and_vae_are_compiled_on_cuda_only(tmp_path):
    from amodal.models.registry import SD_INPAINT_DIR, ModelSet
    from amodal.settings import Settings

    write_tiny(tmp_path / SD_INPAINT_DIR)
    models = ModelSet(tmp_path, Settings(device="cpu", compile_unet=True, compile_vae=True, num_inference_steps=1))
    assert not models.inpainter.compiled
    assert not hasattr(models.inpainter.pipeline.vae.decoder.forward, "__wrapped__")


def test_each_call_logs_its_denoising_time(inpainter, cat_request, caplog, monkeypatch):
    steps = []
    unet_forward = inpainter.pipeline.unet.forward
    monkeypatch.setattr(inpainter.pipeline.unet, "forward", lambda *a, **k: steps.append(1) or unet_forward(*a, **k))
    with caplog.at_level(logging.INFO, logger="amodal.models.sd_inpaint"):
        inpainter.inpaint([cat_request, cat_request])
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("denoised")]
    counted, seconds = re.fullmatch(rf"denoised 2 image\(s\) at {SIZE}x{SIZE}: (\d+) steps in ([\d.]+) s", line).groups()
    assert int(counted) == len(steps) - 1  # UNet calls, timed from the end of the first
    assert float(seconds) > 0


def test_one_encoder_call_paints_what_diffusers_image_by_image_encoding_does(folder, inpainter, cat_request):
    """The masked images go through the VAE's encoder in one call, each latent sampled from its own generator:
    the pixels of diffusers' own pipeline, which encodes one image per call."""
    from diffusers import StableDiffusionInpaintPipeline

    own = StableDiffusionInpaintPipeline.from_pretrained(folder, dtype=torch.float32)
    own.set_progress_bar_config(disable=True)
    requests = [cat_request, dataclasses.replace(cat_request, mask=box_mask(0, 200, 0, 512), seed=8)]
    expected = own(
        prompt=[r.prompt for r in requests], image=[Image.fromarray(r.image) for r in requests],
        mask_image=[Image.fromarray(r.mask.astype(np.uint8) * 255) for r in requests], height=SIZE, width=SIZE,
        num_inference_steps=2, guidance_scale=7.5, output_type="np",
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
    ).images
    calls = []
    encode = inpainter.pipeline.vae.encode
    inpainter.pipeline.vae.encode = lambda images, *a, **k: calls.append(len(images)) or encode(images, *a, **k)
    try:
        ours = np.stack(inpainter.inpaint(requests)).astype(int)
    finally:
        del inpainter.pipeline.vae.encode
    assert calls == [2]
    assert np.abs(ours - np.rint(expected * 255)).max() <= 1


@pytest.mark.slow
def test_compiled_vae_paints_what_the_eager_one_does(folder, inpainter, cat_request):
    compiled = StableDiffusionInpainter.from_pretrained(
        folder, device=torch.device("cpu"), dtype=torch.float32, num_inference_steps=2, guidance_scale=7.5,
        compile_vae=True,
    )
    vae = compiled.pipeline.vae
    assert hasattr(vae.encoder.forward, "__wrapped__") and hasattr(vae.decoder.forward, "__wrapped__")
    assert not hasattr(inpainter.pipeline.vae.decoder.forward, "__wrapped__")
    requests = [cat_request, dataclasses.replace(cat_request, seed=5)]
    for ours, eager in zip(compiled.inpaint(requests), inpainter.inpaint(requests)):
        assert np.abs(ours.astype(int) - eager).max() <= 2


@pytest.mark.slow
def test_a_warmed_compiled_inpainter_takes_any_batch_without_compiling(folder):
    """After the worker's warm-up at batch 4, calls of every size up to 4 reuse the graphs it compiled: a
    first short call does not stall the stage on a compile."""
    from types import SimpleNamespace

    from workers.warmup import WARMERS

    compiled = StableDiffusionInpainter.from_pretrained(
        folder, device=torch.device("cpu"), dtype=torch.float32, num_inference_steps=1, guidance_scale=7.5,
        compile_unet=True, compile_vae=True,
    )
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    WARMERS["inpainter"](SimpleNamespace(inpainter=compiled), image, box_mask(0, 32, 0, 32)[:64, :64], 64, 4)
    request = InpaintRequest(image, box_mask(8, 40, 8, 40)[:64, :64], "a cat", seed=1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (3, 1, 4, 2):
            assert len(compiled.inpaint([request] * n)) == n
