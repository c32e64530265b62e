"""FP8 linear layers (amodal.models.fp8) on the CPU, whose torch._scaled_mm takes the same scaled operands."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from amodal.models.fp8 import E4M3, Fp8Linear, quantize_linears
from amodal.models.sd_inpaint import StableDiffusionInpainter, write_tiny
from tests.test_models_sd_inpaint import box_mask, square
from amodal.models.base import InpaintRequest


def relative_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ours.float() - exact.float()).norm() / exact.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_fp8_linear_computes_what_the_linear_does_within_e4m3s_rounding(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    # Rows of very different magnitudes: one scale per row keeps the small rows' precision.
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 2, 5)[None, :, None]
    x = x.to(dtype)
    fp8 = Fp8Linear(linear)
    assert fp8.weight.dtype == E4M3 and fp8.weight_scale.shape == (1, 48)
    out = fp8(x)
    assert out.shape == (3, 5, 48) and out.dtype == dtype
    exact = linear(x)
    for row in range(5):  # every magnitude within e4m3's few percent
        assert relative_error(out[:, row], exact[:, row]) < 0.06
    assert relative_error(out, exact) > 0  # it did compute in e4m3


def test_quantize_linears_replaces_the_aligned_linears_only():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Sequential(nn.Linear(64, 16, bias=False), nn.Linear(16, 10)),
                          nn.Conv2d(3, 16, 3))
    x = torch.randn(4, 32)
    exact = model[:3](x)
    assert quantize_linears(model) == 2
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2][0], Fp8Linear) and model[2][0].bias is None
    assert type(model[2][1]) is nn.Linear and type(model[3]) is nn.Conv2d  # 10 outputs: not a multiple of 16
    assert relative_error(model[:3](x), exact) < 0.08


def test_an_fp8_unet_inpaints_near_what_the_bf16_one_does(tmp_path):
    write_tiny(tmp_path)
    request = InpaintRequest(square("cat-7875506_640_cat.jpg"), box_mask(120, 360, 200, 420), "a cat", seed=3)
    common = dict(device=torch.device("cpu"), dtype=torch.bfloat16, num_inference_steps=2, guidance_scale=7.5)
    exact = StableDiffusionInpainter.from_pretrained(tmp_path, **common)
    fp8 = StableDiffusionInpainter.from_pretrained(tmp_path, fp8_unet=True, **common)
    linears = [m for m in fp8.pipeline.unet.modules() if isinstance(m, Fp8Linear)]
    assert linears and not any(isinstance(m, Fp8Linear) for m in exact.pipeline.unet.modules())
    assert not any(isinstance(m, Fp8Linear) for m in fp8.pipeline.text_encoder.modules())
    ours, theirs = fp8.inpaint([request])[0].astype(int), exact.inpaint([request])[0].astype(int)
    assert 0 < np.abs(ours - theirs).mean() < 5


@pytest.mark.slow
def test_a_compiled_fp8_unet_inpaints_near_what_the_bf16_one_does(tmp_path):
    write_tiny(tmp_path)
    request = InpaintRequest(square("cat-7875506_640_cat.jpg"), box_mask(120, 360, 200, 420), "a cat", seed=3)
    common = dict(device=torch.device("cpu"), dtype=torch.bfloat16, num_inference_steps=2, guidance_scale=7.5)
    compiled = StableDiffusionInpainter.from_pretrained(tmp_path, compile_unet=True, fp8_unet=True, **common)
    exact = StableDiffusionInpainter.from_pretrained(tmp_path, **common)
    batch = [request, InpaintRequest(request.image, request.mask, request.prompt, seed=5)]  # a dynamic batch
    for ours, theirs in zip(compiled.inpaint(batch), exact.inpaint(batch)):
        assert 0 < np.abs(ours.astype(int) - theirs).mean() < 5
