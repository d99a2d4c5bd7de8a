"""The adapter test matrix: every method × side × target set, checked against docs/METHODS.md's formulas written out
again here in float64 (not against our own code), plus the PEFT-style behaviour checks (unchanged at init,
merged == adapted, save → load round trip, only adapter tensors train, disabled == base, block dropout, GQA,
bf16) and the dry-run parameter counts of docs/METHODS.md's table. HF transformers / PEFT references live in
`test_adapters_hf.py`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from lit_gpt import GPT, Config
from lit_gpt.adapters import (
    AdaptedLinear,
    AdapterConfig,
    HouseholderTransform,
    LoRAAdapter,
    OFTTransform,
    adapted_layers,
    adapter_state_dict,
    apply_adapters,
    cayley,
    load_adapters,
    merge_adapters,
    plan_report,
    read_adapter_config,
    save_adapters,
    set_adapters_enabled,
)

# ---------------------------------------------------------------------------------------------------------------
# docs/METHODS.md, written out independently in float64
# ---------------------------------------------------------------------------------------------------------------


def ref_unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True)


def ref_ether_block(u: torch.Tensor) -> torch.Tensor:
    """`I - 2 û ûᵀ` for one block vector."""
    u = ref_unit(u.double())
    return torch.eye(u.numel(), dtype=torch.float64) - 2 * torch.outer(u, u)


def ref_etherplus_block(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`I - û ûᵀ + v̂ v̂ᵀ`."""
    u, v = ref_unit(u.double()), ref_unit(v.double())
    return torch.eye(u.numel(), dtype=torch.float64) - torch.outer(u, u) + torch.outer(v, v)


def ref_R_blocks(t: OFTTransform) -> torch.Tensor:
    """The `R_i` of an OFT side from its stored parameter (strict upper triangle stored row-major, lower zero).

    The reference functions keep the autograd graph, so gradients can be checked through them too."""
    if t.upper_triangle:
        vec = t.R_upper.double()
        k = t.k
        R = torch.zeros(vec.shape[0], k, k, dtype=torch.float64)
        pos = 0
        for i in range(k):
            for j in range(i + 1, k):
                R[:, i, j] = vec[:, pos]
                pos += 1
        return R
    return t.R.double()


def ref_oft_block(R: torch.Tensor, neumann_terms: int = 0, coft_eps: float | None = None) -> torch.Tensor:
    """Cayley `(I + S)(I - S)^-1`, `S = (R - Rᵀ)/2`, COFT-rescaled to ‖S‖_F <= eps, or the Neumann form
    `(I + S) sum_{j=0..K} S^j`."""
    S = (R - R.T) / 2
    if coft_eps is not None and torch.linalg.norm(S) > coft_eps:
        S = S * coft_eps / torch.linalg.norm(S)
    eye = torch.eye(R.shape[0], dtype=torch.float64)
    if neumann_terms:
        return (eye + S) @ sum(torch.linalg.matrix_power(S, j) for j in range(neumann_terms + 1))
    return (eye + S) @ torch.linalg.inv(eye - S)


def ref_blocks(t) -> list[torch.Tensor]:
    if isinstance(t, HouseholderTransform):
        if hasattr(t, "v"):
            return [ref_etherplus_block(u, v) for u, v in zip(t.u, t.v)]
        return [ref_ether_block(u) for u in t.u]
    assert isinstance(t, OFTTransform)
    Rs = ref_R_blocks(t)
    if t.block_share:
        Rs = Rs.expand(t.nb, t.k, t.k)
    return [ref_oft_block(R, t.neumann_terms, t.eps if t.coft else None) for R in Rs]


def ref_H(t, size: int) -> torch.Tensor:
    """The dense block-diagonal operator of one side (the identity when the side has no transform)."""
    if t is None:
        return torch.eye(size, dtype=torch.float64)
    return torch.block_diag(*ref_blocks(t))


def ref_slice_output(ad, W: torch.Tensor, b, x: torch.Tensor) -> torch.Tensor:
    """`H_out W H_in x + b` (multiplicative) or `W x + b + (alpha/r) B A x` (LoRA), in float64."""
    W, x = W.double(), x.double()
    b = 0 if b is None else b.double()
    if isinstance(ad, LoRAAdapter):
        return x @ W.T + b + ad.alpha / ad.r * x @ ad.A.double().T @ ad.B.double().T
    W_eff = ref_H(ad.output, W.shape[0]) @ W @ ref_H(ad.input, W.shape[1])
    return x @ W_eff.T + b


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which on a loaded machine
    (several test processes on two cores) costs far more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
