"""LoRA (Hu et al., arXiv 2106.09685): `y = W x + b + (alpha / r) B A dropout(x)`, `A` Kaiming-uniform, `B = 0`.

The update is added in place onto the layer's GEMM output, per slice of rows, so on the fused QKV projection the
un-targeted rows keep exactly the base layer's values and the base GEMM is never split.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        return [F.linear(x, self.A), self.B * self.scaling]

    def delta_weight(self) -> torch.Tensor:
        dtype = compute_dtype(self.A)
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


@register_method("lora")
def build_lora(config: AdapterConfig, layer: str, in_features: int, out_features: int, device, dtype):
    return LoRAAdapter(in_features, out_features, config.r, config.alpha, device=device, dtype=dtype)
