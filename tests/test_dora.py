"""DoRA (`AdapterConfig(method="lora", dora=True)`, `finetune/lora.py --lora_dora true`): the formula of Liu et al.
(arXiv 2402.09353) in float64 on a `lit_gpt.GPT`'s slices, HF PEFT 0.21's DoRA layer (`use_dora=True`) with the same
tensors (outputs and gradients, dropout included), merge, save/load, the eval-mode norm cache, the dry-run count and
a short training run that merges. PEFT's folders both ways are in tests/test_peft_format.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import GPT
from lit_gpt.adapters import AdapterConfig, adapted_layers, apply_adapters, load_adapters, merge_adapters, save_adapters
from lit_gpt.adapters.plan import plan_report
from lit_gpt.merge import load_finetuned
from lit_gpt.utils import load_file
from test_adapters import one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)
from test_final_folder import train
from test_training import tiny_ckpt  # noqa: F401 (a fixture)

DORA = dict(method="lora", r=4, alpha=8.0, dora=True)


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B, and magnitudes away from the base norms (which they start at)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            elif name.endswith(".magnitude"):
                p.mul_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)


def dora_rows(W: torch.Tensor, ad) -> torch.Tensor:
    """METHODS-style reference in float64: `m / ||W + s B A||_row * (W + s B A)`."""
    V = W.double() + (ad.alpha / ad.r) * ad.B.double() @ ad.A.double()
    return (ad.magnitude.double() / V.norm(dim=1)).unsqueeze(1) * V


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return GPT(tiny_config()).double().eval()


def test_a_gpt_with_dora_computes_the_formula_on_its_slices_and_starts_as_the_base(gpt):
    x = torch.randint(0, gpt.config.vocab_size, (2, 7))
    base = gpt(x)
    apply_adapters(gpt, AdapterConfig(targets=["query", "value", "mlp"], **DORA))
    torch.testing.assert_close(gpt(x), base, rtol=0, atol=1e-12)  # B = 0, m = the base norms
    randomize(gpt)
    assert (gpt(x) - base).abs().max() > 1e-3
    for name, layer in adapted_layers(gpt):
        inp = torch.randn(3, layer.in_features, dtype=torch.float64)
        W = layer.base_weight()
        expected = F.linear(inp, W, layer.bias)
        for sname, lo, hi in layer.slices:
            if sname in layer.adapters:
                bias = 0 if layer.bias is None else layer.bias[lo:hi]  # (the QKV bias is not rescaled)
                expected[:, lo:hi] = inp @ dora_rows(W[lo:hi], layer.adapters[sname]).t() + bias
        got = layer(inp)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        for sname, lo, hi in layer.slices:  # the key rows of the fused QKV layer are the base layer's, bit for bit
            if sname not in layer.adapters:
                assert torch.equal(got[:, lo:hi], F.linear(inp, W, layer.bias)[:, lo:hi])


class Holder(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_equals_peft_dora_with_gradients(kind, dropout):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    layer = nn.Linear(16, 24) if kind == "linear" else transformers.pytorch_utils.Conv1D(24, 16)
    base = Holder(layer.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=12, target_modules=["lin"], lora_dropout=dropout, use_dora=True,
            fan_in_fan_out=kind == "conv1d"))
    ours = apply_adapters(copy.deepcopy(base), AdapterConfig(method="lora", r=4, alpha=12, targets=["lin"],
                                                             dropout=dropout, dora=True))
    peft_layer, ad = theirs.base_model.model.lin, ours.lin.adapters["full"]
    A_, B_, m_ = (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                  peft_layer.lora_magnitude_vector["default"].weight)
    torch.testing.assert_close(ad.magnitude, m_, rtol=1e-12, atol=0)  # both start at the base rows' norms
    with torch.no_grad():
        A, B, m = torch.randn_like(ad.A), torch.randn_like(ad.B), ad.magnitude * (torch.rand(24).double() + 0.5)
        for (mine, their), value in zip(((ad.A, A_), (ad.B, B_), (ad.magnitude, m_)), (A, B, m)):
            mine.copy_(value)
            their.copy_(value)
    ours.train(), theirs.train()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 24, dtype=torch.float64)
    torch.manual_seed(1)  # the same dropout masks: both draw one per forward
    mine = ours(x)
    torch.manual_seed(1)
    their = theirs(x)
    torch.testing.assert_close(mine, their, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad((mine * r).sum(), [x, ad.A, ad.B, ad.magnitude])
    g_theirs = torch.autograd.grad((their * r).sum(), [x, A_, B_, m_])
    for a, b in zip(g_ours, g_theirs):  # (the norm is a constant in backward, in both)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_merge_save_load_and_a_mismatched_load(gpt, tmp_path):
    x = torch.randint(0, gpt.config.vocab_size, (2, 7))
    apply_adapters(gpt, AdapterConfig(targets=["query", "value", "projection"], **DORA))
    randomize(gpt)
    expected = gpt(x)
    path = save_adapters(gpt, tmp_path / "dora.safetensors")
    fresh = GPT(tiny_config()).double().eval()
    fresh.load_state_dict({k: v for k, v in gpt.state_dict().items() if ".adapters." not in k})
    torch.testing.assert_close(load_adapters(copy.deepcopy(fresh), path)(x), expected, rtol=1e-12, atol=1e-12)
    plain = apply_adapters(copy.deepcopy(fresh), AdapterConfig(method="lora", r=4, alpha=8.0,
                                                               targets=["query", "value", "projection"]))
    with pytest.raises(ValueError, match=r"other adapter settings .*dora=True in the file, dora=False in this model"):
        load_adapters(plain, path)
    merged = merge_adapters(gpt)
    assert set(merged.state_dict()) == set(fresh.state_dict())
    torch.testing.assert_close(merged(x), expected, rtol=1e-10, atol=1e-10)


def test_dora_is_a_lora_option():
    with pytest.raises(ValueError, match="dora .*LoRA option; method='ether'"):
        AdapterConfig(method="ether", dora=True)
    with pytest.raises(ValueError, match="dora must be True or False"):
        AdapterConfig(method="lora", dora="yes")
    assert "DoRA" in AdapterConfig(**DORA).describe()


def test_in_bfloat16_the_magnitudes_are_float32_and_the_model_starts_as_the_base():
    """As PEFT keeps them: bfloat16 would round AdamW's steps at the row norms away, and round the start."""
    from lit_gpt.training import _half_keeping_trainable_float32, resolve_adapter_float32

    torch.manual_seed(0)
    base = GPT(tiny_config()).to(torch.bfloat16).eval()
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(**DORA, targets=["query", "value", "mlp"]))
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".magnitude")}
    assert magnitudes and all(m.dtype == torch.float32 for m in magnitudes.values())
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    # the training's bf16-true with float32 adapters (which DoRA implies there) keeps their float32 values
    _half_keeping_trainable_float32()("bf16-true").convert_module(model)
    assert all(torch.equal(p, magnitudes[n]) for n, p in model.named_parameters() if n in magnitudes)
    dora, lora = AdapterConfig(**DORA), AdapterConfig(method="lora")
    assert resolve_adapter_float32(None, dora, "bf16-true") and not resolve_adapter_float32(None, dora, "32-true")
    assert not resolve_adapter_float32(None, lora, "bf16-true") and resolve_adapter_float32(True, lora, "bf16-true")
    with pytest.raises(ValueError, match=r"^--lora_dora true under --precision bf16-true needs --adapter_float32 "
                                         r"true: .*drop --adapter_float32 false"):
        resolve_adapter_float32(False, dora, "bf16-true")