CASES = [
    pytest.param("ether", {}, id="ether-input"),
    pytest.param("ether", {"flip_side": True}, id="ether-output"),
    pytest.param("etherplus", {}, id="etherplus-input"),
    pytest.param("etherplus", {"flip_side": True}, id="etherplus-output"),
    pytest.param("etherplusHH", {}, id="etherplusHH-both"),
    pytest.param("oft", {}, id="oft-input"),
    pytest.param("oft", {"flip_side": True}, id="oft-output"),
    pytest.param("oft", {"upper_triangle": True}, id="oft-upper"),
    pytest.param("oft", {"neumann_terms": 3}, id="oft-neumann"),
    pytest.param("oft", {"block_share": True}, id="oft-share"),
    pytest.param("oft", {"coft": True, "eps": 0.05}, id="oft-coft"),
    pytest.param("lora", {"r": 3, "alpha": 6.0}, id="lora"),
]


def make_config(method: str, opts: dict, targets, nb: int = 4) -> AdapterConfig:
    kw = dict(opts)
    if method != "lora":
        kw.setdefault("nb", nb)
    return AdapterConfig(method=method, targets=list(targets), **kw)


def tiny_config(**overrides) -> Config:
    """Llama-shaped with grouped queries (4 heads, 2 groups) and a QKV bias so the bias paths are exercised."""
    kw = dict(
        name="tiny-llama", block_size=32, vocab_size=64, padded_vocab_size=64, n_layer=2, n_head=4,
        n_query_groups=2, n_embd=32, intermediate_size=48, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
        bias=False, attn_bias=True, norm_eps=1e-5,
    )
    kw.update(overrides)
    return Config(**kw)


@pytest.fixture(scope="module")
def base_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config())
    with torch.no_grad():  # non-zero biases, so "bias untouched" is checked
        for layer in model.transformer.h:
            layer.attn.qkv.bias.normal_(0, 0.5)
    return model.eval()


def randomize_adapters(model: nn.Module, scale: float = 1.0, seed: int = 1) -> None:
    """Move every adapter away from its initial value (OFT R = 0 and LoRA B = 0 would test nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                std = {"R": 0.3, "R_upper": 0.3, "B": 0.3}.get(name.rsplit(".", 1)[-1], 1.0) * scale
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)


class Conv1D(nn.Module):
    """GPT-2's layout (weight `(in, out)`, `y = x W + b`); only its class name identifies it to the adapters."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.2)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def as_out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


# ---------------------------------------------------------------------------------------------------------------
# the formulas themselves: the reference blocks have the properties docs/METHODS.md states
# ---------------------------------------------------------------------------------------------------------------
def test_reference_blocks_have_the_stated_properties():
    torch.manual_seed(0)
    eye = torch.eye(8, dtype=torch.float64)
    H = ref_ether_block(torch.randn(8))
    torch.testing.assert_close(H, H.T)
    torch.testing.assert_close(H @ H.T, eye)
    assert torch.linalg.det(H).item() == pytest.approx(-1.0)
    u = torch.randn(8)
    torch.testing.assert_close(ref_etherplus_block(u, -u), eye)  # ETHER+ starts at I
    Q = ref_oft_block(torch.randn(8, 8, dtype=torch.float64))
    torch.testing.assert_close(Q @ Q.T, eye)
    assert torch.linalg.det(Q).item() == pytest.approx(1.0)


