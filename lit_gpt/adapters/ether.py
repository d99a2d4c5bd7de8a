"""ETHER, ETHER+ and ETHER+HH (Bini et al., ICML 2024, arXiv 2405.20271), applied to activations.

Every block of this family is `H_i = I + sum_j s_j ŵ_ij ŵ_ijᵀ` with unit vectors `ŵ = w / ‖w‖`:

* ``ether``:     one vector ``u``, ``s = -2``: a Householder reflection `I - 2 ûûᵀ`;
* ``etherplus``: vectors ``u, v``, ``s = (-1, +1)``: `I - ûûᵀ + v̂v̂ᵀ`, the identity at init (``v = -u``);
* ``etherplusHH``: an ``etherplus`` transform on both sides of the weight.

So `H z` is `z_i + sum_j s_j (ŵ_ijᵀ z_i) ŵ_ij` per block: O(d) per token, no `k × k` block and no transformed
weight is ever formed during training (`blocks()` exists for merging only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt.adapters.base import BlockTransform, MultiplicativeAdapter, compute_dtype, num_blocks, register_method
from lit_gpt.adapters.config import AdapterConfig

NORM_EPS = 1e-12  # guards ‖w‖ of an all-zero vector; far below any norm a trained vector has


class _BlockRankUpdate(torch.autograd.Function):
    """`z_i + sum_j s_j (ŵ_jiᵀ z_i) ŵ_ji` for every block `i`, with a hand-written backward.

    The operator is symmetric, so the input gradient is the same update applied to the output gradient; the
    vector gradient is `s_j sum_t (c_tj g_t + d_tj z_t)` per block. Written out, forward and backward together
    stream the activations about eight times, about half of what autograd records for the same expression.
    """

    @staticmethod
    def forward(ctx, z, vecs, coefs):
        J, nb, k = vecs.shape
        zr = z.reshape(-1, nb, k)
        cs = [(zr * vecs[j]).sum(-1, keepdim=True) for j in range(J)]
        out = torch.addcmul(zr, cs[0], vecs[0], value=coefs[0])
        for j in range(1, J):
            out.addcmul_(cs[j], vecs[j], value=coefs[j])
        ctx.coefs = coefs
        ctx.save_for_backward(z, vecs, *cs)
        return out.view(z.shape)

    @staticmethod
    def backward(ctx, g):
        z, vecs, *cs = ctx.saved_tensors
        coefs = ctx.coefs
        J, nb, k = vecs.shape
        gr = g.reshape(-1, nb, k)
        ds = [(gr * vecs[j]).sum(-1, keepdim=True) for j in range(J)]
        gz = gvecs = None
        if ctx.needs_input_grad[0]:
            gz = torch.addcmul(gr, ds[0], vecs[0], value=coefs[0])
            for j in range(1, J):
                gz.addcmul_(ds[j], vecs[j], value=coefs[j])
            gz = gz.view(z.shape)
        if ctx.needs_input_grad[1]:
            zr = z.reshape(-1, nb, k)
            gvecs = torch.stack(
                [((cs[j] * gr).sum(0) + (ds[j] * zr).sum(0)).mul_(coefs[j]) for j in range(J)]
            )
        return gz, gvecs, None


class HouseholderTransform(BlockTransform):
    """Blocks `I + sum_j s_j ŵ_j ŵ_jᵀ`; parameters ``u`` (and ``v`` for ETHER+), each `(nb, k)`."""

    def __init__(
        self,
        size: int,
        nb: int,
        coefs: tuple[float, ...],
        block_dropout: float = 0.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(size, nb, block_dropout)
        self.coefs = tuple(float(c) for c in coefs)
        self.u = nn.Parameter(torch.empty(nb, self.k, device=device, dtype=dtype))
        if len(self.coefs) == 2:
            self.v = nn.Parameter(torch.empty(nb, self.k, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the reference code's init: Kaiming-uniform per block; ETHER+ starts at I with v = -u
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        if len(self.coefs) == 2:
            with torch.no_grad():
                self.v.copy_(-self.u)

    def unit_vectors(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`(J, nb, k)` unit vectors, normalised in float32 (float64 stays); dropped blocks get a zero vector."""
        params = [self.u] if len(self.coefs) == 1 else [self.u, self.v]
        vecs = torch.stack([F.normalize(p.to(compute_dtype(p)), dim=-1, eps=NORM_EPS) for p in params])
        if keep is not None:
            vecs = vecs * keep.to(vecs.dtype)[None, :, None]
        return vecs

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        vecs = self.unit_vectors(self.keep_mask(z.device))
        return _BlockRankUpdate.apply(z, vecs.to(z.dtype), self.coefs)

    def rank_update(self, x: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(C, P)` with `W H x = W x + C Pᵀ`: `C = [Û_jᵀ x]_j` is `(..., J*nb)`, `P = [s_j W Û_j]_j` is
        `(m, J*nb)`, where `Û_j` places block `i`'s unit vector in rows `i*k:(i+1)*k` of column `i`."""
        vecs = self.unit_vectors(self.keep_mask(x.device)).to(x.dtype)
        J, nb, k = vecs.shape
        xr = x.reshape(*x.shape[:-1], nb, k)
        C = torch.cat([(xr * vecs[j]).sum(-1) for j in range(J)], dim=-1)
        coefs = torch.tensor(self.coefs, dtype=x.dtype, device=x.device)
        P = torch.einsum("mik,jik->mji", W.reshape(W.shape[0], nb, k), vecs * coefs[:, None, None])
        return C, P.reshape(W.shape[0], J * nb)

    def blocks(self) -> torch.Tensor:
        vecs = self.unit_vectors()
        eye = torch.eye(self.k, dtype=vecs.dtype, device=vecs.device)
        H = eye.expand(self.nb, self.k, self.k).clone()
        for s, w in zip(self.coefs, vecs):
            H += s * w[:, :, None] * w[:, None, :]
        return H


ETHER_COEFS = (-2.0,)
ETHERPLUS_COEFS = (-1.0, 1.0)


@register_method("ether", "etherplus", "etherplusHH")
def build_householder(
    config: AdapterConfig, layer: str, in_features: int, out_features: int, device, dtype
) -> MultiplicativeAdapter:
    coefs = ETHER_COEFS if config.method == "ether" else ETHERPLUS_COEFS

    def side(size: int, which: str) -> HouseholderTransform:
        nb = num_blocks(config, size, layer, which)
        return HouseholderTransform(size, nb, coefs, config.block_dropout, device=device, dtype=dtype)

    if config.method == "etherplusHH":
        return MultiplicativeAdapter(input=side(in_features, "input"), output=side(out_features, "output"))
    if config.flip_side:
        return MultiplicativeAdapter(output=side(out_features, "output"))
    return MultiplicativeAdapter(input=side(in_features, "input"))
