"""The adapter API as a PEFT user calls it, on models other than the training scripts': `torch.compile`, layers
whose own forward would be bypassed, atomic `apply_adapters`, loading into an adapted model (settings compared
field by field, wrapper prefixes), `.safetensors` adapter files (through `lit_gpt.merge` too), `all-linear` on
any model, one-sentence errors for bad input, and a forward on the `meta` device. Numbers are checked against the
docs/METHODS.md formulas written out in float64 in `test_adapters.py`, or against the eager model."""

from __future__ import annotations

import contextlib
import copy
import json
import re

import pytest
import torch
import torch.nn as nn

from lit_gpt import GPT
from lit_gpt.adapters import (
    AdaptedLinear,
    AdapterConfig,
    adapted_layers,
    adapter_config_of,
    adapter_state_dict,
    apply_adapters,
    cpu_kernel,
    load_adapters,
    merge_adapters,
    read_adapter_config,
    save_adapters,
)
from test_adapters import CASES, make_config, randomize_adapters, ref_slice_output, tiny_config

METHODS_ONCE = [
    pytest.param("ether", {}, id="ether-input"),
    pytest.param("etherplus", {"flip_side": True}, id="etherplus-output"),
    pytest.param("etherplusHH", {}, id="etherplusHH-both"),
    pytest.param("oft", {}, id="oft"),
    pytest.param("lora", {"r": 3, "alpha": 6.0}, id="lora"),
    pytest.param("lora", {"r": 3, "alpha": 6.0, "dora": True}, id="dora"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (see `test_adapters.py`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def model_snapshot(model: nn.Module) -> tuple[dict, dict, list]:
    """Everything a refused call must leave alone: tensors, requires_grad flags and module types."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_unchanged(model: nn.Module, before: tuple[dict, dict, list]) -> None:
    tensors, flags, types = model_snapshot(model)
    assert types == before[2]
    assert flags == before[1]
    assert tensors.keys() == before[0].keys() and all(torch.equal(tensors[k], before[0][k]) for k in tensors)


# ---------------------------------------------------------------------------------------------------------------
# 1. torch.compile computes what the eager model does, in one graph (the kernels and autograd nodes write through
#    data_ptr, which dynamo cannot see: under the compiler the adapters run plain operations)
# ---------------------------------------------------------------------------------------------------------------
def compiled_equals_eager(model: nn.Module, inputs: tuple, out_grad: torch.Tensor, wrt: list) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # a fresh cache: a model recompiled too often would silently run eagerly
    eager = model(*inputs)
    eager_grads = torch.autograd.grad(eager, wrt, out_grad)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, wrt, out_grad)
    assert counter.frame_count == 1  # it did compile, in one graph: no break at an adapted layer or a norm
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-9)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch._dynamo.reset()


@pytest.mark.parametrize("method,opts", METHODS_ONCE)
def test_compiled_layer_equals_eager(method, opts):
    model = apply_adapters(mlp().double(), make_config(method, opts, ["0", "2"]))
    randomize_adapters(model, scale=0.3)
    # the eager side runs the CPU kernel wherever it is built (LIT_GPT_CPU_KERNEL unset): the compiled side must not
    assert cpu_kernel.runs(torch.float64, torch.device("cpu")) == cpu_kernel.available()
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    compiled_equals_eager(model, (x,), torch.randn(4, 16, dtype=torch.float64), [x, *trainable(model)])


@pytest.mark.parametrize("method,opts", METHODS_ONCE)
def test_compiled_gpt_equals_eager(method, opts):
    torch.manual_seed(0)
    config = tiny_config(n_layer=1, n_embd=16, n_head=2, n_query_groups=1, intermediate_size=24, vocab_size=32,
                         padded_vocab_size=32, block_size=16)
    model = apply_adapters(GPT(config).double(), make_config(method, opts, ["query", "value"]))
    randomize_adapters(model, scale=0.3)
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled_equals_eager(model, (idx,), torch.randn(2, 8, 32, dtype=torch.float64), trainable(model))


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,opts", METHODS_ONCE)
def test_an_input_with_no_rows_gives_an_output_with_no_rows(method, opts, dtype, kernel):
    """As `nn.Linear` does (an empty batch, an empty slice of tokens); bfloat16 on the CPU runs the eager path."""
    model = apply_adapters(mlp().to(dtype), make_config(method, opts, ["0", "2"]))
    x = torch.randn(0, 16, dtype=dtype, requires_grad=True)
    with contextlib.nullcontext() if kernel else cpu_kernel.disabled():
        y = model(x)
        y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert all(p.grad is not None and not p.grad.any() for p in trainable(model))


# ---------------------------------------------------------------------------------------------------------------
# 2. layers whose own forward would be bypassed are refused; plain nn.Linear subclasses are not
# ---------------------------------------------------------------------------------------------------------------
class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 0.5 * super().forward(x)


def test_multihead_attention_out_proj_is_refused():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    before = model_snapshot(layer)
    with pytest.raises(ValueError, match=r"^Layer 'self_attn\.out_proj' is the out_proj of an nn\.MultiheadAttention, "
                                         r"which reads its weight directly .*: leave it out of the targets\.$"):
        apply_adapters(layer, AdapterConfig(method="oft", nb=4, targets=["self_attn.out_proj"]))
    with pytest.raises(ValueError, match=r"^Layer 'self_attn\.out_proj' .* \(name the layers to adapt instead of "
                                         r"'all-linear'\)\.$"):
        apply_adapters(layer, AdapterConfig(method="oft", nb=4, targets=["all-linear"]))
    assert_unchanged(layer, before)
    apply_adapters(layer, AdapterConfig(method="oft", nb=4, targets=["linear1", "linear2"]))  # its other layers work


def test_linear_subclass_with_its_own_forward_is_refused():
    model = nn.Sequential(ScaledLinear(16, 16))
    with pytest.raises(ValueError, match=r"^Layer '0' is a ScaledLinear, whose own forward replaces nn\.Linear's"):
        apply_adapters(model, AdapterConfig(method="etherplus", nb=4, targets=["0"]))


def test_linear_subclass_without_its_own_forward_is_adapted():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    torch.manual_seed(0)
    model = nn.Sequential(NonDynamicallyQuantizableLinear(16, 16)).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    before = model(x)
    apply_adapters(model, AdapterConfig(method="etherplus", nb=4, targets=["0"]))
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)  # the identity at init
    randomize_adapters(model)
    layer = model[0]
    torch.testing.assert_close(model(x), ref_slice_output(layer.adapters["full"], layer.weight, layer.bias, x),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["lora", "etherplus"])
def test_a_gpts_fused_qkv_named_as_a_module_adapts_its_three_slices(method):
    """`targets=["transformer.h.0.attn.qkv"]` (or a pattern that matches it) adapted nothing: the fused layer has
    query/key/value slices, never a whole-layer one. It now computes what the named targets query, key and value
    compute on that layer."""
    torch.manual_seed(0)
    base = GPT(tiny_config()).double()
    by_name, by_target = copy.deepcopy(base), copy.deepcopy(base)
    apply_adapters(by_name, AdapterConfig(method=method, nb=4, targets=["transformer.h.0.attn.qkv"]))
    apply_adapters(by_target, AdapterConfig(method=method, nb=4, targets=["query", "key", "value"]))
    assert set(by_name.transformer.h[0].attn.qkv.adapters) == {"query", "key", "value"}
    randomize_adapters(by_target)
    state = {k: v for k, v in by_target.state_dict().items() if k.startswith("transformer.h.0.attn.qkv.adapters.")}
    assert state and by_name.load_state_dict(state, strict=False).unexpected_keys == []
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    adapted = by_target.transformer.h[0].attn.qkv(x)
    assert (adapted - base.transformer.h[0].attn.qkv(x)).abs().max() > 1e-3
    torch.testing.assert_close(by_name.transformer.h[0].attn.qkv(x), adapted)


# ---------------------------------------------------------------------------------------------------------------
# 3, 8. loading into a model that already has adapters: its settings must be the file's
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "saved,own,differences",
    [
        (dict(method="lora", r=4, alpha=32.0), dict(method="lora", r=4, alpha=16.0),
         ["alpha=32.0 in the file, alpha=16.0 in this model"]),
        (dict(method="oft", nb=4, coft=True, eps=0.01), dict(method="oft", nb=4),
         ["coft=True in the file, coft=False in this model", "eps=0.01 in the file, eps=6e-05 in this model"]),
        (dict(method="oft", nb=4, neumann_terms=2), dict(method="oft", nb=4),
         ["neumann_terms=2 in the file, neumann_terms=0 in this model"]),
        (dict(method="oft", nb=4, upper_triangle=True, block_share=True), dict(method="oft", nb=4),
         ["block_share=True in the file, block_share=False in this model",
          "upper_triangle=True in the file, upper_triangle=False in this model"]),
        (dict(method="etherplus", nb=4), dict(method="etherplus", nb=8), ["nb=4 in the file, nb=8 in this model"]),
        (dict(method="ether", nb=4), dict(method="ether", nb=4, flip_side=True),
         ["flip_side=False in the file, flip_side=True in this model"]),
        (dict(method="oft", block_size=4), dict(method="oft", block_size=8),
         ["block_size=4 in the file, block_size=8 in this model"]),
    ],
    ids=["lora-alpha", "oft-coft-eps", "oft-neumann", "oft-storage", "nb", "flip_side", "block_size"],
)
def test_load_into_an_adapted_model_names_every_setting_that_differs(tmp_path, saved, own, differences):
    source = apply_adapters(mlp(), AdapterConfig(targets=["0"], **saved))
    path = save_adapters(source, tmp_path / "a.pth")
    model = apply_adapters(mlp(), AdapterConfig(targets=["0"], **own))
    before = model_snapshot(model)
    with pytest.raises(ValueError) as err:
        load_adapters(model, path)
    msg = str(err.value)
    found = re.fullmatch(rf"{re.escape(str(path))} was trained with other adapter settings than this model's \((.*)\): "
                         r"load it into a model without adapters, which then gets the file's settings\.", msg)
    assert found is not None, msg
    assert found.group(1).split("; ") == differences
    assert_unchanged(model, before)


def test_load_keeps_the_models_regularisers_and_computes_what_the_saved_model_did(tmp_path):
    source = apply_adapters(mlp(), AdapterConfig(method="etherplus", nb=4, targets=["0", "2"])).eval()
    randomize_adapters(source)
    path = save_adapters(source, tmp_path / "a.pth")
    model = apply_adapters(mlp(), AdapterConfig(method="etherplus", nb=4, targets=["0", "2"], dropout=0.1,
                                                block_dropout=0.2))
    load_adapters(model, path).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    kept = adapter_config_of(model)
    assert (kept.dropout, kept.block_dropout) == (0.1, 0.2)


@pytest.mark.parametrize("wrap", ["module", "_orig_mod"])
def test_a_file_saved_through_a_wrapper_loads_into_the_bare_model_and_back(tmp_path, wrap):
    inner = apply_adapters(mlp(), AdapterConfig(method="lora", r=2, targets=["0", "2"]))
    randomize_adapters(inner)
    # what DDP (`module.`) and torch.compile (`_orig_mod.`) put in front of every name
    path = save_adapters(nn.ModuleDict({wrap: inner}), tmp_path / "wrapped.pth")
    assert all(k.startswith(f"{wrap}.") for k in torch.load(path, weights_only=True)["state_dict"])
    x = torch.randn(3, 16)
    bare = load_adapters(mlp(), path)
    torch.testing.assert_close(bare(x), inner(x), rtol=0, atol=0)
    # and a bare model's file into a wrapped model, adapted already or not
    plain = save_adapters(inner, tmp_path / "plain.pth")
    adapted = apply_adapters(nn.ModuleDict({wrap: mlp()}), AdapterConfig(method="lora", r=2, targets=["0", "2"]))
    for wrapped in (nn.ModuleDict({wrap: mlp()}), adapted):
        load_adapters(wrapped, plain)
        torch.testing.assert_close(wrapped[wrap](x), inner(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 4, 5. apply_adapters: a refused call changes nothing; the model keeps its own copy of the config
# ---------------------------------------------------------------------------------------------------------------
def test_a_refused_apply_leaves_the_model_unchanged():
    model = GPT(tiny_config())
    model.transformer.wte.weight.requires_grad_(False)  # a flag of the user's own, to be kept as it is
    before = model_snapshot(model)
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        logits = model(idx)
    # nb=32 divides the attention layers' 32 inputs but not the MLP projection's 48: refused at the last layers
    with pytest.raises(ValueError, match=r"nb=32 does not divide the 48 input features of "
                                         r"transformer\.h\.0\.mlp\.proj"):
        apply_adapters(model, AdapterConfig(method="ether", nb=32, targets=["attn.qkv", "mlp.proj"]))
    assert_unchanged(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), logits, rtol=0, atol=0)
    apply_adapters(model, AdapterConfig(method="ether", nb=16, targets=["attn.qkv", "mlp.proj"]))  # the retry works
    assert len(list(adapted_layers(model))) == 4

    tied = GPT(tiny_config(tie_embeddings=True))
    before = model_snapshot(tied)
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to transformer\.wte\.weight"):
        apply_adapters(tied, AdapterConfig(method="lora", targets=["query", "value", "head"]))
    assert_unchanged(tied, before)

    later = nn.Sequential(nn.Linear(16, 16), ScaledLinear(16, 16))
    before = model_snapshot(later)
    with pytest.raises(ValueError, match="Layer '1' is a ScaledLinear"):
        apply_adapters(later, AdapterConfig(method="lora", targets=["0", "1"]))
    assert_unchanged(later, before)


def test_apply_keeps_its_own_copy_of_the_config(tmp_path):
    config = AdapterConfig(method="lora", r=4, alpha=8.0, targets=["0"])
    a = apply_adapters(mlp(), config)
    randomize_adapters(a)
    config.alpha = 64.0  # the caller reuses its object for another model
    config.targets.append("2")
    b = apply_adapters(mlp(), config)
    assert adapter_config_of(a) == AdapterConfig(method="lora", r=4, alpha=8.0, targets=["0"])
    assert adapter_config_of(a) is not config and adapter_config_of(b) is not config
    path = save_adapters(a, tmp_path / "a.pth")
    assert read_adapter_config(path).alpha == 8.0
    x = torch.randn(3, 16)
    torch.testing.assert_close(load_adapters(mlp(), path)(x), a(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 6. .safetensors adapter files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", CASES)
def test_safetensors_adapter_file_round_trip(tmp_path, method, opts):
    from safetensors import safe_open

    model = apply_adapters(mlp(), make_config(method, opts, ["0", "2"]))
    randomize_adapters(model, scale=0.3)
    style = {"prompt_style": "alpaca", "system_prompt": None}
    pth = torch.load(save_adapters(model, tmp_path / "a.pth", prompt_style=style), weights_only=True)
    path = save_adapters(model, tmp_path / "adapter_model.safetensors", prompt_style=style)
    with safe_open(str(path), "pt") as f:  # what any safetensors reader sees
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: json.loads(v) for k, v in metadata.items()} == {k: v for k, v in pth.items() if k != "state_dict"}
    assert tensors.keys() == pth["state_dict"].keys()
    assert all(torch.equal(tensors[k], v) for k, v in pth["state_dict"].items())
    assert read_adapter_config(path) == adapter_config_of(model)
    x = torch.randn(3, 16)
    torch.testing.assert_close(load_adapters(mlp(), path)(x), model(x), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "adapter_model.safetensors"]  # no temporaries


def test_safetensors_adapter_file_gets_the_same_checks(tmp_path):
    from safetensors.torch import save_file

    model = apply_adapters(mlp(), AdapterConfig(method="etherplus", nb=4, targets=["0"]))
    path = save_adapters(model, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} was trained with other adapter settings than "
                                         r"this model's \(nb=4 in the file, nb=8 in this model\)"):
        load_adapters(apply_adapters(mlp(), AdapterConfig(method="etherplus", nb=8, targets=["0"])), path)
    wider = nn.Sequential(nn.Linear(24, 32))
    with pytest.raises(ValueError, match=r"was trained on another base model: base tensor '0\.weight' had shape "
                                         r"\[32, 16\] there but has \[32, 24\]"):
        load_adapters(wider, path)
    assert not any(True for _ in adapted_layers(wider))

    def rewritten(name: str, **metadata) -> str:
        target = tmp_path / name
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = {**f.metadata(), **metadata}
            save_file({k: f.get_tensor(k) for k in f.keys()}, str(target), metadata=meta)
        return str(target)

    with pytest.raises(ValueError, match=r"is not a lit_gpt adapter file \(its format is 'peft', not "
                                         r"'lit_gpt\.adapters'\): pass a file written by save_adapters\.$"):
        load_adapters(mlp(), rewritten("foreign.safetensors", format=json.dumps("peft")))
    with pytest.raises(ValueError, match=r"is an adapter file of version 2, newer than this lit_gpt reads \(up to 1\): "
                                         r"update lit_gpt to load it\.$"):
        read_adapter_config(rewritten("newer.safetensors", version="2"))
    plain = tmp_path / "weights.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ValueError, match=r"is not an adapter file written by save_adapters"):
        load_adapters(mlp(), plain)


def test_merge_chat_and_eval_read_a_safetensors_adapter_file(tmp_path):
    from lit_gpt.merge import load_finetuned, merge_checkpoint, read_finetuned
    from test_merge import make_base

    base = make_base(tmp_path / "base")
    model = GPT.from_checkpoint(base)
    apply_adapters(model, AdapterConfig(method="etherplusHH", nb=4, targets=["query", "value", "mlp"]))
    randomize_adapters(model, scale=0.3)
    path = save_adapters(model, tmp_path / "run" / "adapter_model.safetensors",
                         prompt_style={"prompt_style": "alpaca", "system_prompt": None})
    finetuned = read_finetuned(path)
    assert (finetuned.kind, finetuned.method, finetuned.payload["prompt_style"]["prompt_style"]) == (
        "adapter", "etherplusHH", "alpaca")
    tokens = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        expected = model.eval()(tokens)
        torch.testing.assert_close(load_finetuned(base, path)(tokens), expected, rtol=0, atol=0)  # chat, eval
        out = merge_checkpoint(path, checkpoint_dir=base, log=lambda s: None)  # scripts/merge_*.py
        torch.testing.assert_close(GPT.from_checkpoint(out).eval()(tokens), expected, rtol=1e-5, atol=1e-5)
        # saved through torch.compile's wrapper: its names start with `_orig_mod.`, the base model's do not
        wrapped = save_adapters(nn.ModuleDict({"_orig_mod": model}), tmp_path / "run" / "wrapped.safetensors")
        torch.testing.assert_close(load_finetuned(base, wrapped)(tokens), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 7. all-linear on any model: every linear layer but the output head
# ---------------------------------------------------------------------------------------------------------------
class WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
        self.lm_head = nn.Linear(16, 8)

    def forward(self, x):
        return self.lm_head(self.body(x))


def test_all_linear_on_any_model():
    assert sorted(n for n, _ in adapted_layers(apply_adapters(WithHead(), AdapterConfig(targets=["all-linear"],
                                                                                        nb=4)))) == ["body.0", "body.1"]
    assert [n for n, _ in adapted_layers(apply_adapters(mlp(), AdapterConfig(targets=["all-linear"], nb=4)))] == [
        "0", "2"]
    # a lit_gpt.GPT keeps its meaning: the named targets but the head
    gpt = apply_adapters(GPT(tiny_config()), AdapterConfig(method="lora", targets=["all-linear"]))
    named = apply_adapters(GPT(tiny_config()), AdapterConfig(method="lora", targets=["query", "key", "value",
                                                                                     "projection", "mlp"]))
    assert [(n, layer.slices, sorted(layer.adapters)) for n, layer in adapted_layers(gpt)] == [
        (n, layer.slices, sorted(layer.adapters)) for n, layer in adapted_layers(named)]
    assert "lm_head" not in dict(adapted_layers(gpt))
    with pytest.raises(ValueError, match=r"^Adapter target 'all-linear' finds no nn\.Linear or Conv1D module in "
                                         r"Sequential besides its output head\.$"):
        apply_adapters(nn.Sequential(nn.ReLU()), AdapterConfig(targets=["all-linear"]))


# ---------------------------------------------------------------------------------------------------------------
# 9, 10. one sentence naming the field, for every bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(targets=["re:(q_proj"]), r"^The targets entry 're:\(q_proj' is not a valid regular expression "
                                       r"\(missing \), .*\): fix the pattern after 're:'\.$"),
        (dict(targets=None), r"^targets must be a non-empty list of module names, got None\.$"),
        (dict(dropout="0.1"), r"^dropout must be a number, got '0\.1' \(str\)\.$"),
        (dict(dropout=None), r"^dropout must be a number, got None \(NoneType\)\.$"),
        (dict(block_dropout="x"), r"^block_dropout must be a number, got 'x' \(str\)\.$"),
        (dict(method="oft", coft="false"), r"^coft must be True or False, got 'false' \(str\)\.$"),
        (dict(flip_side="no"), r"^flip_side must be True or False, got 'no' \(str\)\.$"),
        (dict(method="oft", upper_triangle=1), r"^upper_triangle must be True or False, got 1 \(int\)\.$"),
        (dict(nb=True), r"^nb must be an integer, got True \(bool\)\.$"),
        (dict(nb=4.0), r"^nb must be an integer, got 4\.0 \(float\)\.$"),
        (dict(method="lora", r=False), r"^r must be an integer, got False \(bool\)\.$"),
        (dict(method="oft", neumann_terms=True), r"^neumann_terms must be an integer, got True \(bool\)\.$"),
        (dict(block_size=True), r"^block_size must be an integer, got True \(bool\)\.$"),
        (dict(method="lora", alpha=True), r"^alpha must be a number, got True \(bool\)\.$"),
    ],
)
def test_bad_config_values_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_targets_that_cannot_be_adapted_are_one_sentence():
    with pytest.raises(ValueError, match=r"^Layer '0' \(LazyLinear\) is not initialized yet: run a forward pass "
                                         r"through the model first, then apply the adapters\.$"):
        apply_adapters(nn.Sequential(nn.LazyLinear(8)), AdapterConfig(method="lora", targets=["0"]))
    model = nn.Sequential()
    model.add_module("mlp", nn.Sequential())
    model.mlp.add_module("up", nn.Linear(16, 32))
    with pytest.raises(ValueError, match=r"^Adapter target 'mlp' matches only modules that are not linear layers in "
                                         r"Sequential \(such as 'mlp', a Sequential\): name its linear layers \(e\.g\. "
                                         r"'mlp\.up'\) or use a pattern \(e\.g\. '\*mlp\.\*'\) in the targets\.$"):
        apply_adapters(model, AdapterConfig(method="lora", targets=["mlp"]))
    # what the hint says works
    assert [n for n, _ in adapted_layers(apply_adapters(model, AdapterConfig(method="lora", targets=["*mlp.*"])))] == [
        "mlp.up"]


def test_foreign_or_newer_adapter_files_are_refused(tmp_path):
    model = apply_adapters(mlp(), AdapterConfig(method="lora", targets=["0"]))
    obj = torch.load(save_adapters(model, tmp_path / "a.pth"), weights_only=True)
    for change, message in [
        ({"format": "not.lit_gpt"}, r"^The adapter dict is not a lit_gpt adapter file \(its format is 'not\.lit_gpt', "
                                    r"not 'lit_gpt\.adapters'\): pass a file written by save_adapters\.$"),
        ({"version": 99}, r"^The adapter dict is an adapter file of version 99, newer than this lit_gpt reads \(up to "
                          r"1\): update lit_gpt to load it\.$"),
        ({"version": "1"}, r"^The adapter dict has no valid adapter file version \('1', where save_adapters writes 1 "
                           r"to 1\): pass a file written by save_adapters\.$"),
    ]:
        fresh = mlp()
        with pytest.raises(ValueError, match=message):
            load_adapters(fresh, {**obj, **change})
        assert not any(True for _ in adapted_layers(fresh))
    path = tmp_path / "newer.pth"
    torch.save({**obj, "version": 2}, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is an adapter file of version 2"):
        read_adapter_config(path)


# ---------------------------------------------------------------------------------------------------------------
# 11. a forward on the meta device (shape inference, FLOP counting)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", CASES)
def test_forward_on_the_meta_device(method, opts):
    model = apply_adapters(mlp(), make_config(method, opts, ["0", "2"])).to("meta")
    assert model(torch.empty(2, 5, 16, device="meta")).shape == (2, 5, 16)
    with torch.device("meta"):
        gpt = apply_adapters(GPT(tiny_config()), make_config(method, opts, ["all-linear", "head"]))
    out = gpt(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 8, 64)


@pytest.mark.parametrize("into", ["fresh", "adapted"])
def test_an_adapter_file_missing_a_tensor_is_refused_and_the_model_left_alone(tmp_path, into):
    """A lost tensor would otherwise keep its random initial value (ETHER's u): garbage outputs, no error."""
    source = apply_adapters(mlp(), AdapterConfig(method="ether", nb=4, targets=["0", "2"]))
    randomize_adapters(source, scale=0.3)
    obj = torch.load(save_adapters(source, tmp_path / "a.pth"), weights_only=True)
    lost = sorted(obj["state_dict"])[1]
    del obj["state_dict"][lost]
    model = mlp() if into == "fresh" else apply_adapters(mlp(), AdapterConfig(method="ether", nb=4,
                                                                             targets=["0", "2"]))
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=rf"does not fit this model's adapters \(this model's {re.escape(repr(lost))} "
                                         r"is missing from it\)"):
        load_adapters(model, obj)
    assert_unchanged(model, before)
    assert (adapter_config_of(model) is None) == (into == "fresh")


def test_an_adapter_dict_without_format_and_version_loads():
    """What `lit_gpt.merge` makes of a training checkpoint: the config and the tensors, nothing else."""
    source = apply_adapters(mlp(), AdapterConfig(method="oft", nb=4, targets=["0"], coft=True, eps=0.05))
    randomize_adapters(source, scale=0.3)
    obj = {"adapter_config": adapter_config_of(source).to_dict(), "state_dict": adapter_snapshot(source)}
    model = load_adapters(mlp(), obj)
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    torch.testing.assert_close(merge_adapters(copy.deepcopy(model))(x), source(x), rtol=1e-5, atol=1e-5)
    assert isinstance(model[0], AdaptedLinear)