@pytest.mark.parametrize("method,opts", [c for c in CASES if c.values[0] != "lora"])
def test_block_properties_of_our_transforms(method, opts):
    """Our `blocks()` (used by merge) equal the reference blocks, and ETHER's are reflections, OFT's rotations."""
    holder = Holder(nn.Linear(16, 16, dtype=torch.float64))
    apply_adapters(holder, make_config(method, opts, ["proj"]))
    randomize_adapters(holder)
    ad = holder.proj.adapters["full"]
    for t in (ad.input, ad.output):
        if t is None:
            continue
        ours = t.blocks()
        ref = torch.stack(ref_blocks(t))
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        eye = torch.eye(t.k, dtype=torch.float64).expand_as(ref)
        if method == "ether":
            torch.testing.assert_close(ref, ref.transpose(1, 2))
            torch.testing.assert_close(ref @ ref.transpose(1, 2), eye)
            torch.testing.assert_close(torch.linalg.det(ref), -torch.ones(t.nb, dtype=torch.float64))
        if method == "oft" and not opts.get("neumann_terms"):
            torch.testing.assert_close(ref @ ref.transpose(1, 2), eye)
            torch.testing.assert_close(torch.linalg.det(ref), torch.ones(t.nb, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# one layer: nn.Linear and GPT-2 Conv1D, every method and side
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method,opts", CASES)
def test_layer_computes_the_formula_and_merges_to_it(method, opts, kind):
    torch.manual_seed(0)
    n, m = 16, 24
    layer = nn.Linear(n, m).double() if kind == "linear" else Conv1D(m, n).double()
    with torch.no_grad():
        layer.bias.normal_()
    holder = Holder(layer)
    W, b = as_out_in(layer).detach().clone(), layer.bias.detach().clone()
    apply_adapters(holder, make_config(method, opts, ["proj"]))
    randomize_adapters(holder)
    assert isinstance(holder.proj, AdaptedLinear)
    ad = holder.proj.adapters["full"]
    x = torch.randn(2, 5, n, dtype=torch.float64)
    expected = ref_slice_output(ad, W, b, x)
    torch.testing.assert_close(holder(x), expected, rtol=1e-10, atol=1e-10)

    W_expected = expected_weight(ad, W)
    merge_adapters(holder)
    assert type(holder.proj) is type(layer) and not any(True for _ in adapted_layers(holder))
    torch.testing.assert_close(as_out_in(holder.proj), W_expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(holder.proj.bias, b, rtol=0, atol=0)  # the bias is never transformed
    torch.testing.assert_close(holder(x), expected, rtol=1e-10, atol=1e-10)


def expected_weight(ad, W: torch.Tensor) -> torch.Tensor:
    if isinstance(ad, LoRAAdapter):
        return W + ad.alpha / ad.r * ad.B.detach().double() @ ad.A.detach().double()
    return ref_H(ad.output, W.shape[0]) @ W @ ref_H(ad.input, W.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# gradients: our hand-written backward passes against autograd through the formulas
# ---------------------------------------------------------------------------------------------------------------
GRADIENT_CASES = [pytest.param(*c.values, False, id=c.id) for c in CASES] + [
    pytest.param(*c.values, True, id=c.id + "-low-rank") for c in CASES if c.values[0].startswith("ether")
]


@pytest.mark.parametrize("eager", [False, True], ids=["kernel", "eager"])
@pytest.mark.parametrize("method,opts,low_rank", GRADIENT_CASES)
def test_gradients_match_autograd_through_the_formula(monkeypatch, method, opts, low_rank, eager):
    """`eager` switches the Householder family from the fused CPU kernel (when it could be built) to eager ops."""
    from lit_gpt.adapters import cpu_kernel

    if eager:
        monkeypatch.setattr(cpu_kernel, "_switched_off", 1)
    monkeypatch.setattr(AdaptedLinear, "fused_low_rank", low_rank)
    torch.manual_seed(0)
    model = GPT(tiny_config()).double()
    apply_adapters(model, make_config(method, opts, ["query", "value", "projection"]))
    randomize_adapters(model)
    for name in ("attn.qkv", "attn.proj"):
        layer = model.transformer.h[0].get_submodule(name)
        x = torch.randn(2, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
        r = torch.randn(2, 5, layer.out_features, dtype=torch.float64)
        params = [x] + list(layer.adapters.parameters())
        ours = torch.autograd.grad((layer(x) * r).sum(), params)
        W, b = layer.base_weight(), layer.bias
        ref = torch.cat(
            [
                ref_slice_output(layer.adapters[s], W[lo:hi], None if b is None else b[lo:hi], x)
                if s in layer.adapters else x @ W[lo:hi].T + (0 if b is None else b[lo:hi])
                for s, lo, hi in layer.slices
            ],
            dim=-1,
        )
        theirs = torch.autograd.grad((ref * r).sum(), params)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# the fused QKV of a GQA model: per-slice adapters, un-targeted slices untouched
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["query", "value"], ["key"], ["query", "key", "value"], ["key", "value"]])
@pytest.mark.parametrize("method,opts", CASES)
def test_fused_qkv_slices_follow_the_formula(method, opts, targets):
    check_fused_qkv(method, opts, targets)


@pytest.mark.parametrize("targets", [["query", "value"], ["key"]])
@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplusHH"])
def test_fused_qkv_low_rank_form(monkeypatch, method, targets):
    """The opt-in form: one fused GEMM plus `W_s H x = W_s x + sum_j s_j (W_s Û_j)(Û_jᵀ x)`."""
    monkeypatch.setattr(AdaptedLinear, "fused_low_rank", True)
    check_fused_qkv(method, {}, targets, exact_untargeted=True)


def check_fused_qkv(method, opts, targets, exact_untargeted=False):
    torch.manual_seed(0)
    model = GPT(tiny_config()).double().eval()
    with torch.no_grad():
        model.transformer.h[0].attn.qkv.bias.normal_()
    qkv = model.transformer.h[0].attn.qkv
    W, b = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    apply_adapters(model, make_config(method, opts, targets))
    randomize_adapters(model)
    layer = model.transformer.h[0].attn.qkv
    assert isinstance(layer, AdaptedLinear) and sorted(layer.adapters) == sorted(targets)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    y = layer(x)
    base = F.linear(x, W, b)
    q, kv = 4 * 8, 2 * 8  # GQA: 4 query heads, 2 key/value groups of head size 8
    for name, lo, hi in (("query", 0, q), ("key", q, q + kv), ("value", q + kv, q + 2 * kv)):
        if name in targets:
            expected = ref_slice_output(layer.adapters[name], W[lo:hi], b[lo:hi], x)
            torch.testing.assert_close(y[..., lo:hi], expected, rtol=1e-10, atol=1e-10)
        elif method != "lora" and not opts.get("flip_side") and not exact_untargeted:
            # per-slice input transforms: this slice is its own GEMM `W_s x + b_s` over the same rows, the base
            # formula; BLAS may sum a row-subset GEMM in another order, hence a rounding-level tolerance
            torch.testing.assert_close(y[..., lo:hi], base[..., lo:hi], rtol=0, atol=1e-12)
        else:  # LoRA, output-side adapters and the low-rank form keep one fused GEMM: bit for bit the base rows
            assert torch.equal(y[..., lo:hi], base[..., lo:hi]), f"un-targeted {name} rows changed"


def test_fused_qkv_block_dropout_uses_one_mask_of_whole_blocks():
    """With 2 blocks the training output of a targeted slice must be one of the 4 formula outputs where each block
    is either the reflection or I."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).double()
    apply_adapters(model, AdapterConfig(method="ether", nb=2, targets=["query", "value"], block_dropout=0.5))
    layer = model.transformer.h[0].attn.qkv
    W, b = layer.weight.detach(), layer.bias.detach()
    t = layer.adapters["query"].input
    blocks = ref_blocks(t)
    eye = torch.eye(t.k, dtype=torch.float64)
    candidates = [
        torch.block_diag(blocks[0] if k0 else eye, blocks[1] if k1 else eye) for k0 in (0, 1) for k1 in (0, 1)
    ]
    x = torch.randn(3, 32, dtype=torch.float64)
    seen = set()
    layer.train()
    for _ in range(40):
        y = layer(x)[:, :32]
        hits = [i for i, H in enumerate(candidates) if torch.allclose(y, x @ (W[:32] @ H).T + b[:32], atol=1e-10)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == {0, 1, 2, 3}  # every mask occurs: the draw is per forward
    layer.eval()
    torch.testing.assert_close(layer(x)[:, :32], x @ (W[:32] @ candidates[3]).T + b[:32])


# ---------------------------------------------------------------------------------------------------------------
# block dropout: exact structure, on one square layer with W = I so the output rows ARE the effective operator
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,opts",
    [("ether", {}), ("etherplus", {"flip_side": True}), ("oft", {}), ("oft", {"flip_side": True, "block_share": True})],
)
@pytest.mark.parametrize("p", [0.5, 0.15])  # (at 0.5 dropping and keeping look alike: 0.15 tells them apart)
def test_block_dropout_replaces_whole_blocks_by_identity_in_training_only(method, opts, p):
    torch.manual_seed(0)
    n, nb = 32, 8
    layer = nn.Linear(n, n, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
    holder = Holder(layer)
    apply_adapters(holder, make_config(method, {**opts, "block_dropout": p}, ["proj"], nb=nb))
    randomize_adapters(holder)
    ad = holder.proj.adapters["full"]
    t = ad.input or ad.output
    blocks, k, eye = ref_blocks(t), n // nb, torch.eye(n // nb, dtype=torch.float64)
    X = torch.eye(n, dtype=torch.float64)

    holder.eval()
    torch.testing.assert_close(holder(X).T, torch.block_diag(*blocks), rtol=1e-10, atol=1e-12)

    holder.train()
    masks, dropped = set(), 0
    for _ in range(60):
        H = holder(X).T  # one forward: one mask for every token
        kept = []
        for i in range(nb):
            Hi = H[i * k:(i + 1) * k, i * k:(i + 1) * k]
            if torch.allclose(Hi, eye, atol=1e-12):
                kept.append(False)
            else:
                torch.testing.assert_close(Hi, blocks[i], rtol=1e-10, atol=1e-12)
                kept.append(True)
        off = H - torch.block_diag(*[H[i * k:(i + 1) * k, i * k:(i + 1) * k] for i in range(nb)])
        assert off.abs().max() == 0  # nothing leaks between blocks
        masks.add(tuple(kept))
        dropped += kept.count(False)
    assert len(masks) > 10  # drawn anew each forward
    assert abs(dropped / (60 * nb) - p) < 0.1  # each block with probability p (480 draws: ~0.02 standard deviation)


def test_lora_dropout_drops_the_adapters_input_in_training_only():
    """`W x + b + (alpha / r) B A dropout(x)`: the base product sees the whole input, the adapter the dropped one
    (the mask drawn as `F.dropout` draws it), and eval mode drops nothing."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    n, p = 16, 0.5
    holder = Holder(nn.Linear(n, n).double())
    apply_adapters(holder, AdapterConfig(method="lora", r=4, alpha=8.0, dropout=p, targets=["proj"]))
    randomize_adapters(holder)
    layer, ad = holder.proj, holder.proj.adapters["full"]
    x = torch.randn(3, 5, n, dtype=torch.float64)

    def expected(xd):
        return x @ layer.weight.T + layer.bias + 2.0 * (xd @ ad.A.T) @ ad.B.T

    holder.eval()
    torch.testing.assert_close(holder(x), expected(x), rtol=1e-10, atol=1e-12)
    holder.train()
    torch.manual_seed(1)
    y = holder(x)
    torch.manual_seed(1)
    xd = F.dropout(x, p, training=True)
    assert (xd == 0).any()
    torch.testing.assert_close(y, expected(xd), rtol=1e-10, atol=1e-12)
    assert (y - expected(x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# whole-model behaviour, PEFT-style
# ---------------------------------------------------------------------------------------------------------------
MODEL_TARGETS = [pytest.param(["query", "value"], id="qv"), pytest.param(["all-linear", "head"], id="all+head")]


def logits_scale(t: torch.Tensor) -> float:
    return t.abs().max().item()


@pytest.mark.parametrize("targets", MODEL_TARGETS)
@pytest.mark.parametrize("method,opts", CASES)
def test_model_init_merge_enable_and_train_step(base_gpt, method, opts, targets):
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base_gpt(idx)
    model = copy.deepcopy(base_gpt)
    apply_adapters(model, make_config(method, opts, targets))
    with torch.no_grad():
        init = model(idx)
    if method == "ether":  # a reflection is never the identity: ETHER changes the model from the start
        assert (init - ref).abs().max() > 1e-2
    else:
        torch.testing.assert_close(init, ref, rtol=0, atol=1e-6 * logits_scale(ref))

    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        adapted = model(idx)
    assert (adapted - ref).abs().max() > 1e-3

    # disabled adapters compute exactly the base model
    set_adapters_enabled(model, False)
    with torch.no_grad():
        assert torch.equal(model(idx), ref)
    set_adapters_enabled(model, True)

    # merged == adapted, with exactly the base keys and layer types
    merged = merge_adapters(copy.deepcopy(model))
    with torch.no_grad():
        out = merged(idx)
    assert (out - adapted).abs().max() <= 1e-5 * logits_scale(adapted)
    assert list(merged.state_dict()) == list(base_gpt.state_dict())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("qkv", "proj", "fc_1", "fc_2")))

    # one optimizer step changes adapter tensors and nothing else
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(".adapters." in k for k in changed)


@pytest.mark.parametrize("method,opts", CASES)
def test_save_load_round_trip(base_gpt, method, opts, tmp_path):
    config = make_config(method, opts, ["query", "value", "mlp"])
    model = apply_adapters(copy.deepcopy(base_gpt), config)
    randomize_adapters(model, scale=0.3)
    path = save_adapters(model, tmp_path / "adapter.pth")
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled code needed
    assert raw["adapter_config"] == config.to_dict()
    assert set(raw["state_dict"]) == set(adapter_state_dict(model))
    assert read_adapter_config(path) == config

    # what the trainer passes for a sharded model: the gathered full adapter tensors
    again = save_adapters(model, tmp_path / "again.pth", state_dict=adapter_state_dict(model))
    again_sd = torch.load(again, weights_only=True)["state_dict"]
    assert all(torch.equal(v, again_sd[k]) for k, v in raw["state_dict"].items())

    fresh = load_adapters(copy.deepcopy(base_gpt), path)  # applies the saved config, then loads
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))
    assert not list(tmp_path.glob(".adapter.pth.*"))  # no temporary left behind by the atomic write


def test_load_refuses_an_adapter_of_another_base_model(base_gpt, tmp_path):
    model = apply_adapters(copy.deepcopy(base_gpt), AdapterConfig(method="ether", nb=4))
    path = save_adapters(model, tmp_path / "a.pth")
    other = GPT(tiny_config(n_embd=48, n_head=6, n_query_groups=3))
    with pytest.raises(ValueError) as err:
        load_adapters(other, path)
    msg = str(err.value)
    assert str(path) in msg and "another base model" in msg
    assert "transformer.h.0.attn.qkv.weight" in msg and "[64, 32]" in msg and "[96, 48]" in msg
    assert not any(True for _ in adapted_layers(other))  # a refused file leaves the model untouched

    # already adapted with other settings: the settings are named, not the tensors they shape
    wider = apply_adapters(copy.deepcopy(base_gpt), AdapterConfig(method="ether", nb=8))
    raw = torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=r"^The adapter dict was trained with other adapter settings than this "
                                         r"model's \(nb=4 in the file, nb=8 in this model\)"):
        load_adapters(wider, raw)
    # the same settings on another width, with no base shapes to say so (a training checkpoint's tensors): the first
    # mismatching adapter tensor is named
    del raw["base_shapes"]
    other = apply_adapters(GPT(tiny_config(n_embd=48, n_head=6, n_query_groups=3)), AdapterConfig(method="ether", nb=4))
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.qkv\.adapters\.query\.input\.u' has shape "
                                         r"\[4, 8\] in the file but \[4, 12\]"):
        load_adapters(other, raw)


