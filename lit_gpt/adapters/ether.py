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

from lit_gpt.adapters import cpu_kernel
from lit_gpt.adapters.base import BlockTransform, MultiplicativeAdapter, compute_dtype, num_blocks, register_method
from lit_gpt.adapters.config import AdapterConfig

NORM_EPS = 1e-12  # guards ‖w‖ of an all-zero vector; far below any norm a trained vector has


# On the CPU the update streams token chunks of about this many bytes, so the temporaries of its several
# element-wise steps stay in cache instead of going to memory once per step (about 1.6x faster per update on a
# width-1024 layer, measured); on GPUs one kernel per step over all tokens is better.
CPU_CHUNK_BYTES = 1 << 20


def _chunks(z: torch.Tensor) -> int:
    if z.device.type != "cpu":
        return max(1, z.shape[0])
    return max(1, CPU_CHUNK_BYTES // max(1, z[0].numel() * z.element_size()))


class _BlockRankUpdate(torch.autograd.Function):
    """`z_i + sum_j s_j (ŵ_jiᵀ z_i) ŵ_ji` for every block `i`, with a hand-written backward.

    The operator is symmetric, so the input gradient is the same update applied to the output gradient; the
    vector gradient is `s_j sum_t (c_tj g_t + d_tj z_t)` per block, a `(1 x T) @ (T x k)` product batched over the
    blocks. Only `z` and the `J` projections `c` are kept for backward. float32/float64 on the CPU run the fused
    kernel of `cpu_kernel.py` (one pass over the activations each way) when it could be built; everything else runs
    the eager code below.
    """

    @staticmethod
    def forward(ctx, z, vecs, coefs):
        ctx.coefs = coefs
        if cpu_kernel.usable(vecs) and z.device.type == "cpu" and z.dtype == vecs.dtype:
            z = z.contiguous()
            out, cs = cpu_kernel.forward(z, vecs, coefs)
            ctx.kernel = True
            ctx.save_for_backward(z, vecs, cs)
            return out
        ctx.kernel = False
        J, nb, k = vecs.shape
        zr = z.reshape(-1, nb, k)
        out = torch.empty_like(zr)
        cs = torch.empty(J, zr.shape[0], nb, 1, dtype=z.dtype, device=z.device)
        step = _chunks(zr)
        tmp = torch.empty_like(zr[:step])  # reused: a fresh temporary per step costs page faults on the CPU
        for a in range(0, zr.shape[0], step):
            zc, oc = zr[a:a + step], out[a:a + step]
            t = tmp[: zc.shape[0]]
            for j in range(J):
                torch.sum(torch.mul(zc, vecs[j], out=t), -1, keepdim=True, out=cs[j, a:a + step])
            torch.addcmul(zc, cs[0, a:a + step], vecs[0], value=coefs[0], out=oc)
            for j in range(1, J):
                oc.addcmul_(cs[j, a:a + step], vecs[j], value=coefs[j])
        ctx.save_for_backward(z, vecs, cs)
        return out.view(z.shape)

    @staticmethod
    def backward(ctx, g):
        z, vecs, cs = ctx.saved_tensors
        coefs = ctx.coefs
        want_z, want_vecs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.kernel:
            gz, gvecs = cpu_kernel.backward(g.contiguous(), z, vecs, coefs, cs, want_z, want_vecs)
            return gz, gvecs, None
        J, nb, k = vecs.shape
        gr, zr = g.reshape(-1, nb, k), z.reshape(-1, nb, k)
        gz = torch.empty_like(gr) if want_z else None
        # float32 accumulation across chunks, whatever the activation dtype
        gvecs = torch.zeros(J, nb, 1, k, dtype=compute_dtype(vecs), device=vecs.device) if want_vecs else None
        step = _chunks(gr)
        tmp = torch.empty_like(gr[:step])
        ds = torch.empty(J, tmp.shape[0], nb, 1, dtype=g.dtype, device=g.device)
        for a in range(0, gr.shape[0], step):
            gc = gr[a:a + step]
            t, d = tmp[: gc.shape[0]], ds[:, : gc.shape[0]]
            for j in range(J):
                torch.sum(torch.mul(gc, vecs[j], out=t), -1, keepdim=True, out=d[j])
            if want_z:
                oc = gz[a:a + step]
                torch.addcmul(gc, d[0], vecs[0], value=coefs[0], out=oc)
                for j in range(1, J):
                    oc.addcmul_(d[j], vecs[j], value=coefs[j])
            if want_vecs:
                # per block i: sum_t c_ti g_ti + d_ti z_ti, as (1 x T) @ (T x k) products batched over the blocks
                gb, zb = gc.transpose(0, 1), zr[a:a + step].transpose(0, 1)
                for j in range(J):
                    part = torch.bmm(cs[j, a:a + step].permute(1, 2, 0), gb)
                    part.baddbmm_(d[j].permute(1, 2, 0), zb)
                    gvecs[j] += part
        if want_z:
            gz = gz.view(z.shape)
        if want_vecs:
            gvecs = gvecs.squeeze(2) * torch.tensor(coefs, dtype=gvecs.dtype, device=gvecs.device)[:, None, None]
            gvecs = gvecs.to(vecs.dtype)
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
        Wr = W.reshape(W.shape[0], nb, k)
        # multiply-and-sum streams W once per vector; einsum would route this through a strided bmm (6x slower)
        P = torch.cat([(Wr * (s * vecs[j])).sum(-1) for j, s in enumerate(self.coefs)], dim=-1)
        return C, P

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
