"""The output side of the Householder family (`_OutputRowsUpdate` in lit_gpt/adapters/ether.py): every adapted
slice of a layer's GEMM output in one autograd node, in place inside a `lit_gpt.GPT` with the result kept for
backward (the transform's input rebuilt from it), out of place elsewhere. Checked against numerical derivatives
and docs/METHODS.md's dense blocks in float64, on the fused CPU kernel and on the eager path, and for what it keeps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import GPT, Config
from lit_gpt.adapters import AdaptedLinear, AdapterConfig, apply_adapters, cpu_kernel
from lit_gpt.adapters import ether
from test_cpu_kernel import dense_blocks as dense  # docs/METHODS.md's blocks as one dense matrix

COEFS = {"ether": (-2.0,), "etherplus": (-1.0, 1.0)}


@pytest.fixture(params=["kernel", "eager", "eager-chunked"])
def path(request, monkeypatch):
    if request.param == "kernel" and not cpu_kernel.available():
        pytest.skip("no C compiler: the kernel could not be built")
    if request.param != "kernel":
        monkeypatch.setattr(cpu_kernel, "_switched_off", 1)
    if request.param == "eager-chunked":
        monkeypatch.setattr(ether, "CPU_CHUNK_BYTES", 2 * 16 * 8)  # chunks of 1 or 2 of the 3 rows, by slice width
    return request.param


# spans as a fused QKV has them: every slice adapted, or one left out in the middle; and a whole layer
LAYOUTS = {"gap": [(0, 16), (24, 40)], "all-slices": [(0, 16), (16, 24), (24, 40)], "whole": [(0, 40)]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "out-of-place"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("method", list(COEFS))
def test_output_rows_update_is_the_formula_and_its_gradients(path, method, with_bias, in_place, layout):
    coefs = COEFS[method]
    torch.manual_seed(0)
    T, m, k = 3, 40, 4
    spans = tuple((lo, hi, coefs) for lo, hi in LAYOUTS[layout])
    y0 = torch.randn(1, T, m, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(m, dtype=torch.float64, requires_grad=True) if with_bias else None
    vecs = [F.normalize(torch.randn(len(coefs), (hi - lo) // k, k, dtype=torch.float64), dim=-1).requires_grad_()
            for lo, hi, _ in spans]

    def ours(y0, bias, *vecs):
        y = y0 * 1.0 if bias is None else y0 + bias  # a fresh GEMM-like output holding the bias, as F.linear's
        return ether._OutputRowsUpdate.apply(y, bias, in_place, spans, False, None, *vecs)

    def formula(y0, bias, *vecs):
        pieces, at = [], 0
        for (lo, hi, _), v in zip(spans, vecs):
            pieces += [y0[..., at:lo], y0[..., lo:hi] @ dense(v, coefs).T]
            at = hi
        out = torch.cat(pieces + [y0[..., at:]], dim=-1)
        return out if bias is None else out + bias

    inputs = (y0, bias, *vecs)
    torch.testing.assert_close(ours(*inputs), formula(*inputs), rtol=1e-12, atol=1e-12)
    wanted = [t for t in inputs if t is not None]
    r = torch.randn(1, T, m, dtype=torch.float64)
    got = torch.autograd.grad((ours(*inputs) * r).sum(), wanted)
    expected = torch.autograd.grad((formula(*inputs) * r).sum(), wanted)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    if layout == "gap" and path != "eager-chunked":  # numerical derivatives too, on the layout with every case
        assert torch.autograd.gradcheck(ours, inputs)


def test_in_place_keeps_the_output_and_spends_no_new_tensor():
    torch.manual_seed(0)
    y = torch.randn(6, 16, requires_grad=True) * 1.0
    ptr = y.data_ptr()
    vecs = F.normalize(torch.randn(2, 4, 4), dim=-1).requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = ether._OutputRowsUpdate.apply(y, None, True, ((0, 16, (-1.0, 1.0)),), False, None, vecs)
    assert out.data_ptr() == ptr  # updated where it lies
    assert any(t.data_ptr() == ptr for t in kept)  # and the updated tensor is what backward keeps
    out.sum().backward()
    assert vecs.grad is not None and torch.isfinite(vecs.grad).all()


class AddsInPlace(nn.Module):
    """Code that modifies a layer's output in place afterwards (`h += x`), as many hand-written models do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.fc(x)
        h += x
        return h.tanh()


@pytest.mark.parametrize("method", ["etherplusHH", "ether"])
def test_other_models_may_modify_the_output_in_place(method):
    """Outside a lit_gpt.GPT the output side stays out of place, so such code trains and its gradients are right."""
    torch.manual_seed(0)
    model = AddsInPlace().double()
    opts = {} if method == "etherplusHH" else {"flip_side": True}
    apply_adapters(model, AdapterConfig(method=method, nb=4, targets=["fc"], **opts))
    assert model.fc.in_place_outputs is False
    with torch.no_grad():
        for p in model.fc.adapters.parameters():
            p.normal_()
    x = torch.randn(3, 16, dtype=torch.float64)
    params = list(model.fc.adapters.parameters())
    got = torch.autograd.grad(model(x).sum(), params)
    ad = model.fc.adapters["full"]
    W, b = model.fc.base_weight(), model.fc.bias

    def H(t):
        return torch.eye(16, dtype=torch.float64) if t is None else dense(t.unit_vectors(), t.coefs)

    expected = torch.autograd.grad(((x @ (H(ad.output) @ W @ H(ad.input)).T + b + x).tanh()).sum(), params)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def tiny_gpt() -> GPT:
    config = Config(
        name="tiny-llama", block_size=32, vocab_size=64, padded_vocab_size=64, n_layer=2, n_head=4, n_query_groups=2,
        n_embd=32, intermediate_size=64, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", bias=False,
    )
    torch.manual_seed(0)
    return GPT(config)


