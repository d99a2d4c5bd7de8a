"""LoRA (Hu et al., arXiv 2106.09685): `y = W x + b + (alpha / r) B A dropout(x)`, `A` Kaiming-uniform, `B = 0`.

The update is added in place onto the layer's GEMM output, per slice of rows, so on the fused QKV projection the
un-targeted rows keep exactly the base layer's values and the base GEMM is never split.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import recompute
from lit_gpt.adapters.base import SliceAdapter, compute_dtype, register_method
from lit_gpt.adapters.config import AdapterConfig


class LoRAAdapter(SliceAdapter):
    """Parameters ``A`` `(r, in)` and ``B`` `(out_slice, r)`."""

    additive = True

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, device=None, dtype=None) -> None:
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def factors(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`[C, P]` with `C Pᵀ = (alpha / r) B A x` for `AdaptedLinear`'s in-place slice update."""
        if x.dtype == self.A.dtype and not torch.is_autocast_enabled(x.device.type):
            C = _InputProjection.apply(x, self.A)
        else:
            C = F.linear(x, self.A)
        return [C, self.B * self.scaling]

    def delta_weight(self) -> torch.Tensor:
        dtype = compute_dtype(self.A)
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


class _InputProjection(torch.autograd.Function):
    """`x Aᵀ`, keeping for `A`'s gradient what rebuilds `x` where `lit_gpt.recompute` marked it (a norm's output, the
    MLP's product: tensors autograd keeps anyway) instead of `x` itself: one activation fewer per adapted input."""

    @staticmethod
    def forward(ctx, x, A):
        keep, ctx.recipe = recompute.pack(x) if ctx.needs_input_grad[1] else ((), None)
        ctx.save_for_backward(*keep, A)
        return F.linear(x, A)

    @staticmethod
    def backward(ctx, g):
        *keep, A = ctx.saved_tensors
        gx = g @ A if ctx.needs_input_grad[0] else None
        gA = None
        if ctx.needs_input_grad[1]:
            x = recompute.unpack(keep, ctx.recipe)
            gA = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return gx, gA


@register_method("lora")
def build_lora(config: AdapterConfig, layer: str, in_features: int, out_features: int, device, dtype):
    return LoRAAdapter(in_features, out_features, config.r, config.alpha, device=device, dtype=dtype)