def test_gqa_key_value_shapes():
    model = GPT(tiny_config())
    apply_adapters(model, AdapterConfig(method="etherplusHH", nb=4, targets=["key", "value"]))
    layer = model.transformer.h[0].attn.qkv
    for name in ("key", "value"):
        ad = layer.adapters[name]
        assert ad.input.u.shape == (4, 8)  # input side: n_embd = 32
        assert ad.output.u.shape == (4, 4)  # output side: n_query_groups * head_size = 16
    lo_q = [s for s in layer.slices if s[0] == "key"][0]
    assert lo_q == ("key", 32, 48)


def test_nb_not_dividing_a_width_names_the_layer():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match=r"nb=5 does not divide the 32 input features of "
                                         r"transformer\.h\.0\.attn\.qkv \(query rows\)"):
        apply_adapters(model, AdapterConfig(method="ether", nb=5))
    with pytest.raises(ValueError, match=r"nb=32 does not divide the 16 output features of .*\(value rows\)"):
        apply_adapters(GPT(tiny_config()), AdapterConfig(method="ether", nb=32, flip_side=True, targets=["value"]))
    with pytest.raises(ValueError, match=r"block_size=32 does not divide the 48 input features of "
                                         r"transformer\.h\.0\.mlp\.proj"):
        apply_adapters(GPT(tiny_config()), AdapterConfig(method="oft", block_size=32, targets=["mlp"]))


