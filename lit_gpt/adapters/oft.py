"""OFT (Qiu et al., NeurIPS 2023, arXiv 2306.07280) in the input-centric form of OFTv2 (arXiv 2506.19847).

Each block is the Cayley transform of a skew-symmetric `S_i = (R_i - R_iᵀ) / 2`:
`H_i = (I + S_i)(I - S_i)^-1`, orthogonal with determinant +1. The `nb` small `k × k` blocks are built once per
forward (`torch.linalg.solve`, or the truncated Neumann series `(I - S)^-1 ≈ sum_{j<=K} S^j` of OFTv2) and applied
to the activations as one batched block matmul; the transformed weight is only formed by `merge_adapters`.

Options: ``coft`` rescales each `S_i` inside the forward so `‖S_i‖_F <= eps` (exact, and differentiable);
``block_share`` uses one `R` for every block; ``upper_triangle`` stores only the strict upper triangle of `R_i`
(row-major, the order of `torch.triu_indices(k, k, 1)`; the lower triangle of `R_i` is zero).

Mapping to PEFT's OFT (0.21): PEFT stores, per block, a vector `q` of the strict upper triangle of a skew matrix
`Q` (`Q = triu(q) - triu(q)ᵀ`) and multiplies the input rows by its rotation on the right. With exact Cayley that
is our `S = Q`, i.e. `R_upper = 2 q`; with `use_cayley_neumann` PEFT's series builds the transpose, i.e.
`S = -Q`, and its `num_cayley_neumann_terms = T` is our `neumann_terms = T - 2` (for `T >= 4`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lit_gpt import recompute
from lit_gpt.adapters import cpu_kernel, gpu_kernel
from lit_gpt.adapters.base import (
    BlockTransform,
    MultiplicativeAdapter,
    autocast_on,
    compute_dtype,
    num_blocks,
    register_method,
)
from lit_gpt.adapters.config import AdapterConfig


# The exact transform as `2 (I - S)^-1 - I` with a backward of two small products (`_ExactCayley`); False solves
# `(I - S) H = I + S` and lets autograd differentiate the solve (a second solve in backward)
# (`bench/ab_step.py --method oft --b lit_gpt.adapters.oft:CAYLEY_BY_INVERSE=False`)
CAYLEY_BY_INVERSE = True


class _ExactCayley(torch.autograd.Function):
    """`H = (I + S)(I - S)^-1` for a batch of skew-symmetric `S`, computed as `2 A^-1 - I` with `A = I - S` (since
    `I + S = 2I - A`). Its gradient needs no second solve: `dH = 2 A^-1 dS A^-1`, so `gS = 2 A^-T gH A^-T`, and
    `A^-1 = (H + I) / 2` is made from the kept output: `gS = (Hᵀ + I) gH (Hᵀ + I) / 2`. `I - S` is never singular
    (the eigenvalues of a skew-symmetric `S` are imaginary; every singular value of `I - S` is at least 1), so the
    inverse is well conditioned: by elimination without pivoting on the CPU kernel (`cpu_kernel.cayley`) and for
    small blocks on a GPU (`gpu_kernel.cayley`, a Triton program per block), elsewhere by `inv_ex`, which skips the
    error check that makes `torch.linalg.inv` wait for a GPU."""

    @staticmethod
    def forward(ctx, S: torch.Tensor) -> torch.Tensor:
        if cpu_kernel.runs(S.dtype, S.device):
            H = cpu_kernel.cayley(S.contiguous())
        elif gpu_kernel.cayley_usable(S):
            H = gpu_kernel.cayley(S)
        else:
            eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
            H = torch.linalg.inv_ex(eye - S)[0].mul_(2).sub_(eye)
        ctx.save_for_backward(H)
        return H

    @staticmethod
    def backward(ctx, gH: torch.Tensor) -> torch.Tensor:
        (H,) = ctx.saved_tensors
        M = H.transpose(-1, -2) + torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        return (M @ gH @ M).mul_(0.5)


class _NeumannCayley(torch.autograd.Function):
    """`H = (I + S) sum_{j <= K} S^j` for a batch of `S` on the GPU kernels (`gpu_kernel.neumann_forward`, one
    launch each way where PyTorch takes about a dozen batched products forward and twice that backward): backward
    recomputes the series from the kept `S` and takes `gS = gH Nᵀ + sum_{j=1..K} sum_{a+b=j-1} (S^a)ᵀ G (S^b)ᵀ`,
    `G = (I + S)ᵀ gH`, in the same program."""

    @staticmethod
    def forward(ctx, S: torch.Tensor, terms: int) -> torch.Tensor:
        S = S.contiguous()
        ctx.terms = terms
        ctx.save_for_backward(S)
        return gpu_kernel.neumann_forward(S, terms)

    @staticmethod
    def backward(ctx, gH: torch.Tensor):
        (S,) = ctx.saved_tensors
        return gpu_kernel.neumann_backward(S, gH.contiguous(), ctx.terms), None


def cayley(S: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """`(I + S)(I - S)^-1` for a batch of skew-symmetric `S`, exact or with `K = neumann_terms` series terms."""
    if neumann_terms <= 0 and CAYLEY_BY_INVERSE:
        return _ExactCayley.apply(S)
    if neumann_terms > 0 and gpu_kernel.neumann_usable(S):
        return _NeumannCayley.apply(S, neumann_terms)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    if neumann_terms <= 0:
        # (I + S) and (I - S)^-1 commute, so solving from the left gives the same product; solve_ex skips the
        # error check that makes torch.linalg.solve wait for the GPU on every call
        return torch.linalg.solve_ex(eye - S, eye + S)[0]
    series = eye + S
    power = S
    for _ in range(neumann_terms - 1):
        power = power @ S
        series = series + power
    return (eye + S) @ series


class OFTTransform(BlockTransform):
    """OFT blocks on one side; parameter ``R`` `(nb, k, k)` or ``R_upper`` `(nb, k(k-1)/2)` (`nb = 1` shared)."""

    def __init__(
        self,
        size: int,
        nb: int,
        block_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        neumann_terms: int = 0,
        upper_triangle: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(size, nb, block_dropout)
        self.coft, self.eps = coft, eps
        self.block_share = block_share
        self.neumann_terms = neumann_terms
        self.upper_triangle = upper_triangle
        n_params = 1 if block_share else nb
        if upper_triangle:
            self.R_upper = nn.Parameter(torch.empty(n_params, self.k * (self.k - 1) // 2, device=device, dtype=dtype))
        else:
            self.R = nn.Parameter(torch.empty(n_params, self.k, self.k, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.R_upper if self.upper_triangle else self.R)  # R = 0: H = I at init

    def skew(self) -> torch.Tensor:
        """`S = (R - Rᵀ) / 2` per stored block, COFT-projected, in float32 (float64 stays)."""
        if self.upper_triangle:
            p = self.R_upper
            R = torch.zeros(p.shape[0], self.k, self.k, dtype=compute_dtype(p), device=p.device)
            rows, cols = torch.triu_indices(self.k, self.k, 1, device=p.device)
            R[:, rows, cols] = p.to(R.dtype)
        else:
            R = self.R.to(compute_dtype(self.R))
        S = (R - R.transpose(-1, -2)) / 2
        if self.coft:
            # S * min(1, eps/‖S‖): clamping the norm (not the ratio) keeps the gradient finite at S = 0
            norm = torch.linalg.matrix_norm(S, keepdim=True)
            S = S * (self.eps / norm.clamp_min(self.eps))
        return S

    def blocks(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        H = cayley(self.skew(), self.neumann_terms)
        if self.block_share:
            H = H.expand(self.nb, self.k, self.k)
        if keep is not None:
            eye = torch.eye(self.k, dtype=H.dtype, device=H.device)
            H = torch.where(keep[:, None, None], H, eye)
        return H

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        H = self.blocks(self.keep_mask(z.device)).to(z.dtype)
        if not autocast_on(z) and not torch.compiler.is_compiling():  # (plain operations for the compiler)
            return _BlockMatmul.apply(z, H)
        return _block_matmul(z, H)

    @staticmethod
    def linear_groups(
        x: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], parts: list, outputs: list = ()
    ) -> Optional[torch.Tensor]:
        """`[W_s H_s x + b_s]_s` over the `(lo, hi, transform or None)` row spans of a layer as one autograd node
        (`_OFTLinear`) where the CPU kernel runs and `W`, `b` are frozen; None elsewhere (the caller then runs a
        block matmul and a GEMM per span)."""
        ts = [t for _, _, t in parts if t is not None]
        if (
            not ts
            or outputs
            or W.requires_grad
            or (bias is not None and bias.requires_grad)
            or autocast_on(x)
            or torch.compiler.is_compiling()
            or not _on_kernel(W, x, *([] if bias is None else [bias]))
        ):
            return None
        blocks = [t.blocks(t.keep_mask(x.device)).to(x.dtype) for t in ts]
        spans = tuple((lo, hi, t is not None) for lo, hi, t in parts)
        return _OFTLinear.apply(x, W, bias, spans, *blocks)

    def extra_repr(self) -> str:
        opts = [super().extra_repr()]
        if self.upper_triangle:
            opts.append("upper_triangle")
        if self.block_share:
            opts.append("block_share")
        if self.coft:
            opts.append(f"coft eps={self.eps}")
        if self.neumann_terms:
            opts.append(f"neumann_terms={self.neumann_terms}")
        return ", ".join(opts)


def _block_matmul(z: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """`H_i z_i` for every block `i` of every row of `z`; `H` is `(nb, k, k)`."""
    nb, k, _ = H.shape
    return torch.einsum("tik,ijk->tij", z.reshape(-1, nb, k), H).reshape(z.shape)


def _on_kernel(H: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the CPU kernel (`cpu_kernel.oft_forward` / `oft_backward`) takes these blocks and activations."""
    return cpu_kernel.runs(H.dtype, H.device) and all(t.device == H.device and t.dtype == H.dtype for t in tensors)


