"""FP8 matrix multiplies for a module's linear layers (``fp8_unet``; docs/design.md, "Stages").

Hopper's tensor cores multiply e4m3 at twice bf16's rate. A :class:`Fp8Linear` keeps its weight in e4m3 with one
scale per output feature, quantizes each input row with a scale of its own (absolute maximum to e4m3's largest
value) and multiplies with ``torch._scaled_mm``, which rescales the float32 accumulator to the input's dtype. The
quantizing of the input is elementwise work that Inductor fuses into the layer before it when compiled.
"""
from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
# torch._scaled_mm takes inner and output dimensions that are multiples of 16.
ALIGNMENT = 16


def _scales(x: torch.Tensor) -> torch.Tensor:
    """One float32 scale per row of ``x`` that maps its largest magnitude to e4m3's largest value."""
    return x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX


class Fp8Linear(nn.Module):
    """A :class:`torch.nn.Linear` computed in e4m3: row-wise scaled input, weight scaled per output feature."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = _scales(weight)
        self.register_buffer("weight", (weight / scale).to(E4M3))  # (out, in), row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = _scales(rows)
        quantized = (rows.float() / scale).to(E4M3)
        # The transposed row-major weight is the column-major right operand _scaled_mm asks for.
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(module: nn.Module) -> int:
    """Replace every :class:`torch.nn.Linear` in ``module`` whose dimensions ``_scaled_mm`` takes by an
    :class:`Fp8Linear`, in place; return how many were replaced."""
    replaced = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.in_features % ALIGNMENT == 0
                    and child.out_features % ALIGNMENT == 0):
                setattr(parent, name, Fp8Linear(child))
                replaced += 1
    return replaced