def test_targets_tied_head_and_unknown_names():
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to transformer\.wte\.weight"):
        apply_adapters(GPT(tiny_config(tie_embeddings=True)), AdapterConfig(targets=["head"], nb=4))
    with pytest.raises(ValueError, match=r"'querry' matches no nn\.Linear .* query, key, value"):
        apply_adapters(GPT(tiny_config()), AdapterConfig(targets=["querry"], nb=4))
    # PEFT's target_modules (transformers' layer names): the lit_gpt.GPT target of the same layer is named
    with pytest.raises(ValueError, match=r"'q_proj' matches no nn\.Linear .* or all-linear \('q_proj' is 'query' "
                                         r"here\), and its layers are named as in 'transformer\.h\.0\.attn\.qkv' "
                                         r"\(attn\.qkv, attn\.proj, .*\)\.$"):
        apply_adapters(GPT(tiny_config()), AdapterConfig(targets=["q_proj", "v_proj"], nb=4))
    # generic names and patterns also work on a GPT; every other parameter is frozen
    model = apply_adapters(GPT(tiny_config()), AdapterConfig(targets=["attn.proj", "re:.*mlp\\.fc_[12]"], nb=4))
    names = sorted(n for n, _ in adapted_layers(model))
    assert names == sorted(f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.proj", "mlp.fc_1", "mlp.fc_2"))
    assert all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)
    glob = apply_adapters(GPT(tiny_config()), AdapterConfig(targets=["transformer.h.1.*"], nb=4))
    assert sorted(n for n, _ in adapted_layers(glob)) == [
        f"transformer.h.1.{s}" for s in ("attn.proj", "attn.qkv", "mlp.fc_1", "mlp.fc_2", "mlp.proj")
    ]
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(glob, AdapterConfig(nb=4))


