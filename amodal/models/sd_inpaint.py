"""Stable Diffusion 2 inpainting (``stabilityai/stable-diffusion-2-inpainting``) through diffusers."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from amodal.models.base import InpaintRequest
from amodal.models.runtime import compile_batch_dynamic
from amodal.models.tokenizers import BOS, EOS, tiny_clip_vocab, write_tiny_clip_tokenizer

log = logging.getLogger(__name__)



class BatchEncodingInpaintPipeline(StableDiffusionInpaintPipeline):
    """diffusers' inpainting pipeline, encoding a batch of masked images in one VAE call.

    With one generator per image, diffusers encodes the images one at a time (16 VAE calls for 16 images);
    here the batch goes through the encoder once and each image's latent sample is drawn from its own
    generator, as diffusers draws it (its mean plus its deviation times the generator's normal noise).
    """

    def _encode_vae_image(self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator]):
        if not isinstance(generator, list):
            return super()._encode_vae_image(image, generator)
        dist = self.vae.encode(image).latent_dist
        noise = torch.cat([randn_tensor(dist.mean[:1].shape, generator=g, device=dist.mean.device, dtype=dist.mean.dtype)
                           for g in generator])
        return self.vae.config.scaling_factor * (dist.mean + dist.std * noise)


class StableDiffusionInpainter:
    """Repaints a batch of requests in one pipeline call.

    Each request's noise comes from its own generator seeded with ``request.seed`` and drawn on
    the CPU (the same noise on every device), so a result depends on its request alone, not on
    what else shares the batch, up to the rounding of batched kernels (a level or two of 255 in
    fp32 and fp16, a few more in bf16).

    Images and masks go to the pipeline as tensors on its device, and its output stays there until it
    is 8-bit: the same arithmetic as the pipeline's PIL and NumPy conversions (the same results), done
    on the device instead of the host, where it took 0.3-1.0 s per call of 16 images on two cores.

    ``compile_unet`` puts the UNet through ``torch.compile``, ``compile_vae`` the VAE's encoder and decoder (on
    one H200 their share of a 16-image call fell from 0.32 to 0.15 s: bench/results/inpaint_call.json).

    Each call logs the time of its denoising loop from the end of the first step to the end of the
    last (UNet and scheduler only, timed on the device without synchronising), so the UNet's achieved
    arithmetic rate can be read off a running worker.
    """

    name = "sd2_inpaint"

    def __init__(self, pipeline: StableDiffusionInpaintPipeline, num_inference_steps: int, guidance_scale: float,
                 compile_unet: bool = False, compile_vae: bool = False) -> None:
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.compiled = compile_unet or compile_vae  # a module compiled: the worker warms each batch kind
        if compile_unet:
            compile_batch_dynamic(pipeline.unet, fullgraph=True)
        if compile_vae:
            compile_batch_dynamic(pipeline.vae.encoder)
            compile_batch_dynamic(pipeline.vae.decoder)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        num_inference_steps: int,
        guidance_scale: float,
        compile_unet: bool = False,
        compile_vae: bool = False,
    ) -> "StableDiffusionInpainter":
        """Load the pipeline, its UNet and VAE compiled where asked. A compiled module compiles on first use one graph
        for every batch above 1 image (``compile_batch_dynamic``) and the VAE one for a single image; the UNet's
        batch is never 1 (classifier-free guidance doubles it)."""
        pipeline = BatchEncodingInpaintPipeline.from_pretrained(str(path_or_id), dtype=dtype).to(device)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, num_inference_steps, guidance_scale, compile_unet, compile_vae)

    def inpaint(self, requests: Sequence[InpaintRequest]) -> list[np.ndarray]:
        """Return one uint8 RGB image per request, of the request's size (a multiple of 8)."""
        if not requests:
            return []
        height, width = requests[0].image.shape[:2]
        scale = self.pipeline.vae_scale_factor
        for r in requests:
            if r.image.shape != (height, width, 3) or r.mask.shape != (height, width):
                raise ValueError(f"one batch needs one size: {r.image.shape} / {r.mask.shape} vs {(height, width)}")
        if height % scale or width % scale:
            raise ValueError(f"inpainting size {height}x{width} is not a multiple of {scale}")
        clock = _StepClock(self.pipeline.device)
        images = self._call(requests, height, width, clock)
        log.info("denoised %d image(s) at %dx%d: %d steps in %.4f s", len(requests), height, width,
                 len(clock.marks) - 1, clock.seconds())
        rgb = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return list(rgb.cpu().numpy())

    def _call(self, requests: Sequence[InpaintRequest], height: int, width: int, clock: "_StepClock") -> torch.Tensor:
        """The pipeline's output for the requests: a float image batch on the device, in [0, 1]."""
        device = self.pipeline.device
        return self.pipeline(
            prompt=[r.prompt for r in requests],
            image=torch.from_numpy(np.stack([r.image for r in requests])).to(device).permute(0, 3, 1, 2) / 255.0,
            mask_image=torch.from_numpy(np.stack([r.mask for r in requests])).to(device)[:, None].float(),
            height=height,
            width=width,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[_generator(r.seed) for r in requests],
            output_type="pt",
            callback_on_step_end=clock,
        ).images


class _StepClock:
    """A ``callback_on_step_end`` that marks the end of every denoising step (CUDA events on a GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def __call__(self, pipeline, step: int, timestep, tensors: dict) -> dict:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())
        return {}

    def seconds(self) -> float:
        """From the first mark to the last (the pipeline's output is on the host: the device is done)."""
        if len(self.marks) < 2:
            return 0.0
        first, last = self.marks[0], self.marks[-1]
        return first.elapsed_time(last) / 1000 if self.cuda else last - first


def write_tiny(folder: Path) -> None:
    """Write a tiny random-weight pipeline in the ``stable-diffusion-2-inpainting`` folder layout."""
    folder = Path(folder)
    write_tiny_clip_tokenizer(folder / "tokenizer", pad_token="!")
    vocab = tiny_clip_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
            bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab["!"],
        ))
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=9, out_channels=4, layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=32,
            use_linear_projection=True,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
            sample_size=512, scaling_factor=0.18215,
        )
    # The scheduler SD2 inpainting ships with.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    pipeline = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=CLIPImageProcessor(),
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()  # SD2's tokenizer folder has vocab.json + merges.txt only


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from fresh entropy when it is ``None``."""
    generator = torch.Generator("cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
