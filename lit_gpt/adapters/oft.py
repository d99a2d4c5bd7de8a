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
from lit_gpt.adapters.base import BlockTransform, MultiplicativeAdapter, compute_dtype, num_blocks, register_method
from lit_gpt.adapters.config import AdapterConfig


def cayley(S: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """`(I + S)(I - S)^-1` for a batch of skew-symmetric `S`, exact or with `K = neumann_terms` series terms."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    if neumann_terms <= 0:
        # (I + S) and (I - S)^-1 commute, so solving from the left gives the same product. I - S is never singular
        # (S is skew-symmetric: its eigenvalues are imaginary), so solve_ex, which skips the error check that makes
        # torch.linalg.solve wait for the GPU on every call
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
        if not torch.is_autocast_enabled(z.device.type):
            return _BlockMatmul.apply(z, H)
        return _block_matmul(z, H)

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


class _BlockMatmul(torch.autograd.Function):
    """`_block_matmul`, keeping for `H`'s gradient what rebuilds `z` where `lit_gpt.recompute` marked it (a norm's
    output, the MLP's product: tensors autograd keeps anyway) instead of `z` itself."""

    @staticmethod
    def forward(ctx, z, H):
        keep, ctx.recipe = recompute.pack(z) if ctx.needs_input_grad[1] else ((), None)
        ctx.save_for_backward(*keep, H)
        return _block_matmul(z, H)

    @staticmethod
    def backward(ctx, g):
        *keep, H = ctx.saved_tensors
        nb, k, _ = H.shape
        gr = g.reshape(-1, nb, k)
        gz = torch.einsum("tij,ijk->tik", gr, H).reshape(g.shape) if ctx.needs_input_grad[0] else None
        gH = None
        if ctx.needs_input_grad[1]:
            z = recompute.unpack(keep, ctx.recipe)
            gH = torch.einsum("tij,tik->ijk", gr, z.reshape(-1, nb, k))
        return gz, gH


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