@pytest.mark.parametrize("method,opts", CASES)
def test_bf16_forward_backward_is_finite_and_close_to_float32(base_gpt, method, opts):
    model32 = apply_adapters(copy.deepcopy(base_gpt), make_config(method, opts, ["all-linear"]))
    randomize_adapters(model32, scale=0.3)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model16(idx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model16.parameters() if p.requires_grad)
    with torch.no_grad():
        ref = model32(idx)
    assert (out.float() - ref).abs().max() < 0.1 * logits_scale(ref)


@pytest.mark.parametrize("method,opts", CASES)
def test_autocast_bf16_mixed_precision(base_gpt, method, opts):
    """float32 weights and adapters, bfloat16 compute (Lightning's bf16-mixed): finite, float32 gradients."""
    model = apply_adapters(copy.deepcopy(base_gpt), make_config(method, opts, ["all-linear", "head"]))
    randomize_adapters(model, scale=0.3)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        ref = model(idx)
    assert (out.float() - ref).abs().max() < 0.1 * logits_scale(ref)


def test_input_dropout_is_only_active_in_training(base_gpt):
    model = apply_adapters(copy.deepcopy(base_gpt), AdapterConfig(method="etherplus", nb=4, dropout=0.5,
                                                                  targets=["query", "value"]))
    randomize_adapters(model, scale=0.3)
    layer = model.transformer.h[0].attn.qkv
    x = torch.randn(2, 5, 32)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    layer.train()
    y = layer(x)
    assert not torch.allclose(y[..., :32], a[..., :32])
    # the un-targeted key rows never see the dropout
    torch.testing.assert_close(y[..., 32:48], a[..., 32:48], rtol=0, atol=1e-6)


