"""Gemma 2's soft-capped attention (`lit_gpt.softcap`) against the eager form written out here with plain tensor
ops (transformers' own is checked through whole models in test_gemma.py): the same output, the same gradients, in
blocks of queries or in one, while keeping for backward only q, k, v, the output and one number per query."""

from __future__ import annotations

import pytest
import torch

from lit_gpt.softcap import softcapped_attention

B, H, G, T, HS = 2, 4, 2, 37, 16
SCALE, CAP = 0.3, 2.0


def eager(q, k, v, mask, scale=SCALE, cap=CAP):
    """The textbook form: autograd keeps every score matrix."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(-2, -1)) * scale / cap) * cap
    if mask is None:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril(k.size(-2) - q.size(-2))
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def inputs(dtype=torch.float32, queries=T, keys=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, queries, HS, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, G, keys, HS, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, G, keys, HS, generator=g).to(dtype).requires_grad_()
    return q, k, v, torch.randn(B, H, queries, HS, generator=g).to(dtype)


def window(queries, keys, size=5):
    back = torch.arange(keys - queries, keys)[:, None] - torch.arange(keys)[None, :]
    return (back >= 0) & (back < size)


def padded(queries, keys):
    """A left-padded batch's (B, 1, T, S) mask: row 1's first 4 keys are padding, each query still sees itself."""
    m = window(queries, keys, size=keys).expand(B, 1, queries, keys).clone()
    m[1, :, :, :4] = False
    m[1, :, torch.arange(queries), torch.arange(keys - queries, keys)] = True
    return m


MASKS = {"causal": lambda t, s: None, "window": window, "padded": padded}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("block", [None, 7], ids=["one-block", "blocks-of-7-queries"])
def test_output_and_gradients_equal_the_eager_form(mask_kind, block):
    q, k, v, grad = inputs()
    mask = MASKS[mask_kind](T, T)
    expected = eager(q, k, v, mask)
    ours = softcapped_attention(q, k, v, mask, SCALE, CAP, **({} if block is None else
                                                               {"block_elements": B * H * T * block}))
    if block is None:
        assert torch.equal(ours, expected)  # the forward is the eager arithmetic, op for op
    else:
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * b.abs().max().item())


def test_decoding_queries_against_a_longer_cache():
    """Fewer queries than keys (a KV-cache step): causal means the last query sees every key."""
    q, k, v, grad = inputs(queries=3)
    for mask in (None, window(3, T), padded(3, T)):
        expected = eager(q, k, v, mask)
        torch.testing.assert_close(softcapped_attention(q, k, v, mask, SCALE, CAP, block_elements=B * H * T),
                                   expected, rtol=0, atol=1e-6)


def test_bfloat16_gradients_are_as_accurate_as_the_eager_forms():
    """Against float64 truth, bf16 gradients within a tenth of the eager bf16 form's own error."""
    q, k, v, grad = inputs(torch.float64)
    truth = torch.autograd.grad(eager(q, k, v, None), (q, k, v), grad)

    def error(fn):
        ins = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        got = torch.autograd.grad(fn(*ins, None), ins, grad.to(torch.bfloat16))
        return max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, truth))

    ours = error(lambda q, k, v, m: softcapped_attention(q, k, v, m, SCALE, CAP, block_elements=B * H * T * 7))
    assert ours < 1.1 * error(eager) and ours < 0.02


def kept(fn, *args) -> int:
    """Bytes autograd keeps for backward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    out.sum().backward()
    return sum(seen.values())


def test_keeps_no_score_matrix_for_backward():
    """Eager keeps several (T, T) matrices per head; this keeps q, k and v (heads expanded for grouped queries), the
    output and one float32 log-sum-exp per query: nothing that grows with T * T."""
    n = 256
    q, k, v, _ = inputs(queries=n, keys=n)
    ours = kept(lambda *a: softcapped_attention(*a, None, SCALE, CAP), q, k, v)
    assert ours == 4 * (B * H * n * HS * 4) + B * H * n * 4  # q, expanded k and v, the output; the log-sum-exp
    assert kept(lambda *a: eager(*a, None), q, k, v) > 8 * B * H * n * n


@pytest.mark.parametrize("block", [None, 7], ids=["one-block", "blocks-of-7-queries"])
def test_without_gradients_the_output_is_the_same(block):
    """Inference (no_grad, or inputs that need no gradient) takes the forward alone, with the same result."""
    q, k, v, _ = inputs()
    kw = {} if block is None else {"block_elements": B * H * T * block}
    mask = window(T, T)
    with_graph = softcapped_attention(q, k, v, mask, SCALE, CAP, **kw)
    with torch.no_grad():
        plain = softcapped_attention(q, k, v, mask, SCALE, CAP, **kw)
    assert plain.grad_fn is None and torch.equal(plain, with_graph)
    if block is None:
        assert torch.equal(plain, eager(q, k, v, mask))
