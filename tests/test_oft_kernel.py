"""OFT's fused CPU kernel (`cpu_kernel.oft_forward` / `oft_backward`) against torch's einsum in float64, and an OFT
layer as one autograd node (`_OFTLinear`) against the eager float64 path (a block matmul and a GEMM per span)."""

from __future__ import annotations

import pytest
import torch

from lit_gpt.adapters import cpu_kernel
from test_cpu_kernel import layer_node_against_float64, needs_kernel


def reference(z: torch.Tensor, H: torch.Tensor, g: torch.Tensor):
    """`H z`, `Hᵀ g` and `sum_t g_t z_tᵀ` per block, by einsum."""
    nb, k, _ = H.shape
    zr, gr = z.reshape(-1, nb, k), g.reshape(-1, nb, k)
    return (
        torch.einsum("ijk,tik->tij", H, zr).reshape(z.shape),
        torch.einsum("ijk,tij->tik", H, gr).reshape(g.shape),
        torch.einsum("tij,tik->ijk", gr, zr),
    )


@needs_kernel
@pytest.mark.parametrize("k", [16, 32, 64, 12, 1])  # 16/32/64: the vector code; others: plain loops
@pytest.mark.parametrize("n_threads", [1, 2])
def test_kernel_against_einsum_in_float64(k, n_threads):
    torch.manual_seed(k)
    old = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        T, nb = 37, 3  # an odd number of rows: the last two-row tile has one row; 37 > the 16-row chunk
        d = nb * k
        z, g = torch.randn(T, d, dtype=torch.float64), torch.randn(T, d, dtype=torch.float64)
        H = torch.randn(nb, k, k, dtype=torch.float64)
        ref_out, ref_gz, ref_gH = reference(z, H, g)
        tol = dict(rtol=1e-12, atol=1e-12)

        out = cpu_kernel.oft_forward(z, H.transpose(1, 2).contiguous(), torch.empty_like(z))
        torch.testing.assert_close(out, ref_out, **tol)

        gz = torch.empty_like(g)
        gH = cpu_kernel.oft_backward(g, z, H, gz, True)
        torch.testing.assert_close(gz, ref_gz, **tol)
        torch.testing.assert_close(gH, ref_gH, **tol)

        # in place on a column slice of a wider matrix (the value rows of a fused QKV gradient), no block gradient
        wide = torch.randn(T, d + 5, dtype=torch.float64)
        before = wide.clone()
        gs = wide[:, 2:2 + d]
        gs.copy_(g)
        assert cpu_kernel.oft_backward(gs, None, H, gs, False) is None
        torch.testing.assert_close(gs, ref_gz, **tol)
        assert torch.equal(wide[:, :2], before[:, :2]) and torch.equal(wide[:, 2 + d:], before[:, 2 + d:])

        # accumulate into what the buffer holds, with z made from its factors (the MLP's product)
        a, b = torch.randn(T, d, dtype=torch.float64), torch.randn(T, d, dtype=torch.float64)
        held = torch.randn(T, d, dtype=torch.float64)
        target = held.clone()
        gH = cpu_kernel.oft_backward(g, cpu_kernel.ProductRows(a, b), H, target, True, accumulate=True)
        torch.testing.assert_close(target, held + ref_gz, **tol)
        torch.testing.assert_close(gH, reference(a * b, H, g)[2], **tol)

        # z made as an RMSNorm makes its output: w * (x * r)
        x, r = torch.randn(T, d, dtype=torch.float64), torch.rand(T, dtype=torch.float64)
        w = torch.randn(d, dtype=torch.float64)
        gH = cpu_kernel.oft_backward(g, cpu_kernel.ScaledRows(x, r, w), H, None, True)
        torch.testing.assert_close(gH, reference(w * (x * r[:, None]), H, g)[2], **tol)
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_kernel_forms_give_bitwise_the_gradient_of_the_kept_input():
    """z made from its parts inside the kernel is bit for bit the z its producer made: the same block gradient."""
    torch.manual_seed(0)
    T, nb, k = 40, 4, 32
    x, r, w = torch.randn(T, nb * k), torch.rand(T), torch.randn(nb * k)
    g, H = torch.randn(T, nb * k), torch.randn(nb, k, k)
    kept = cpu_kernel.oft_backward(g, w * (x * r[:, None]), H, None, True)
    assert torch.equal(cpu_kernel.oft_backward(g, cpu_kernel.ScaledRows(x, r, w), H, None, True), kept)
    a, b = torch.randn(T, nb * k), torch.randn(T, nb * k)
    kept = cpu_kernel.oft_backward(g, a * b, H, None, True)
    assert torch.equal(cpu_kernel.oft_backward(g, cpu_kernel.ProductRows(a, b), H, None, True), kept)