class _BlockMatmul(torch.autograd.Function):
    """`_block_matmul`, keeping for `H`'s gradient what rebuilds `z` where `lit_gpt.recompute` marked it (a norm's
    output, the MLP's product: tensors autograd keeps anyway) instead of `z` itself. float32/float64 on the CPU run
    the fused kernel (`cpu_kernel.oft_forward` / `oft_backward`: no permuted copies of `z` or `g`), which makes `z`
    from those tensors where it reads it; everything else runs `_block_matmul`'s einsum."""

    @staticmethod
    def forward(ctx, z, H):
        d = z.shape[-1]
        z2 = z.reshape(-1, d).contiguous()
        ctx.kernel = _on_kernel(H, z)
        if ctx.kernel:
            out = cpu_kernel.oft_forward(z2, H.transpose(1, 2).contiguous(), torch.empty_like(z2))
        else:
            out = _block_matmul(z2, H)
        ctx.save_for_backward(*recompute.keep_rows(ctx, z, z2, wanted=ctx.needs_input_grad[1]), H)
        return out.view(z.shape)

    @staticmethod
    def backward(ctx, g):
        want_z, want_H = ctx.needs_input_grad
        forms = cpu_kernel.KERNEL_FORMS if ctx.kernel else ()
        z2, recipe, parts, (H,) = recompute.rows_or_parts(ctx, ctx.saved_tensors, forms)
        nb, k, _ = H.shape
        d = nb * k
        if recipe is not None:
            z2 = cpu_kernel.kernel_rows(recipe, parts, d, g.dtype)
        g2 = cpu_kernel.as_rows(g, d)
        if ctx.kernel:
            gz = torch.empty(g2.shape, dtype=g.dtype) if want_z else None
            gH = cpu_kernel.oft_backward(g2, z2, H.contiguous(), gz, want_H)
        else:
            gr = g2.view(-1, nb, k)
            gz = torch.einsum("tij,ijk->tik", gr, H).reshape(g2.shape) if want_z else None
            gH = torch.einsum("tij,tik->ijk", gr, z2.reshape(-1, nb, k)) if want_H else None
        return (gz.view(g.shape) if want_z else None), gH