@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0)])
def test_householder_update_gradients_across_cpu_chunks(monkeypatch, coefs):
    """The hand-written backward against numerical derivatives, with the token loop cut into chunks of 3 rows."""
    from lit_gpt.adapters import ether

    from lit_gpt.adapters import cpu_kernel

    monkeypatch.setattr(cpu_kernel, "_switched_off", 1)  # the eager path; tests/test_cpu_kernel.py has the kernel's
    monkeypatch.setattr(ether, "CPU_CHUNK_BYTES", 3 * 12 * 8)  # 3 rows of 12 float64 features
    torch.manual_seed(0)
    z = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    vecs = torch.randn(len(coefs), 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, v: ether._BlockRankUpdate.apply(z, v, coefs), (z, vecs))
    out = ether._BlockRankUpdate.apply(z, vecs, coefs)
    blocks = [torch.eye(4, dtype=torch.float64) + sum(s * torch.outer(v[i], v[i]) for s, v in zip(coefs, vecs))
              for i in range(3)]
    torch.testing.assert_close(out, z @ torch.block_diag(*blocks).T)


# ---------------------------------------------------------------------------------------------------------------
# OFT's Cayley–Neumann series
# ---------------------------------------------------------------------------------------------------------------
def test_neumann_series_is_the_truncated_formula_and_converges_to_cayley():
    torch.manual_seed(0)
    R = torch.randn(3, 6, 6, dtype=torch.float64)
    S = (R - R.transpose(1, 2)) / 2
    S = S / torch.linalg.matrix_norm(S, keepdim=True) * 0.2  # small S: the series converges
    eye = torch.eye(6, dtype=torch.float64)
    exact = torch.stack([(eye + s) @ torch.linalg.inv(eye - s) for s in S])
    torch.testing.assert_close(cayley(S), exact, rtol=1e-12, atol=1e-12)
    errors = []
    for K in range(1, 8):
        series = torch.stack([(eye + s) @ sum(torch.linalg.matrix_power(s, j) for j in range(K + 1)) for s in S])
        torch.testing.assert_close(cayley(S, K), series, rtol=1e-12, atol=1e-12)
        errors.append((cayley(S, K) - exact).abs().max().item())
    assert all(b < a * 0.3 for a, b in zip(errors, errors[1:]))  # geometric, ratio about ‖S‖
    assert errors[-1] < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# config and the dry run
# ---------------------------------------------------------------------------------------------------------------
def test_config_round_trips_through_yaml_and_validates():
    config = AdapterConfig(method="oft", block_size=16, targets=["query", "value", "mlp"], coft=True, eps=1e-3,
                           block_dropout=0.1, upper_triangle=True)
    text = yaml.safe_dump(config.to_dict())
    assert AdapterConfig.from_dict(yaml.safe_load(text)) == config
    with pytest.raises(ValueError, match=r"Unknown adapter method 'hra': choose one of ether, etherplus, "
                                         r"etherplusHH, oft, lora\."):
        AdapterConfig(method="hra")
    with pytest.raises(ValueError, match="full fine-tuning takes no AdapterConfig"):
        AdapterConfig(method="full")
    with pytest.raises(ValueError, match="etherplusHH already transforms both sides"):
        AdapterConfig(method="etherplusHH", flip_side=True)
    with pytest.raises(ValueError, match="coft is an OFT option"):
        AdapterConfig(method="ether", coft=True)
    with pytest.raises(ValueError, match="block_dropout does not apply to LoRA"):
        AdapterConfig(method="lora", block_dropout=0.1)
    with pytest.raises(ValueError, match="flip_side does not apply to LoRA"):
        AdapterConfig(method="lora", flip_side=True)
    with pytest.raises(ValueError, match="neumann_terms is an OFT option"):
        AdapterConfig(method="etherplus", neumann_terms=3)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
        AdapterConfig(dropout=1.5)
    with pytest.raises(ValueError, match="nb must be a positive number of blocks"):
        AdapterConfig(nb=0)
    with pytest.raises(ValueError, match=r"Unknown adapter config field\(s\) \['Htype'\]"):
        AdapterConfig.from_dict({"Htype": "ether"})