@needs_kernel
@pytest.mark.parametrize(
    "options",
    [dict(), dict(neumann_terms=5), dict(block_share=True), dict(coft=True, eps=1e-2), dict(upper_triangle=True)],
    ids=["exact", "neumann", "block_share", "coft", "upper_triangle"],
)
@pytest.mark.parametrize(
    "targets,bias",
    [(["query", "value"], True), (["key"], False), (["query", "key", "value"], False), (["mlp"], True)],
)
@pytest.mark.parametrize("input_grad", [True, False])
def test_layer_as_one_node_against_float64(options, targets, bias, input_grad, monkeypatch):
    """On the CPU kernel an OFT layer's block matmuls and GEMMs run as one node (`_OFTLinear`: a GEMM per span into
    one output, the spans' input gradients added into one buffer, the transformed inputs in a reused workspace):
    the same output and gradients as the eager float64 path, with and without an input that requires grad."""
    from lit_gpt import GPT, Config
    from lit_gpt.adapters import AdapterConfig, apply_adapters
    from lit_gpt.adapters.oft import _OFTLinear

    torch.manual_seed(7)
    config = Config(name="t", block_size=8, vocab_size=32, padded_vocab_size=32, n_layer=1, n_head=4,
                    n_query_groups=2, n_embd=64, intermediate_size=96, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", bias=bias)
    model = apply_adapters(GPT(config).double(), AdapterConfig(method="oft", block_size=32, targets=targets,
                                                               **options))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.01 if options.get("neumann_terms") else 0.5)  # the series needs a small S
    layer = model.transformer.h[0].attn.qkv if targets != ["mlp"] else model.transformer.h[0].mlp.proj
    layer_node_against_float64(layer, _OFTLinear, input_grad, monkeypatch)


@needs_kernel
def test_frozen_blocks_keep_nothing_and_give_the_input_gradient(monkeypatch):
    """With the adapters frozen only the input gradient is taken, and the node keeps no activation for it."""
    from lit_gpt.adapters import AdapterConfig, apply_adapters

    torch.manual_seed(3)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 96))
    model = apply_adapters(lin, AdapterConfig(method="oft", block_size=16, targets=["0"]))
    for p in model.parameters():
        p.data.normal_(std=0.3)
        p.requires_grad_(False)
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    assert not any(t.shape == x.shape for t in saved)
    y.backward(torch.ones_like(y))
    with cpu_kernel.disabled():
        x2 = x.detach().clone().requires_grad_()
        model(x2).backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("path", ["kernel", "inv_ex", "solve"])
@pytest.mark.parametrize("k", [32, 16, 7, 1])
def test_exact_cayley_and_its_gradient_against_float64(path, k, monkeypatch):
    """The exact Cayley transform `(I + S)(I - S)^-1`, as `2 (I - S)^-1 - I` with the backward of two small products
    (`_ExactCayley`: elimination without pivoting on the CPU kernel, `inv_ex` elsewhere) or by a solve
    (`CAYLEY_BY_INVERSE = False`): the blocks against float64 `torch.linalg.inv`, orthogonal with determinant +1,
    and the gradient of a loss of them against autograd through the float64 formula. Large `S` (pivots up to about
    `k / 2`) and small."""
    from lit_gpt.adapters import oft

    if path == "kernel" and not cpu_kernel.available():
        pytest.skip("no C compiler: the kernel could not be built")
    if path == "inv_ex":
        monkeypatch.setattr(cpu_kernel, "_switched_off", 1)
    if path == "solve":
        monkeypatch.setattr(oft, "CAYLEY_BY_INVERSE", False)
    torch.manual_seed(9)
    eye = torch.eye(k, dtype=torch.float64)
    for scale in (1.0, 0.01):
        R = torch.randn(5, k, k, dtype=torch.float64) * scale
        G = torch.randn(5, k, k, dtype=torch.float64)  # the loss <G, H>
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
            Rd = R.to(dtype).requires_grad_()
            H = oft.cayley((Rd - Rd.transpose(1, 2)) / 2)
            (gR,) = torch.autograd.grad((H * G.to(dtype)).sum(), Rd)
            R64 = R.clone().requires_grad_()
            S = (R64 - R64.transpose(1, 2)) / 2
            expected = (eye + S) @ torch.linalg.inv(eye - S)
            (expected_gR,) = torch.autograd.grad((expected * G).sum(), R64)
            torch.testing.assert_close(H.double(), expected.detach(), rtol=tol, atol=tol)
            torch.testing.assert_close(gR.double(), expected_gR, rtol=tol, atol=tol * expected_gR.abs().max().item())
            if dtype == torch.float64:
                torch.testing.assert_close(H.transpose(1, 2) @ H, eye.expand(5, k, k), rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(torch.linalg.det(H), torch.ones(5, dtype=dtype), rtol=1e-10, atol=1e-10)


@needs_kernel
def test_exact_cayley_gradcheck_on_the_kernel():
    from lit_gpt.adapters import oft

    R = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda R: oft.cayley((R - R.transpose(1, 2)) / 2), (R,))
