"""Soft-capped attention (Gemma 2) that keeps no score matrix for backward.

Gemma 2 squashes its attention scores as `cap * tanh(s / cap)` before the softmax, a step scaled-dot-product
attention has no place for. Written with plain tensor ops, autograd keeps the capped scores, the softmax output
and its low-precision copy, about 8 bytes per (query, key) pair per head and layer: for Gemma-2-2B at 2048 tokens
and a micro-batch of 4, over 20 GB across its 26 layers. `SoftcappedAttention` keeps the inputs, the output and one
float32 log-sum-exp per query instead, and recomputes each block of scores in backward (as flash attention does),
one block of queries at a time in both directions, so the score memory alive at once is bounded by `block_elements`.

The arithmetic is the eager form's: scores and products in the inputs' dtype, the softmax in float32, its output
rounded to the inputs' dtype before it weights the values; the forward output is bit for bit the eager one's.
"""

from __future__ import annotations

from typing import Optional

import torch

# at most this many score elements (batch x heads x queries x keys) exist at once in either direction: 2**24 float32
# scores are 64 MiB, enough for matrix products to run at full speed
BLOCK_ELEMENTS = 2**24


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """`cap * tanh(x / cap)`: about x for small x, never beyond ±cap (Gemma 2's attention and output logits)."""
    return torch.tanh(x / cap) * cap


def _rows(q: torch.Tensor, keys: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, q.size(0) * q.size(1) * keys))


def _capped_scores(q: torch.Tensor, k: torch.Tensor, scale: float, cap: float, mask: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(capped, masked scores; tanh of the scaled scores / cap) of one block of queries."""
    t = torch.tanh(torch.matmul(q, k.transpose(-2, -1)) * scale / cap)
    scores = t * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores, t


def _block_mask(mask: Optional[torch.Tensor], start: int, stop: int, queries: int, keys: int, device
                ) -> Optional[torch.Tensor]:
    """The rows [start, stop) of `mask` (broadcastable to (B, H, T, S)), or of the causal mask when it is None."""
    if mask is None:
        rows = torch.arange(start, stop, device=device)[:, None]
        return rows + (keys - queries) >= torch.arange(keys, device=device)[None, :]
    return mask[..., start:stop, :] if mask.size(-2) != 1 else mask


def _attend(q, k, v, mask, scale: float, cap: float, rows: int, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The eager form's output, `rows` queries at a time; each query's log-sum-exp into `lse` when given."""
    T, S = q.size(-2), k.size(-2)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for start in range(0, T, rows):
        stop = min(T, start + rows)
        scores, _ = _capped_scores(q[..., start:stop, :], k, scale, cap, _block_mask(mask, start, stop, T, S,
                                                                                      q.device))
        scores = scores.float()
        if lse is not None:
            lse[..., start:stop] = torch.logsumexp(scores, dim=-1)
        out[..., start:stop, :] = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)
    return out


class SoftcappedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, cap: float, block_elements: int):
        rows = _rows(q, k.size(-2), block_elements)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        out = _attend(q, k, v, mask, scale, cap, rows, lse)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.cap, ctx.rows = scale, cap, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        scale, cap, rows = ctx.scale, ctx.cap, ctx.rows
        T, S = q.size(-2), k.size(-2)
        grad_out = grad_out.contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)  # what the gradients are summed in
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        # softmax backward per row: dz = p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = grad_out . out
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        for start in range(0, T, rows):
            stop = min(T, start + rows)
            qb, gb = q[..., start:stop, :], grad_out[..., start:stop, :]
            scores, t = _capped_scores(qb, k, scale, cap, _block_mask(mask, start, stop, T, S, q.device))
            probs = torch.exp(scores.float() - lse[..., start:stop, None]).to(acc)
            dv += torch.matmul(probs.to(q.dtype).transpose(-2, -1), gb).to(acc)
            dp = torch.matmul(gb, v.transpose(-2, -1)).to(acc)
            dz = probs * (dp - delta[..., start:stop, :])
            ds = (dz * (1 - t.to(acc).square()) * scale).to(q.dtype)  # through cap * tanh(s * scale / cap)
            dq[..., start:stop, :] = torch.matmul(ds, k)
            dk += torch.matmul(ds.transpose(-2, -1), qb).to(acc)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         scale: float, cap: float, block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """Attention `(B, H, T, hs)` whose scaled scores are soft-capped before the mask and the softmax, as Gemma 2
    computes it. `k`, `v` may have fewer heads (grouped queries); `mask` (boolean, broadcastable to
    `(B, H, T, S)`) None means causal, the last query seeing every key."""
    if k.size(1) != q.size(1):  # grouped queries: each key/value head serves n_head / n_query_groups query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return SoftcappedAttention.apply(q, k, v, mask, scale, cap, block_elements)
    return _attend(q, k, v, mask, scale, cap, _rows(q, k.size(-2), block_elements))  # (nothing to keep)
