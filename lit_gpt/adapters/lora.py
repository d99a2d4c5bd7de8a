"""LoRA (Hu et al., arXiv 2106.09685): `y = W x + b + (alpha / r) B A dropout(x)`, `A` Kaiming-uniform, `B = 0`.

The update is added in place onto the layer's GEMM output, per slice of rows, so on the fused QKV projection the
un-targeted rows keep exactly the base layer's values and the base GEMM is never split.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import recompute
from lit_gpt.adapters.base import SliceAdapter, autocast_on, compute_dtype, register_method
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
        return [F.linear(x, self.A.to(x.dtype)), (self.B * self.scaling).to(x.dtype)]

    @staticmethod
    def linear_slices(
        x: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], parts: list
    ) -> Optional[torch.Tensor]:
        """`W x + b` plus `(alpha/r) B_s A_s x` on the rows `(lo, hi)` of every `(lo, hi, adapter)` of `parts`, as one
        autograd node (`_LoRALinear`) where `W`, `b` are frozen and every tensor has `x`'s dtype outside autocast;
        None elsewhere (the caller then adds each slice's product on its own). Float32 factors (kept so under
        `--precision 16-true`) enter in `x`'s dtype, their gradients leave in float32."""
        ads = [ad for *_, ad in parts]
        if (
            W.requires_grad
            or (bias is not None and bias.requires_grad)
            or autocast_on(x)
            or W.dtype != x.dtype
            or torch.compiler.is_compiling()
        ):
            return None
        spans = tuple((lo, hi) for lo, hi, _ in parts)
        return _LoRALinear.apply(x, W, bias, spans, tuple(ad.scaling for ad in ads),
                                 *[p.to(x.dtype) for ad in ads for p in (ad.A, ad.B)])

    def delta_weight(self) -> torch.Tensor:
        dtype = compute_dtype(self.A)
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


class _LoRALinear(torch.autograd.Function):
    """`y = x Wᵀ + b`, then `y[:, lo:hi] += (alpha/r) (x A_sᵀ) B_sᵀ` for every adapted span, with a hand-written
    backward: the spans' `A` share one GEMM of `x` each way (`[A_1; A_2; ...]`), and their input gradient is added
    into the frozen GEMM's with `addmm_` instead of autograd summing one full-size gradient per span. Keeps `x` (or
    what rebuilds it: `lit_gpt.recompute`) and the small `x Aᵀ`. `W` and `b` must be frozen."""

    @staticmethod
    def forward(ctx, x, W, b, spans, scalings, *AB):
        d, m = x.shape[-1], W.shape[0]
        x2 = x.reshape(-1, d)
        As, Bs = AB[0::2], AB[1::2]
        A = torch.cat(As) if len(As) > 1 else As[0]
        y = F.linear(x, W, b)
        y2 = y.view(-1, m)
        C = x2 @ A.t()
        at = 0
        for (lo, hi), B, s in zip(spans, Bs, scalings):
            r = B.shape[1]
            y2[:, lo:hi].addmm_(C[:, at:at + r], B.t(), alpha=s)
            at += r
        ctx.spans, ctx.scalings = spans, scalings
        keep = recompute.keep_rows(ctx, x, x2, wanted=any(ctx.needs_input_grad[5::2]))  # only for A's gradient
        ctx.save_for_backward(*keep, W, A, C, *Bs)
        return y

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        W, A, C, *Bs = saved[ctx.n_kept:]
        m = W.shape[0]
        g2 = g.reshape(-1, m)
        # The small gradients are taken as (r x tokens) and (r x out) products and transposed back: on the CPU,
        # MKL runs `gsᵀ C` and `gs B` (a tall and narrow result) several times slower than `Cᵀ gs` and `Bᵀ gsᵀ`
        # (5.0 vs 0.5 ms and 1.5 vs 0.5 ms for 1024 tokens, a 1024-row span and r = 8: `bench/lora_shapes.py`)
        gCt, gB, at = [], [], 0
        for (lo, hi), B, s in zip(ctx.spans, Bs, ctx.scalings):
            r = B.shape[1]
            gs = g2[:, lo:hi]
            gCt.append(torch.mm(B.t(), gs.t()).mul_(s))
            gB.append(torch.mm(C[:, at:at + r].t(), gs).mul_(s).t())
            at += r
        gCt = torch.cat(gCt) if len(gCt) > 1 else gCt[0]  # (sum of r, tokens)
        gx = gA = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g2, W)
            gx.addmm_(gCt.t(), A)
            gx = gx.view(*g.shape[:-1], W.shape[1])
        if any(ctx.needs_input_grad[5::2]):
            x2, _ = recompute.rows(ctx, saved)
            gA = torch.mm(gCt, x2).split([B.shape[1] for B in Bs])
        grads = []
        for i in range(len(Bs)):
            grads += [gA[i] if gA is not None and ctx.needs_input_grad[5 + 2 * i] else None,
                      gB[i] if ctx.needs_input_grad[6 + 2 * i] else None]
        return (gx, None, None, None, None, *grads)


@register_method("lora")
def build_lora(config: AdapterConfig, layer: str, in_features: int, out_features: int, device, dtype):
    return LoRAAdapter(in_features, out_features, config.r, config.alpha, device=device, dtype=dtype)