def kept_bytes(model: nn.Module, idx: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx).sum()
    loss.backward()
    return sum(seen.values())


def test_in_a_gpt_the_output_side_keeps_only_what_the_next_operation_does_not():
    """ETHER+HH on every linear layer keeps, beyond one-sided ETHER+ (its input sides), only the outputs of the two
    layers whose output goes straight into a residual sum (attention's and the MLP's projection) plus the small
    per-token projections `c`: the fused QKV output and fc_1's / fc_2's are kept by attention and the MLP anyway.
    The out-of-place form (what other models get) keeps more: the check is not empty."""
    base = tiny_gpt()
    base.transformer.wte.weight.requires_grad_(True)  # something to differentiate in the floor
    B, T = 2, 16
    idx = torch.randint(0, 64, (B, T))
    cfg = base.config

    def build(method: str, in_place: bool) -> GPT:
        model = apply_adapters(copy.deepcopy(base), AdapterConfig(method=method, nb=4, targets=["all-linear"]))
        model.transformer.wte.weight.requires_grad_(True)
        for _, layer in model.named_modules():
            if isinstance(layer, AdaptedLinear):
                assert layer.in_place_outputs is True  # what apply_adapters chose for a lit_gpt.GPT
                layer.in_place_outputs = in_place
        return model

    plus = kept_bytes(build("etherplus", True), idx)
    hh = kept_bytes(build("etherplusHH", True), idx)
    hh_out_of_place = kept_bytes(build("etherplusHH", False), idx)
    f32, J, nb = 4, 2, 4
    residual_outputs = 2 * cfg.n_layer * B * T * cfg.n_embd * f32
    output_sides = cfg.n_layer * 3 + cfg.n_layer * 3  # q, k, v slices; proj, fc_1, fc_2, mlp.proj
    small = output_sides * (J * B * T * nb + J * nb * 64) * f32  # c per transform, and its unit vectors (k <= 64)
    assert hh - plus <= residual_outputs + small
    assert hh_out_of_place - hh >= cfg.n_layer * B * T * (cfg.n_query_groups * 2 * cfg.head_size) * f32


def test_activation_checkpointing_recomputes_the_in_place_output_side():
    """Checkpointed blocks run the in-place node again in backward: the gradients must not change."""
    model = apply_adapters(tiny_gpt(), AdapterConfig(method="etherplusHH", nb=4, targets=["all-linear"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.normal_()
    model.train()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        grads.append(torch.autograd.grad(model(idx).square().mean(), params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the kernel could not be built")
@pytest.mark.parametrize(
    ("dtype", "method", "flip", "block_dropout"),
    [
        (torch.float32, "etherplusHH", False, 0.0),
        (torch.float64, "etherplusHH", False, 0.0),
        (torch.float64, "etherplusHH", False, 0.5),
        (torch.float32, "ether", True, 0.0),
        (torch.float64, "etherplus", True, 0.5),
    ],
)
def test_on_the_cpu_kernel_a_projection_keeps_its_input_not_its_output(dtype, method, flip, block_dropout,
                                                                        monkeypatch):
    """On the CPU kernel, when asked (`cpu_output_side_keeps_input`), the output sides of attention's and the MLP's
    projections (layers that do not widen their input, whose outputs go straight into a residual sum) keep the
    layer's input, which autograd keeps anyway, instead of their output: one activation fewer per projection (an
    output-side-only ETHER: on the MLP's projection, whose input's factors the product keeps). The vector
    gradient's `sum_t d_t z_t` is then taken as `W (sum_t d_t x'_t)`: the gradients match the eager path's in
    float64 (with a bias, and with dropped blocks) and are as close to them in float32 as keeping the output
    gives."""
    torch.manual_seed(0)
    config = Config(name="t", block_size=16, vocab_size=64, padded_vocab_size=64, n_layer=2, n_head=4, n_embd=32,
                    n_query_groups=2, intermediate_size=64, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                    bias=True)
    cfg = AdapterConfig(method=method, nb=4, targets=["all-linear"], flip_side=flip, block_dropout=block_dropout)
    ref = apply_adapters(GPT(config).double(), cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 or not p.requires_grad else p.normal_()
    model = copy.deepcopy(ref).to(dtype)
    idx = torch.randint(0, 64, (2, 16))

    def grads(m):
        torch.manual_seed(1)  # the same dropped blocks in every run
        params = [p for p in m.parameters() if p.requires_grad]
        return torch.autograd.grad(m(idx).double().square().mean(), params)

    with cpu_kernel.disabled():
        expected = grads(ref)
    monkeypatch.setattr(ether.HouseholderTransform, "cpu_output_side_keeps_input", True)
    new, kept_new = grads(model), kept_bytes(model, idx)
    monkeypatch.setattr(ether.HouseholderTransform, "cpu_output_side_keeps_input", False)  # the default
    old, kept_old = grads(model), kept_bytes(model, idx)
    projections = 1 if flip else 2
    assert kept_old - kept_new == config.n_layer * projections * idx.numel() * config.n_embd * dtype.itemsize
    err = lambda a, e: ((a.double() - e).norm() / e.norm()).item()  # noqa: E731
    for a, b, e in zip(new, old, expected):
        if dtype == torch.float64:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        else:
            assert err(a, e) <= 1.5 * err(b, e) + 1e-6