class _OFTLinear(torch.autograd.Function):
    """`y[:, lo:hi] = W_s H_s x + b_s` for the row spans of a layer (one span, or those of a fused QKV projection),
    `H_s = I` where a span has no OFT blocks, as one autograd node on the CPU kernel: each span's transformed input
    is a temporary in a reused workspace, its GEMM writes the span's columns of one output (no concatenation), and
    backward adds every span's input gradient into one buffer (the kernel adds `H_sᵀ (g_s W_s)` into it, the plain
    spans' GEMMs accumulate into it) instead of autograd summing a gradient per span. Only `x` (or what rebuilds
    it: `lit_gpt.recompute`, which the kernel reads where it would read `x`) is kept. `W` and `b` must be frozen;
    `blocks` are the adapted spans' `(nb, k, k)` blocks, in span order (saved as given: the solve that made them
    keeps them anyway)."""

    @staticmethod
    def forward(ctx, x, W, b, spans, *blocks):
        d = x.shape[-1]
        x2 = x.reshape(-1, d).contiguous()
        m = W.shape[0]
        out = torch.empty(*x.shape[:-1], m, dtype=x.dtype)  # returned whole: code after may modify it in place
        y = out.view(-1, m)
        at = 0
        for lo, hi, adapted in spans:
            xs = x2
            if adapted:  # each span's GEMM reads the workspace before the next span writes it
                H = blocks[at]
                at += 1
                ws = cpu_kernel.workspace(x2.shape, x2.dtype)
                xs = cpu_kernel.oft_forward(x2, H.transpose(1, 2).contiguous(), ws)
            Ws, ys = (W, y) if (lo, hi) == (0, m) else (W[lo:hi], y[:, lo:hi])
            if b is None:
                torch.mm(xs, Ws.t(), out=ys)
            else:
                torch.addmm(b if (lo, hi) == (0, m) else b[lo:hi], xs, Ws.t(), out=ys)
        ctx.spans = spans
        keep = recompute.keep_rows(ctx, x, x2, wanted=any(ctx.needs_input_grad[4:]))  # for the blocks' gradient
        ctx.save_for_backward(*keep, W, b, *blocks)
        return out

    @staticmethod
    def backward(ctx, g):
        x2, recipe, parts, (W, b, *blocks) = recompute.rows_or_parts(ctx, ctx.saved_tensors, cpu_kernel.KERNEL_FORMS)
        m, d = W.shape
        if recipe is not None:
            x2 = cpu_kernel.kernel_rows(recipe, parts, d, g.dtype)
        g2 = cpu_kernel.as_rows(g, m)
        want_x = ctx.needs_input_grad[0]
        gx, grads = None, []
        adapted = [(lo, hi) for lo, hi, a in ctx.spans if a]
        for (lo, hi), H, want_H in zip(adapted, blocks, ctx.needs_input_grad[4:]):
            if not (want_x or want_H):
                grads.append(None)
                continue
            gs, Ws = (g2, W) if (lo, hi) == (0, m) else (g2[:, lo:hi], W[lo:hi])
            # the first span's gradient becomes gx (transformed in place); later ones go through the workspace
            if want_x and gx is None:
                t = gs @ Ws
            else:
                t = torch.mm(gs, Ws, out=cpu_kernel.workspace((gs.shape[0], d), gs.dtype))
            target = (t if gx is None else gx) if want_x else None
            grads.append(cpu_kernel.oft_backward(t, x2, H.contiguous(), target, want_H, accumulate=gx is not None))
            gx = target
        if want_x:
            for lo, hi, a in ctx.spans:
                if not a:
                    gx.addmm_(g2[:, lo:hi], W[lo:hi])
            gx = gx.view(*g.shape[:-1], d)
        return (gx, None, None, None, *grads)


@register_method("oft")
def build_oft(config: AdapterConfig, layer: str, in_features: int, out_features: int, device, dtype):
    size, side = (out_features, "output") if config.flip_side else (in_features, "input")
    transform = OFTTransform(
        size,
        num_blocks(config, size, layer, side),
        block_dropout=config.block_dropout,
        coft=config.coft,
        eps=config.eps,
        block_share=config.block_share,
        neumann_terms=config.neumann_terms,
        upper_triangle=config.upper_triangle,
        device=device,
        dtype=dtype,
    )
    return MultiplicativeAdapter(output=transform) if config.flip_side else MultiplicativeAdapter(input=transform)
