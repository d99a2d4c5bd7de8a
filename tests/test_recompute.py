"""Adapters on a layer's input keep what rebuilds that input (`lit_gpt.recompute`) instead of the input itself.

A norm's output and the MLP's product are rebuilt in backward from tensors the norm and the product keep anyway:
the gradients must be bit for bit those of keeping the inputs, the memory kept must drop by exactly those
activations, and activation checkpointing (which re-runs the forward) must still give the same gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_gpt import GPT, Config, recompute
from lit_gpt.adapters import AdapterConfig, apply_adapters, cpu_kernel
from test_output_side import kept_bytes

METHODS = ["ether", "etherplus", "etherplusHH", "oft", "lora"]
LLAMA = dict(norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", parallel_residual=False)
NEOX = dict(norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", parallel_residual=True,
            shared_attention_norm=False, bias=True)
# GPT-2 (and Phi): tanh-approximated GELU, which the MLP's rebuild must recompute as such
GPT2 = dict(norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", parallel_residual=False, bias=True,
            gelu_approximate="tanh")
# Gemma: norms scaling by 1 + weight, a GELU-gated MLP, norms after the attention and the MLP (their outputs go to
# the residual, not to an adapted layer: nothing to rebuild there)
GEMMA = dict(norm_class_name="RMSNorm", norm_unit_offset=True, mlp_class_name="GemmaMLP", gelu_approximate="tanh",
             parallel_residual=False, bias=False, scale_embeddings=True, post_attention_norm=True, post_mlp_norm=True)


def gpt(arch: dict, dtype=torch.float32) -> GPT:
    config = Config(name="t", block_size=32, vocab_size=64, padded_vocab_size=64, n_layer=2, n_head=4,
                    n_query_groups=2, n_embd=32, intermediate_size=48, **arch)
    torch.manual_seed(0)
    return GPT(config).to(dtype)


def adapted(base: GPT, method: str, targets: tuple[str, ...] = ("all-linear",)) -> GPT:
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(method=method, nb=2, r=4, targets=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # away from the identity (LoRA's B = 0 would hide A's gradient)
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model.train()


def grads(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(model(idx).float().square().mean(), params))


@pytest.fixture(params=["kernel", "eager"])
def path(request):
    """The CPU kernel, or the eager update (what CPU bfloat16 and machines without a compiler run)."""
    if request.param == "eager":
        with cpu_kernel.disabled():
            yield request.param
    else:
        if not cpu_kernel.available():
            pytest.skip("no C compiler for the CPU kernel")
        yield request.param


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", [LLAMA, NEOX, GPT2, GEMMA], ids=["llama", "neox", "gpt2", "gemma"])
def test_rebuilt_inputs_give_the_same_gradients_and_keep_less(path, method, arch):
    base = gpt(arch)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model = adapted(base, method)
    with_recipes = grads(model, idx), kept_bytes(model, idx)
    with recompute.disabled():  # producers mark nothing: consumers keep their inputs
        without = grads(model, idx), kept_bytes(model, idx)

    for a, b in zip(with_recipes[0], without[0]):
        assert torch.equal(a, b)  # the rebuilt inputs are bit for bit the forward's
    cfg, T = base.config, idx.numel()
    # every block's MLP product (GELU's output in GPT-NeoX) and its norms are rebuilt, except a norm of block 0's
    # input (the frozen embedding's output), which does not require grad: that norm keeps nothing, so rebuilding
    # would keep more than the output, and it does not mark it. Llama's second norm reads the residual after
    # attention; GPT-NeoX's (parallel residual) reads the block input too.
    norms = 2 * cfg.n_layer - (2 if cfg.parallel_residual else 1)
    rebuilt = cfg.n_layer * T * cfg.intermediate_size + norms * T * cfg.n_embd
    assert without[1] - with_recipes[1] == rebuilt * 4


@pytest.mark.parametrize("method", ["etherplus", "oft", "lora"])
def test_activation_checkpointing_gives_the_same_gradients(method):
    model = adapted(gpt(LLAMA), method)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    plain = grads(model, idx)
    model.activation_checkpointing = True
    for a, b in zip(plain, grads(model, idx)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", [LLAMA, GEMMA], ids=["llama", "gemma"])
def test_bfloat16_gradients_unchanged(arch):
    """bf16 weights and activations (the eager path on the CPU): RMSNorm's float32 copy of its input and `1/rms`
    rebuild the bf16 output exactly (Gemma's `1 + weight` in float32 too)."""
    model = adapted(gpt(arch, torch.bfloat16), "etherplus")
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    a = grads(model, idx)
    with recompute.disabled():
        b = grads(model, idx)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_output_is_the_scale_form(dtype):
    """An RMSNorm whose weight has its input's dtype marks its output with recompute's "scale" form, which the
    kernels make themselves: `w * (x * r).to(out.dtype)` from its float32 input and `1/rms`, bit for bit. Parts
    whose weight is not of the activations' dtype are rebuilt for a kernel instead."""
    from lit_gpt.model import RMSNorm

    norm = RMSNorm(32).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
    y = norm(x)
    recipe, (xf, r, w) = getattr(y, recompute._ATTR)
    assert recipe.form == "scale" and xf.dtype == r.dtype == torch.float32 and w.dtype == dtype
    assert torch.equal(y, w * (xf * r).to(dtype)) and torch.equal(recipe.fn(xf, r, w), y)
    assert isinstance(cpu_kernel.kernel_rows(recipe, (xf, r, w), 32, dtype), cpu_kernel.ScaledRows)
    assert torch.equal(cpu_kernel.kernel_rows(recipe, (xf, r, w), 32, torch.float64), y.view(-1, 32))
    mixed = RMSNorm(32)  # float32 weight, bfloat16 input: no form (the product is promoted to float32)
    assert getattr(mixed(x.detach().bfloat16().requires_grad_()), recompute._ATTR)[0].form is None


class Project(torch.autograd.Function):
    """`x Aᵀ`, keeping for `A`'s gradient what rebuilds `x`: the pattern of every consumer."""

    @staticmethod
    def forward(ctx, x, A):
        keep, ctx.recipe = recompute.pack(x)
        ctx.save_for_backward(*keep, A)
        return x @ A.t()

    @staticmethod
    def backward(ctx, g):
        *keep, A = ctx.saved_tensors
        return g @ A, g.t() @ recompute.unpack(keep, ctx.recipe)


def test_consumers_of_one_input_share_one_rebuild():
    """fc_1 and fc_2 read the same norm output: backward rebuilds it once for both, and lets it go after the last."""
    calls = []

    def double(t):
        calls.append(1)
        return t * 2

    x = torch.randn(4, 8, requires_grad=True)
    y = recompute.mark(double(x), double, x)
    A1, A2 = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    c1, c2 = Project.apply(y, A1), Project.apply(y, A2)
    recipe = getattr(y, recompute._ATTR)[0]
    assert recipe.pending == 2 and len(calls) == 1
    (c1.sum() + c2.square().sum()).backward()
    assert len(calls) == 2 and recipe.pending == 0 and recipe.cache is None
    torch.testing.assert_close(A1.grad, torch.ones(4, 2).t() @ (2 * x).detach())
    torch.testing.assert_close(A2.grad, (2 * c2).detach().t() @ (2 * x).detach())
    torch.testing.assert_close(x.grad, 2 * (torch.ones(4, 2) @ A1 + (2 * c2).detach() @ A2).detach())


@pytest.mark.parametrize("method", ["etherplus", "lora"])
def test_head_and_chunked_loss_with_checkpointing(method, monkeypatch):
    """The head reads the final norm's output: with labels the loss runs through the chunked cross-entropy (chunks
    of 8 positions here, each re-run in backward), and with activation checkpointing every block re-runs too; the
    gradients equal those of keeping every input."""
    import functools

    import lit_gpt.model

    monkeypatch.setattr(lit_gpt.model, "chunked_cross_entropy",
                        functools.partial(lit_gpt.model.chunked_cross_entropy, chunk_size=8))
    model = adapted(gpt(LLAMA), method, ("all-linear", "head"))
    model.activation_checkpointing = True
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]
    rebuilt = torch.autograd.grad(model(idx, labels=idx), params)
    with recompute.disabled():
        kept = torch.autograd.grad(model(idx, labels=idx), params)
    for a, b in zip(rebuilt, kept):
        assert torch.equal(a, b)
