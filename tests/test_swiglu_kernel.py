"""The CPU kernel's SwiGLU node: `silu(H_a a) * (H_b b)` with fc_1's and fc_2's output-side transforms, the SiLU
and the product in one pass each way, against docs/METHODS.md's dense blocks and PyTorch's SiLU in float64, and inside a
`lit_gpt.GPT` against the unfused path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_gpt import GPT, Config
from lit_gpt.adapters import AdapterConfig, apply_adapters, cpu_kernel, ether
from lit_gpt.adapters.ether import HouseholderTransform

from test_cpu_kernel import COEFS, dense_blocks, threads

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the kernel could not be built")


def unit(J: int, nb: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return F.normalize(torch.randn(J, nb, k, dtype=torch.float64), dim=-1).to(dtype).contiguous()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "n,nb",
    # blocks of 86 (whole vectors and an overlapping last one), 16 and 32 (compiled as constants), 13 and 5
    # (rows that end in a partial vector; 5 is shorter than one), 18 (SmolLM2-135M at nb 32)
    [(172, 2), (48, 3), (64, 2), (13, 1), (10, 2), (576, 32)],
)
@pytest.mark.parametrize("sides", ["both", "a", "b", "none"])
@pytest.mark.parametrize("method", list(COEFS))
@pytest.mark.parametrize("n_threads", [1, 2])
def test_swiglu_kernel_is_the_formula(dtype, n, nb, sides, method, n_threads):
    torch.manual_seed(n + nb)
    coefs = COEFS[method]
    T, k = 19, n // nb
    a0, b0, g = (torch.randn(T, n, dtype=torch.float64) * 3, torch.randn(T, n, dtype=torch.float64),
                 torch.randn(T, n, dtype=torch.float64))
    va = unit(len(coefs), nb, k, dtype) if sides in ("both", "a") else None
    vb = unit(len(coefs), nb, k, dtype) if sides in ("both", "b") else None

    # the reference: dense H (docs/METHODS.md) and PyTorch's SiLU, in float64 with autograd
    ref = {}
    a64, b64 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    va64 = va.double().requires_grad_() if va is not None else None
    vb64 = vb.double().requires_grad_() if vb is not None else None
    ha = a64 @ dense_blocks(va64, coefs) if va is not None else a64  # H is symmetric: (H a_t)ᵀ = a_tᵀ H
    hb = b64 @ dense_blocks(vb64, coefs) if vb is not None else b64
    h64 = F.silu(ha) * hb
    h64.backward(g)

    a, b = a0.to(dtype), b0.to(dtype)
    with threads(n_threads):
        s, h, ca, cb = cpu_kernel.swiglu_forward(a, b, va, coefs if va is not None else None, vb,
                                                 coefs if vb is not None else None)
        ga, gb, gva, gvb = cpu_kernel.swiglu_backward(g.to(dtype), a, s, b, va, coefs, ca, vb, coefs, cb, True, True)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a.double(), ha.detach(), **tol)  # made H_a a in place
    torch.testing.assert_close(b.double(), hb.detach(), **tol)
    torch.testing.assert_close(s.double(), F.silu(ha).detach(), **tol)
    torch.testing.assert_close(h.double(), h64.detach(), **tol)
    torch.testing.assert_close(ga.double(), a64.grad, **tol)
    torch.testing.assert_close(gb.double(), b64.grad, **tol)
    assert (ca is None) == (va is None) and (cb is None) == (vb is None)
    assert (gva is None) == (va is None) and (gvb is None) == (vb is None)
    vtol = tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)  # sums over tokens
    if va is not None:
        torch.testing.assert_close(gva.double(), va64.grad, **vtol)
    if vb is not None:
        torch.testing.assert_close(gvb.double(), vb64.grad, **vtol)


@needs_kernel
def test_the_float32_silu_and_its_gradient_are_as_exact_as_pytorchs():
    """The kernel's own e^x (a polynomial; 0 below -87, infinity above 88) over the float32 range: SiLU and its
    derivative within PyTorch's own float32 error of the float64 values, PyTorch's values where e^x overflows or
    underflows, and NaN stays NaN."""
    x = torch.linspace(-120, 120, 200_003, dtype=torch.float32).reshape(1, -1)
    x = torch.cat([x, torch.tensor([[float("nan"), 0.0, -0.0, 1e-30, -1e-30]])], dim=1).contiguous()
    one, g = torch.ones_like(x), torch.ones_like(x)
    a = x.clone()
    s, h, _, _ = cpu_kernel.swiglu_forward(a, one.clone(), None, None, None, None)
    ga, gb, _, _ = cpu_kernel.swiglu_backward(g, a, s, one, None, None, None, None, None, None, False, False)
    for ours, expected in ((a, x), (h, s), (gb, s)):  # no transform: a stays, h = s * 1, b's gradient is s
        torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)
    assert s[0, -5].isnan() and ga[0, -5].isnan()

    x64 = x.double().requires_grad_()
    ref = F.silu(x64)
    (dref,) = torch.autograd.grad(ref.sum(), x64)
    ok = ~x.isnan()

    def rel(ours, theirs):
        return ((ours.double() - theirs).abs() / theirs.abs().clamp_min(1e-30))[ok & (theirs.abs() > 1e-30)].max()

    torch_s = F.silu(x)
    xt = x.clone().requires_grad_()
    (torch_d,) = torch.autograd.grad(F.silu(xt).sum(), xt)
    assert rel(s, ref.detach()) <= 1.5 * rel(torch_s, ref.detach()) + 1e-7
    assert rel(ga, dref) <= 1.5 * rel(torch_d, dref) + 1e-6

    # where e^x leaves the float32 range: the same values as PyTorch's SiLU and its gradient (to 1e-30)
    ends = torch.tensor([[-1e38, -200.0, -88.5, -87.5, 87.5, 88.5, 200.0, 1e38, float("inf"), float("-inf")]])
    a, ones = ends.clone(), torch.ones_like(ends)
    s, _, _, _ = cpu_kernel.swiglu_forward(a, ones.clone(), None, None, None, None)
    ga, _, _, _ = cpu_kernel.swiglu_backward(ones, a, s, ones, None, None, None, None, None, None, False, False)
    xt = ends.clone().requires_grad_()
    (torch_d,) = torch.autograd.grad(F.silu(xt).sum(), xt)
    torch.testing.assert_close(s, F.silu(ends), rtol=2e-7, atol=1e-30, equal_nan=True)
    torch.testing.assert_close(ga, torch_d, rtol=2e-6, atol=1e-30, equal_nan=True)


def llama(n_layer: int = 2) -> Config:
    return Config(block_size=16, vocab_size=64, padded_vocab_size=64, n_layer=n_layer, n_head=4, n_embd=32,
                  rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                  mlp_class_name="LLaMAMLP", intermediate_size=72)


def run_gpt(config, state, adapter_config, fuse: bool, train: bool, seed: int = 3):
    HouseholderTransform.fuse_swiglu = fuse
    try:
        model = GPT(config).double()
        model.load_state_dict(state)
        torch.manual_seed(1)  # the same adapter initialisation in both
        apply_adapters(model, adapter_config)
        with torch.no_grad():  # adapters away from their initial values
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        model.train(train)
        x = torch.randint(0, config.vocab_size, (2, 12))
        torch.manual_seed(seed)  # the same block-dropout draws in both
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            model.eval()
            inference = model(x)
        return logits.detach(), grads, inference
    finally:
        HouseholderTransform.fuse_swiglu = True


@needs_kernel
@pytest.mark.parametrize(
    "method,extra",
    [("etherplusHH", {}), ("etherplus", {"flip_side": True}), ("ether", {"flip_side": True}),
     ("etherplusHH", {"block_dropout": 0.5})],
    ids=["etherplusHH", "etherplus-output", "ether-output", "etherplusHH-block-dropout"],
)
def test_a_gpt_mlp_runs_the_fused_node_and_equals_the_unfused_path(method, extra, monkeypatch):
    """Inside a `lit_gpt.GPT` (Llama MLP) the output-side transforms of fc_1 and fc_2 run in the fused node, with
    the same logits, gradients and inference outputs as the layers' own passes and PyTorch's SiLU and product."""
    config = llama()
    torch.manual_seed(0)
    state = GPT(config).double().state_dict()
    adapter_config = AdapterConfig(method=method, targets=["all-linear"], nb=4, **extra)
    calls = []
    forward = ether._SwiGLUOutputs.forward
    monkeypatch.setattr(ether._SwiGLUOutputs, "forward",
                        staticmethod(lambda ctx, *args: calls.append(1) or forward(ctx, *args)))
    train = "block_dropout" in extra
    fused = run_gpt(config, state, adapter_config, fuse=True, train=train)
    assert len(calls) == 2 * config.n_layer  # training and inference, one node per layer each
    calls.clear()
    plain = run_gpt(config, state, adapter_config, fuse=False, train=train)
    assert not calls
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-12, atol=1e-12)
    assert fused[1].keys() == plain[1].keys()
    for name in fused[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-12, atol=1e-12)


@needs_kernel
def test_the_fused_node_keeps_what_the_unfused_path_keeps():
    """It keeps H_a a, silu(H_a a) and H_b b (what the SiLU and the product keep) and the projections; the MLP's
    proj rebuilds its input from silu(H_a a) and H_b b (`lit_gpt.recompute`), as without the fusion."""
    config = llama(n_layer=1)
    torch.manual_seed(0)
    state = GPT(config).state_dict()

    def saved(fuse: bool) -> int:
        HouseholderTransform.fuse_swiglu = fuse
        try:
            model = GPT(config)
            model.load_state_dict(state)
            apply_adapters(model, AdapterConfig(method="etherplusHH", targets=["all-linear"], nb=4))
            storages = {}

            def pack(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            x = torch.randint(0, config.vocab_size, (2, 12))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(x).sum().backward()
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            return sum(n for ptr, n in storages.items() if ptr not in params)
        finally:
            HouseholderTransform.fuse_swiglu = True

    assert saved(True) == saved(False)
