"""LoRA (Hu et al., arXiv 2106.09685): `y = W x + b + (alpha / r) B A dropout(x)`, `A` Kaiming-uniform, `B = 0`.

The update is added in place onto the layer's GEMM output, per slice of rows, so on the fused QKV projection the
un-targeted rows keep exactly the base layer's values and the base GEMM is never split.

DoRA (Liu et al., arXiv 2402.09353; `AdapterConfig.dora`) adds a trained magnitude `m` per output row:
`y = m / n * (W + s B A) x + b` with `s = alpha / r` and `n` the rows' norms `||W_i + s B_i A||`, taken as a
constant in backward (the paper's section 4.3; PEFT does the same). With dropout in training it is PEFT's form
`y = W x + b + (m/n - 1) W x_d + m/n s B A x_d` (`x_d` the dropped input). `n` is computed without forming
`W + s B A`: `n_i² = ||W_i||² + 2 s B_i·(W Aᵀ)_i + s² B_i (A Aᵀ) B_iᵀ`, one `(rows x r)` product of the weight instead
of PEFT's `(rows x in)` matrix (`||W_i||²` is kept while the frozen `W` is unchanged), and the output is rescaled in
place as `y + (m/n - 1) (y - b)`, `m/n - 1` computed in float32 as `(m - n) / n`, keeping only the result for
backward (`_DoRARescale`). Without gradients, in eval mode (chat, generation, evaluation), `n` is kept between calls
until a weight changes.

PiSSA and OLoRA (`AdapterConfig.init`) start `B A` at a part of the base weight, `B_0 A_0`. PEFT then subtracts it
from the base weight, so its adapter fits only that changed base. Here the base weight stays as it is: the adapter
keeps `A_0` and `B_0` (buffers saved in its file, never trained) and adds `s (B A - B_0 A_0) x`, computed as the LoRA
of rank 2r with `[A; A_0]` and `[B, -B_0]`: the same layer as PEFT's (it starts as the base layer and trains the same
`A`, `B`), which merges and exports as a plain LoRA on the original base.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import recompute
from lit_gpt.adapters.base import SliceAdapter, autocast_on, compute_dtype, register_method
from lit_gpt.adapters.config import AdapterConfig, starts_from_base

# set while adapters are built to receive saved tensors (`load_adapters`): PiSSA/OLoRA skip their decomposition
_LOADING: ContextVar[bool] = ContextVar("lit_gpt_lora_loading", default=False)


@contextmanager
def skipping_base_init(skip: bool = True) -> Iterator[None]:
    """Within: LoRA adapters built from the base weight (PiSSA, OLoRA) skip its decomposition, because their
    tensors are about to be loaded (an adapter file, a checkpoint)."""
    token = _LOADING.set(skip)
    try:
        yield
    finally:
        _LOADING.reset(token)


class LoRAAdapter(SliceAdapter):
    """Parameters ``A`` `(r, in)` and ``B`` `(out_slice, r)`."""

    additive = True

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, device=None, dtype=None,
                 dora: bool = False, init: str = "default") -> None:
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.init = init
        # PiSSA/OLoRA: the starting factors, subtracted back (module docstring); None for the other inits
        from_base = starts_from_base(init)
        self.register_buffer("A0", torch.zeros(r, in_features, device=device, dtype=dtype) if from_base else None)
        self.register_buffer("B0", torch.zeros(out_features, r, device=device, dtype=dtype) if from_base else None)
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        # DoRA's magnitude: set from the base weight by `init_from_base` (`build_adapters` calls it). In float32 on a
        # half-precision model, as PEFT keeps it: it starts at the row norms (about 1), where AdamW's steps are below
        # half a bfloat16 spacing, and a rounded start would not compute the base layer
        half = (dtype or torch.get_default_dtype()) in (torch.float16, torch.bfloat16)
        self.magnitude = nn.Parameter(torch.ones(out_features, device=device, dtype=torch.float32 if half else dtype)
                                      ) if dora else None
        self._norm_cache: Optional[tuple] = None
        self._base_norm_cache: Optional[tuple] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A Kaiming-uniform (or N(0, 1/r²) for the `gaussian` init, as PEFT's), B zero (DoRA's magnitude, and PiSSA's
        and OLoRA's factors, come from the base weight: `init_from_base`)."""
        if self.init == "gaussian":
            nn.init.normal_(self.A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    @torch.no_grad()
    def init_from_base(self, W: torch.Tensor) -> None:
        """From this slice's base weight `W` `(rows, in)`: DoRA's `m`, the norms of its rows, so that with `B = 0`
        the layer computes the base layer; PiSSA's and OLoRA's starting factors (`A = A_0`, `B = B_0`), unless they
        are about to be loaded (`skipping_base_init`) or `W` has no values (the meta device)."""
        if self.magnitude is not None:
            self.magnitude.copy_(torch.linalg.vector_norm(W, dim=1, dtype=compute_dtype(W)))
        if self.A0 is None or _LOADING.get() or W.is_meta:
            return
        A0, B0 = base_factors(W, self.r, self.scaling, self.init)
        for buffer, param, value in ((self.A0, self.A, A0), (self.B0, self.B, B0)):
            buffer.copy_(value)
            param.copy_(buffer)  # (the same rounding: B A - B_0 A_0 starts at zero exactly)

    def _AB(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors the layer computes with: `A`, `B`, or for PiSSA/OLoRA `[A; A_0]`, `[B, -B_0]`."""
        if self.A0 is None:
            return self.A, self.B
        return (torch.cat((self.A, self.A0.to(self.A.dtype))),
                torch.cat((self.B, -self.B0.to(self.B.dtype)), dim=1))

    def effective(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """`(A, B, rank, alpha)` of the plain LoRA this adapter computes (rank 2r, alpha 2 alpha for PiSSA/OLoRA:
        the same scale), as a PEFT export writes it."""
        A, B = self._AB()
        k = A.shape[0] // self.r
        return A, B, k * self.r, k * self.alpha

    def train(self, mode: bool = True) -> "LoRAAdapter":
        self._norm_cache = None
        return super().train(mode)

    def _weight_norms(self, W: torch.Tensor) -> torch.Tensor:
        """`||W_i + s B_i A||` for every row `i` of this slice's base weight `W` `(rows, in)`, from `W Aᵀ` (see the
        module docstring), in float32 (float64 for float64 weights), without gradient."""
        dtype = compute_dtype(W)
        W, A, B = W.detach(), self.A.detach(), self.B.detach()
        WA = F.linear(W, A.to(W.dtype)).to(dtype)  # (rows, r)
        Bc, Ac = B.to(dtype), A.to(dtype)
        s = self.scaling
        n2 = self._base_norms_squared(W, dtype).clone()
        n2 += (2 * s) * (Bc * WA).sum(1)
        n2 += (s * s) * ((Bc @ (Ac @ Ac.t())) * Bc).sum(1)
        return n2.clamp_min_(0).sqrt_()

    def _base_norms_squared(self, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`||W_i||²`, kept while `W` (frozen in training) is the same tensor at the same version."""
        if torch.compiler.is_compiling():  # (the compiler cannot trace the key: it computes them in the graph)
            return torch.linalg.vector_norm(W, dim=1, dtype=dtype).square()
        try:
            key = (W.data_ptr(), W._version, W.shape, W.stride(), W.dtype, W.device, dtype)
        except RuntimeError:  # an inference tensor has no version counter
            return torch.linalg.vector_norm(W, dim=1, dtype=dtype).square()
        if self._base_norm_cache is None or self._base_norm_cache[0] != key:
            self._base_norm_cache = (key, torch.linalg.vector_norm(W, dim=1, dtype=dtype).square())
        return self._base_norm_cache[1]

    def _cached_norms(self, W: torch.Tensor) -> torch.Tensor:
        """`_weight_norms`, kept between calls without gradient (generation) until `W`, `A` or `B` change (their
        version counters and storage) or the module changes mode; in eval mode only."""
        # only in eval mode: `train()` empties the cache, and sharded (FSDP) weights are gathered anew each call
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._weight_norms(W)
        try:
            key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (W, self.A, self.B))
        except RuntimeError:  # inference tensors have no version counter
            return self._weight_norms(W)
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, self._weight_norms(W))
        return self._norm_cache[1]

    def dora_scale(self, W: torch.Tensor) -> torch.Tensor:
        """`m / n - 1` per row of the slice (differentiable in `m` only), where `n` are `_weight_norms(W)`; computed
        as `(m - n) / n` so that it keeps its precision when `m` is close to `n`."""
        n = self._cached_norms(W)
        zero = n == 0  # an all-zero row (a padded vocabulary row of a head) stays zero, instead of 0/0
        return ((self.magnitude.to(n.dtype) - n) / n.masked_fill(zero, 1)).masked_fill(zero, 0)

    def factors(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`[C, P]` with `C Pᵀ = (alpha / r) B A x` for `AdaptedLinear`'s in-place slice update."""
        A, B = self._AB()
        return [F.linear(x, A.to(x.dtype)), (B * self.scaling).to(x.dtype)]

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
                                 *[p.to(x.dtype) for ad in ads for p in ad._AB()])

    def delta_weight(self) -> torch.Tensor:
        dtype = compute_dtype(self.A)
        A, B = self._AB()
        return (B.to(dtype) @ A.to(dtype)) * self.scaling

    def merged_rows(self, W: torch.Tensor) -> torch.Tensor:
        """This slice's rows of the merged weight, from its base rows `W` `(rows, in)` (in the compute dtype):
        `W + s B A`, and for DoRA those rows scaled to the norms `m`."""
        Wm = W + self.delta_weight().to(W.dtype)
        if self.magnitude is None:
            return Wm
        n = torch.linalg.vector_norm(Wm, dim=1)
        return Wm * (self.magnitude.to(Wm.dtype) / n.masked_fill(n == 0, 1)).unsqueeze(1)  # (0 rows stay 0)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}" + (", DoRA" if self.magnitude is not None else "")
                + ("" if self.init == "default" else f", init={self.init}"))