def test_an_in_place_operation_after_the_layer_leaves_the_gradients_alone():
    """Outside a lit_gpt.GPT the rescale is out of place: an in-place ReLU after the layer must not change what
    backward reads."""
    def grads(inplace: bool):
        torch.manual_seed(0)
        model = apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=inplace)),
                               AdapterConfig(**DORA, targets=["0"]))
        randomize(model)
        model(torch.randn(4, 8)).square().sum().backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b)


def test_an_all_zero_row_stays_finite_and_merges():
    """A padded vocabulary row of a head is zero: its output is the bias, not 0/0 (PEFT's DoRA gives NaN)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight[2] = 0
    x = torch.randn(3, 8)
    expected = layer(x)
    model = apply_adapters(nn.Sequential(layer), AdapterConfig(**DORA, targets=["0"]))
    torch.testing.assert_close(model(x), expected)
    randomize(model)
    y = model(x)
    y.sum().backward()
    assert y.isfinite().all() and all(p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(merge_adapters(model)(x), y)


def test_eval_mode_keeps_the_norms_until_a_weight_changes(gpt):
    """Generation calls each layer once per token: the norms are kept between calls without gradients, and a
    changed weight (an optimizer step, a loaded file) or a switch of mode is never served the old ones."""
    apply_adapters(gpt, AdapterConfig(targets=["query", "value"], **DORA)).eval()
    randomize(gpt)
    layer = next(layer for _, layer in adapted_layers(gpt))
    ad = layer.adapters["query"]
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    calls = []
    original = type(ad)._weight_norms
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(ad), "_weight_norms", lambda self, W: calls.append(1) or original(self, W))
        with torch.no_grad():
            y1 = layer(x)
            assert torch.equal(layer(x), y1) and len(calls) == 2  # query and value, once each
            ad.B.add_(0.5)  # in place, as AdamW steps
            y2 = layer(x)
        assert len(calls) == 3 and (y2 - y1).abs().max() > 1e-3  # query's again; value's are still good
        gpt.train()
        with torch.no_grad():
            layer(x)
            layer(x)
        assert len(calls) == 7  # never kept in training mode
    lo, hi = next((lo, hi) for s, lo, hi in layer.slices if s == "query")
    torch.testing.assert_close(y2[:, lo:hi], x @ dora_rows(layer.base_weight()[lo:hi], ad).t() + layer.bias[lo:hi],
                               rtol=1e-12, atol=1e-12)


def test_dry_run_counts_one_magnitude_per_adapted_row():
    lora = 4_194_304  # Llama-2-7B, q and v, r = 8 (METHODS.md's table)
    report = plan_report("Llama-2-7b-hf", AdapterConfig(method="lora", r=8, dora=True), "bf16-true")
    assert f"trainable parameters: {lora + 32 * (4096 + 4096):,}\n" in report
    assert "gradients: 17.00 MiB" in report  # float32 under bf16-true, as the training keeps DoRA's adapter


def test_finetune_lora_dora_trains_and_merges(tiny_ckpt, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train("lora", out, tiny_ckpt, steps=3, lora_dora=True, lora_dropout=0.0, merge=True)
    adapter = out / "lit_model_lora_finetuned.pth"
    state = load_file(adapter)["state_dict"]
    magnitudes = {k: v for k, v in state.items() if k.endswith(".magnitude")}
    assert magnitudes
    base = GPT.from_checkpoint(tiny_ckpt).eval()
    adapted = load_finetuned(tiny_ckpt, adapter)
    x = torch.randint(0, base.config.vocab_size, (1, 8))
    # trained: the magnitudes moved off the base norms
    norms = {f"{name}.adapters.{s}.magnitude": layer.base_weight()[lo:hi].norm(dim=1)
             for name, layer in adapted_layers(adapted) for s, lo, hi in layer.slices if s in layer.adapters}
    assert any((magnitudes[k] - n).abs().max() > 1e-4 for k, n in norms.items())
    with torch.no_grad():
        merged = GPT.from_checkpoint(out / "merged").eval()
        torch.testing.assert_close(merged(x), adapted(x), rtol=1e-4, atol=1e-4)
        assert (adapted(x) - base(x)).abs().max() > 1e-4