@pytest.mark.parametrize(
    "config,expected",
    [
        (AdapterConfig(method="ether", nb=32), 262_144),
        (AdapterConfig(method="etherplus", nb=32), 524_288),
        (AdapterConfig(method="etherplusHH", nb=32), 1_048_576),
        (AdapterConfig(method="lora", r=8), 4_194_304),
        (AdapterConfig(method="oft", nb=256), 4_194_304),
        (AdapterConfig(method="oft", nb=256, upper_triangle=True), 1_966_080),
        (AdapterConfig(method="oft", block_size=16), 4_194_304),
        (None, 6_738_415_616),
    ],
)
def test_dry_run_counts_match_the_table_for_llama2_7b(config, expected):
    report = plan_report("Llama-2-7b-hf", config, "bf16-true")
    assert f"trainable parameters: {expected:,}\n" in report
    base = 6_738_415_616  # Llama-2-7B's own parameter count
    frozen = 0 if config is None else base
    assert f"frozen parameters: {frozen:,}\n" in report
    weights = (frozen + expected) * 2  # bf16-true: two bytes per parameter
    assert f"weights: {weights / 2**30:,.2f} GiB" in report
    adam, unit = 2 * expected * 2, ("GiB", 2**30) if config is None else ("MiB", 2**20)
    assert f"AdamW state: {adam / unit[1]:,.2f} {unit[0]}" in report


def test_dry_run_per_device_memory_of_a_sharded_run():
    """Full fine-tuning of Llama-2-7B in bf16-true over 4 devices: 6,738,415,616 x (2 + 2 + 4) bytes = 50.21 GiB,
    12.55 GiB a device, plus two gathered blocks of 202,383,360 parameters (772.03 MiB)."""
    report = plan_report("Llama-2-7b-hf", None, "bf16-true", world_size=4)
    assert "total before activations: 50.21 GiB\n" in report
    assert report.endswith("per device, sharded over 4: 12.55 GiB, and up to 772.03 MiB for the gathered blocks in use")
    assert "per device" not in plan_report("Llama-2-7b-hf", None, "bf16-true", world_size=1)


def test_dry_run_takes_a_config_too():
    config = Config.from_name("Llama-2-7b-hf")
    ether = AdapterConfig(method="ether", nb=32)
    assert plan_report(config, ether) == plan_report("Llama-2-7b-hf", ether)


def test_dry_run_precisions():
    with pytest.raises(ValueError, match="Unknown precision 'fp8': choose one of 64-true, 32-true"):
        plan_report("Llama-2-7b-hf", None, "fp8")
    mixed = plan_report("Llama-2-7b-hf", AdapterConfig(method="lora"), "bf16")  # Lightning's alias of bf16-mixed
    assert "precision: bf16-mixed (float32 weights, bfloat16 compute, 4 bytes per parameter)" in mixed
    assert "gradients: 16.00 MiB" in mixed  # 4,194,304 float32 gradients


def test_coft_projects_onto_the_eps_ball_and_leaves_blocks_inside_it_alone():
    """METHODS.md: rescale S_i so that ‖S_i‖_F <= eps, a projection: a block inside the ball is S itself, one outside
    is eps S / ‖S‖ (not every block rescaled to radius eps)."""
    from lit_gpt.adapters import OFTTransform

    t = OFTTransform(8, 2, coft=True, eps=0.1, dtype=torch.float64)
    with torch.no_grad():
        t.R.copy_(torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        t.R[0] *= 0.01 / torch.linalg.matrix_norm((t.R[0] - t.R[0].T) / 2)  # ‖S_0‖ = 0.01, inside
        t.R[1] *= 1.0 / torch.linalg.matrix_norm((t.R[1] - t.R[1].T) / 2)  # ‖S_1‖ = 1, outside
    S = (t.R - t.R.transpose(-1, -2)) / 2
    torch.testing.assert_close(t.skew()[0], S[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(t.skew()[1], 0.1 * S[1], rtol=1e-12, atol=1e-15)


def test_bf16_householder_vectors_are_normalised_in_float32():
    """METHODS.md: the unit vectors of bfloat16 parameters are computed in float32, so the reflections stay
    orthogonal to float32 accuracy (normalised in bfloat16, |û| is 1 ± 4e-3)."""
    from lit_gpt.adapters import HouseholderTransform

    for coefs in ((-2.0,), (-1.0, 1.0)):
        t = HouseholderTransform(64, 2, coefs, dtype=torch.bfloat16)
        with torch.no_grad():
            for p in t.vector_params():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 3)
        vecs = t.unit_vectors()
        assert vecs.dtype == torch.float32
        exact = torch.stack([F.normalize(p.double(), dim=-1) for p in t.vector_params()])
        torch.testing.assert_close(vecs.double(), exact, rtol=0, atol=1e-6)