@torch.no_grad()
def base_factors(W: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A_0, B_0)` in `W`'s dtype and device, of the base weight `W` `(rows, in)` (PEFT's `pissa_init` and
    `olora_init`, written from the papers): PiSSA, `s B_0 A_0` = the top `r` singular components of `W`; OLoRA,
    `B_0 = Q_r`, `A_0 = R_r` of `W = Q R`. Computed in float32 (float64 stays), on a GPU when there is one and `W`
    is on the CPU (a full SVD of a 4096-square matrix takes seconds there, minutes on a CPU)."""
    dtype = compute_dtype(W)
    device = W.device
    if device.type == "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    M = W.detach().to(device=device, dtype=dtype)
    if init == "olora":
        Q, R = torch.linalg.qr(M)
        A0, B0 = R[:r], Q[:, :r]
    else:
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:  # pissa_niter_<k>: a random start of its own, so a resumed run (which recomputes it) gets the same
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(0)
                U, S, V = torch.svd_lowrank(M, q=r, niter=int(init.rsplit("_", 1)[1]))
            Vh = V.t()
        root = (S / scaling).sqrt()
        A0, B0 = root[:, None] * Vh, U * root[None, :]
    return A0.to(device=W.device, dtype=W.dtype).contiguous(), B0.to(device=W.device, dtype=W.dtype).contiguous()


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


class _DoRARescale(torch.autograd.Function):
    """`y += t (y - b)` in place (`t` = `m/n - 1` per output row, zero on rows without DoRA), keeping only the
    result, which the next operation keeps anyway: `y - b = (out - b) / (1 + t)` comes back from it for `t`'s
    gradient. One pass over the activations forward, two backward."""

    @staticmethod
    def forward(ctx, y, t, b):
        ctx.mark_dirty(y)
        if b is None:
            y.mul_(1 + t)
        else:
            y.addcmul_(y - b, t)
        ctx.save_for_backward(y, t, b)
        return y

    @staticmethod
    def backward(ctx, g):
        out, t, b = ctx.saved_tensors
        gy = g * (1 + t) if ctx.needs_input_grad[0] else None
        gt = None
        if ctx.needs_input_grad[1]:  # the sum over tokens of g (y - b) = g (out - b) / (1 + t)
            d = out.shape[-1]
            g2, o2 = g.reshape(-1, d), out.reshape(-1, d)
            s = (g2 * o2).sum(0, dtype=compute_dtype(t))
            if b is not None:
                s = s - b.to(s.dtype) * g2.sum(0, dtype=s.dtype)
            gt = (s / (1 + t.to(s.dtype))).to(t.dtype)
        return gy, gt, None


def dora_rescale(y: torch.Tensor, t: torch.Tensor, b: Optional[torch.Tensor], in_place: bool = True) -> torch.Tensor:
    """`y + t (y - b)`, in place where autograd allows it (`_DoRARescale`); `t` and `b` in `y`'s dtype. `in_place`
    False (`AdaptedLinear.in_place_outputs`: code after the layer may modify its output in place, which would change
    what `_DoRARescale` keeps) takes the out-of-place form when a backward may follow."""
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return y.addcmul_(y if b is None else y - b, t)
    if not in_place or torch.compiler.is_compiling() or y._base is not None or not y.requires_grad:  # out of place
        return y + t * (y if b is None else y - b)
    return _DoRARescale.apply(y, t, b)


@register_method("lora")
def build_lora(config: AdapterConfig, layer: str, in_features: int, out_features: int, device, dtype):
    return LoRAAdapter(in_features, out_features, config.r, config.alpha, device=device, dtype=dtype,
                       dora=config.dora, init=config.init)
