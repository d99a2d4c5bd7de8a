"""Adapters on models and layers we did not write: HF transformers Llama (generic module names) and GPT-2
(`Conv1D`), a `lit_gpt.GPT` against an HF Llama with the same weights and adapter tensors, and HF PEFT 0.21's
LoRA and OFT layers with the same parameters."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.adapters import (  # noqa: E402
    AdaptedLinear,
    AdapterConfig,
    adapted_layers,
    apply_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from test_adapters import CASES, make_config, randomize_adapters, ref_slice_output  # noqa: E402

V, N, HEADS, GROUPS, HS, INTER, LAYERS = 64, 32, 4, 2, 8, 48, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which on a loaded machine
    (several test processes on two cores) costs far more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=N, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=GROUPS, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # RMSNorm weights start at 1; make them matter for the weight mapping check
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def lit_from_hf_llama(hf) -> GPT:
    """The same weights in a lit GPT, mapped by hand (fused QKV rows: [q | k | v])."""
    config = Config(
        name="tiny-llama", block_size=64, vocab_size=V, padded_vocab_size=V, n_layer=LAYERS, n_head=HEADS,
        n_query_groups=GROUPS, n_embd=N, intermediate_size=INTER, norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP", bias=False, norm_eps=1e-5, rope_base=10000,
    )
    model = GPT(config).double().eval()
    sd = hf.state_dict()
    own = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(LAYERS):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        own[q + "norm_1.weight"] = sd[p + "input_layernorm.weight"]
        own[q + "norm_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        own[q + "attn.qkv.weight"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        own[q + "attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        own[q + "mlp.fc_1.weight"] = sd[p + "mlp.gate_proj.weight"]
        own[q + "mlp.fc_2.weight"] = sd[p + "mlp.up_proj.weight"]
        own[q + "mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"]
    model.load_state_dict(own, strict=True)
    return model


IDX = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method,opts", CASES)
def test_lit_gpt_query_value_equals_hf_llama_q_proj_v_proj(hf_llama, method, opts):
    lit = lit_from_hf_llama(hf_llama)
    with torch.no_grad():
        ref = hf_llama(IDX).logits
        # the mapping itself is right (both build RoPE's cos/sin in float32, hence the tolerance)
        torch.testing.assert_close(lit(IDX), ref, rtol=0, atol=1e-6)

    hf = apply_adapters(copy.deepcopy(hf_llama), make_config(method, opts, ["q_proj", "v_proj"]))
    randomize_adapters(hf, scale=0.5)
    apply_adapters(lit, make_config(method, opts, ["query", "value"]))
    with torch.no_grad():
        for name, p in lit.named_parameters():
            if ".adapters." in name:
                i = name.split(".")[2]
                slot, rest = name.split(".adapters.")[1].split(".", 1)
                src = f"model.layers.{i}.self_attn.{slot[0]}_proj.adapters.full.{rest}"
                p.copy_(hf.get_parameter(src))
        out = hf(IDX).logits
        assert (out - ref).abs().max() > 1e-3  # the adapters do something
        torch.testing.assert_close(lit(IDX), out, rtol=0, atol=1e-6)

    # the generic path on a model we did not write: the formula, then merged == adapted with the base keys back
    layer = hf.model.layers[1].self_attn.v_proj
    assert isinstance(layer, AdaptedLinear)
    x = torch.randn(3, N, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref_slice_output(layer.adapters["full"], layer.weight, None, x))
    merged = merge_adapters(copy.deepcopy(hf))
    assert type(merged.model.layers[1].self_attn.v_proj) is nn.Linear
    assert list(merged.state_dict()) == list(hf_llama.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX).logits, out, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=N, n_layer=LAYERS, n_head=HEADS, vocab_size=V, n_positions=32,
                                     attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("method,opts", CASES)
def test_gpt2_conv1d_layers(hf_gpt2, method, opts):
    from transformers.pytorch_utils import Conv1D

    model = apply_adapters(copy.deepcopy(hf_gpt2), make_config(method, opts, ["c_attn", "mlp.c_proj"]))
    randomize_adapters(model, scale=0.5)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLinear))
    assert names == sorted([f"transformer.h.{i}.attn.c_attn" for i in range(LAYERS)]
                           + [f"transformer.h.{i}.mlp.c_proj" for i in range(LAYERS)])
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        layer = model.get_submodule(name)
        x = torch.randn(3, layer.in_features, dtype=torch.float64)
        expected = ref_slice_output(layer.adapters["full"], layer.weight.T, layer.bias, x)  # Conv1D: (in, out)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        out = model(IDX).logits
    merged = merge_adapters(copy.deepcopy(model))
    assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
    assert list(merged.state_dict()) == list(hf_gpt2.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX).logits, out, rtol=1e-9, atol=1e-9)


def test_gpt2_tied_head_is_refused(hf_gpt2):
    with pytest.raises(ValueError, match="lm_head.weight is tied to transformer.wte.weight"):
        apply_adapters(copy.deepcopy(hf_gpt2), AdapterConfig(method="lora", targets=["lm_head"]))


def test_a_target_naming_a_non_linear_module_says_what_to_name(hf_llama):
    with pytest.raises(ValueError, match=r"^Adapter target 'mlp' matches only modules that are not linear layers in "
                                         r"LlamaForCausalLM \(such as 'model\.layers\.0\.mlp', a LlamaMLP\): name its "
                                         r"linear layers \(e\.g\. 'mlp\.gate_proj'\) or use a pattern \(e\.g\. "
                                         r"'\*mlp\.\*'\) in the targets\.$"):
        apply_adapters(copy.deepcopy(hf_llama), AdapterConfig(method="lora", targets=["mlp"]))
    model = apply_adapters(copy.deepcopy(hf_llama), AdapterConfig(method="lora", targets=["*mlp.*"]))
    assert sorted(n for n, _ in adapted_layers(model)) == sorted(
        f"model.layers.{i}.mlp.{p}_proj" for i in range(LAYERS) for p in ("gate", "up", "down"))


@pytest.mark.parametrize("targets,why", [
    (None, r"'query' \(a named target of a lit_gpt\.GPT only, as are the default targets \['query', 'value'\]\)"),
    ([".*q_proj"], r"'\.\*q_proj' \(a regular expression is written 're:\.\*q_proj'; a pattern with \* is matched "
                   r"as a shell glob\)"),
    (["qproj"], r"'qproj'"),
])
def test_a_target_matching_nothing_lists_the_layers_to_name(hf_llama, targets, why):
    """On a transformers model: the default targets (a lit_gpt.GPT's names) and a PEFT-style regex say why."""
    config = AdapterConfig(method="lora") if targets is None else AdapterConfig(method="lora", targets=targets)
    with pytest.raises(ValueError, match=rf"^Adapter target {why} matches no nn\.Linear or Conv1D module of "
                                         r"LlamaForCausalLM: set targets to names of its linear layers \(down_proj, "
                                         r"gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj\), "
                                         r"'all-linear', or a regular expression written 're:<regex>'\.$"):
        apply_adapters(copy.deepcopy(hf_llama), config)
    model = apply_adapters(copy.deepcopy(hf_llama), AdapterConfig(method="lora", targets=["re:.*q_proj"]))
    assert len(list(adapted_layers(model))) == LAYERS


def test_a_peft_adapter_given_to_load_adapters_says_how_to_convert_it(hf_llama, tmp_path):
    peft_model(hf_llama, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "peft")
    model = apply_adapters(copy.deepcopy(hf_llama), AdapterConfig(method="lora", r=2, targets=["q_proj"]))
    for given in (tmp_path / "peft", tmp_path / "peft" / "adapter_model.safetensors"):
        with pytest.raises(ValueError, match=rf"^'{re.escape(str(given))}' is a Hugging Face PEFT adapter .* "
                                             r"peft\.PeftModel\.from_pretrained .* scripts/convert_peft_adapter\.py "
                                             rf"import --peft_dir '{re.escape(str(tmp_path / 'peft'))}' .*\.$"):
            load_adapters(model, given)


def test_save_adapters_to_a_directory_is_one_sentence(hf_llama, tmp_path):
    """`save_pretrained("out/")` habits: a folder, existing or with a trailing slash, is refused, not written as a
    file named `out` (or failing on a temporary file's name)."""
    model = apply_adapters(copy.deepcopy(hf_llama), AdapterConfig(method="lora", r=2, targets=["q_proj"]))
    (tmp_path / "there").mkdir()
    for given in (tmp_path / "there", str(tmp_path / "new") + "/"):
        with pytest.raises(ValueError, match=r"^save_adapters writes one file .* is a directory: pass a file path such "
                                             r"as '.*/adapter\.safetensors' \(or a \.pth one\)\.$"):
            save_adapters(model, given)
    assert not (tmp_path / "new").exists() and list((tmp_path / "there").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# HF PEFT 0.21
# ---------------------------------------------------------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.lin = layer

    def forward(self, x):
        return self.lin(x)


def peft_model(base, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), config)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_equals_peft_lora(hf_gpt2, kind):
    torch.manual_seed(0)
    layer = nn.Linear(N, 24).double() if kind == "linear" else copy.deepcopy(hf_gpt2.transformer.h[0].attn.c_attn)
    base = Holder(layer)
    theirs = peft_model(base, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["lin"], lora_dropout=0.0,
                                              fan_in_fan_out=kind == "conv1d"))
    ours = apply_adapters(copy.deepcopy(base), AdapterConfig(method="lora", r=4, alpha=12, targets=["lin"]))
    layer = theirs.base_model.model.lin
    with torch.no_grad():
        A, B = torch.randn_like(layer.lora_A["default"].weight), torch.randn_like(layer.lora_B["default"].weight)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        ours.lin.adapters["full"].A.copy_(A)
        ours.lin.adapters["full"].B.copy_(B)
    x = torch.randn(2, 5, N, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 24 if kind == "linear" else 3 * N, dtype=torch.float64)
    mine, their = ours(x), theirs(x)
    torch.testing.assert_close(mine, their, rtol=1e-12, atol=1e-12)
    # and the gradients of the input and of A, B (ours come from a hand-written backward)
    ad = ours.lin.adapters["full"]
    g_ours = torch.autograd.grad((mine * r).sum(), [x, ad.A, ad.B])
    g_theirs = torch.autograd.grad((their * r).sum(), [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "peft_kw,ours_kw,sign",
    [
        pytest.param(dict(use_cayley_neumann=False), {}, 2.0, id="exact"),
        pytest.param(dict(use_cayley_neumann=True, num_cayley_neumann_terms=5), dict(neumann_terms=3), -2.0,
                     id="neumann5"),
        pytest.param(dict(use_cayley_neumann=True, num_cayley_neumann_terms=7), dict(neumann_terms=5), -2.0,
                     id="neumann7"),
        pytest.param(dict(use_cayley_neumann=False, block_share=True), dict(block_share=True), 2.0, id="share"),
        pytest.param(dict(use_cayley_neumann=False, coft=True, eps=0.25), dict(coft=True, eps=0.125), 2.0, id="coft"),
    ],
)
def test_oft_equals_peft_oft(peft_kw, ours_kw, sign):
    """PEFT stores q (the strict upper triangle of its skew Q) per block: exact Cayley is our S = Q, its Neumann
    series builds the transposed rotation (S = -Q) with T terms = our K = T - 2; its COFT radius is eps/sqrt(nb)
    (computed in float32, so the COFT case uses radii float32 holds exactly)."""
    torch.manual_seed(0)
    k, nb = 8, 4
    base = Holder(nn.Linear(k * nb, 24).double())
    theirs = peft_model(base, peft.OFTConfig(r=0, oft_block_size=k, target_modules=["lin"], **peft_kw)).double()
    ours = apply_adapters(copy.deepcopy(base), AdapterConfig(method="oft", block_size=k, targets=["lin"],
                                                             upper_triangle=True, **ours_kw))
    rot = theirs.base_model.model.lin.oft_R["default"]
    with torch.no_grad():
        q = torch.randn_like(rot.weight) * 0.2
        rot.weight.copy_(q)
        ours.lin.adapters["full"].input.R_upper.copy_(sign * q)
    if ours_kw.get("coft"):  # the constraint must bind for the case to test anything
        S = ours.lin.adapters["full"].input.skew()
        assert (torch.linalg.matrix_norm(S) > ours_kw["eps"] * 0.999).all()
    x = torch.randn(2, 5, k * nb, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_the_coft_radius_default_is_peft_number_and_the_one_help_states():
    """`--oft_coft true` without `--oft_eps` uses PEFT's (and the OFT authors') number, as `--help` says."""
    import dataclasses
    import re

    default = AdapterConfig().eps
    assert default == {f.name: f.default for f in dataclasses.fields(peft.OFTConfig)}["eps"]
    help_text = (Path(__file__).resolve().parents[1] / "finetune" / "ether.py").read_text()
    stated = re.search(r"oft_eps: .*?null \(unset\) means ([0-9.e-]+),", help_text, re.S)
    assert stated and float(stated.group(1)) == default


@pytest.mark.parametrize("kind", ["causal-lm", "gpt2-tied-head", "sequence-classification"])
def test_all_linear_adapts_what_peft_all_linear_adapts(hf_llama, hf_gpt2, kind):
    if kind == "causal-lm":
        base = hf_llama
    elif kind == "gpt2-tied-head":  # Conv1D layers, and a head tied to the embeddings (ours would refuse it)
        base = hf_gpt2
    else:  # get_output_embeddings() is None: the classifier is adapted too
        base = transformers.LlamaForSequenceClassification(hf_llama.config).double()
    theirs = peft_model(base, peft.LoraConfig(r=2, target_modules="all-linear"))
    expected = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer))
    ours = apply_adapters(copy.deepcopy(base), AdapterConfig(method="lora", r=2, targets=["all-linear"]))
    assert sorted(n for n, _ in adapted_layers(ours)) == expected
    assert len(expected) > 0
