"""Gemma, Gemma 2 and Gemma 3 (text) against transformers' own `GemmaForCausalLM`, `Gemma2ForCausalLM` and
`Gemma3ForCausalLM`: norms scaling by 1 + weight, scaled embeddings, the GELU-gated MLP, norms after the attention and
the MLP, soft-capped scores and logits, sliding-window blocks (windows shorter than the test sequences, so they
matter), Gemma 3's per-head query/key norms and second RoPE base. Import, KV-cache decoding, export, PEFT LoRA both
ways and every adapter method, on tiny random models in float32; the named configs' sizes against transformers'
parameter counts and the published ones."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.adapters import AdapterConfig, apply_adapters, merge_adapters, save_adapters  # noqa: E402
from lit_gpt.convert_hf import (  # noqa: E402
    ConversionError,
    config_from_hf,
    config_to_hf,
    convert_hf_checkpoint,
    hf_to_lit_state_dict,
    lit_to_hf_state_dict,
)
import test_adapters  # noqa: E402
from test_convert_hf import (  # noqa: E402
    TOL, assert_decodes_like, exported, hf_logits, lit_logits, make_hf_model, save_hf)

one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors
randomize_adapters = test_adapters.randomize_adapters

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-6)
# windows of 4 tokens against 12-token sequences; a query_pre_attn_scalar that is not the head size; small soft caps,
# so that they bend the scores and logits of these random weights
FAMILIES = {
    "gemma": dict(),
    "gemma2": dict(sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": dict(sliding_window=4, query_pre_attn_scalar=24, sliding_window_pattern=2,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}
EXPORTED_CLASS = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
IDX = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny(model_type: str, tied: bool = True, **kw):
    return make_hf_model(model_type, **{**TINY, **FAMILIES[model_type], "tie_word_embeddings": tied, **kw})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """model_type -> (transformers model, folder holding its files and their lit conversion)."""
    out = {}
    for model_type in FAMILIES:
        hf = tiny(model_type)
        folder = tmp_path_factory.mktemp(model_type) / "hf"
        save_hf(hf, folder, "safetensors")
        convert_hf_checkpoint(folder)
        out[model_type] = hf, folder
    return out


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_import_kv_cache_and_export_match_transformers(model_type, tied, tmp_path):
    hf = tiny(model_type, tied)
    save_hf(hf, tmp_path / "hf", "safetensors")
    config = convert_hf_checkpoint(tmp_path / "hf")
    assert (config.mlp_class_name, config.norm_unit_offset, config.scale_embeddings) == ("GemmaMLP", True, True)
    assert config.tie_embeddings == tied and config.head_size == 16
    if model_type != "gemma":
        assert config.sliding_window_size == 4 and config.attention_scores_scalar == 24
        assert config.sliding_window_indices == [1, 0, 1, 0]
    if model_type == "gemma3_text":
        assert (config.rope_base, config.rope_local_base_freq, config.rope_adjustments) == (1e6, 1e4, {"factor": 4.0})
        assert config.norm_qk and config.attention_logit_softcapping is None
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    expected = hf_logits(hf, IDX)
    torch.testing.assert_close(lit_logits(model, IDX), expected, **TOL)

    # a prefill shorter than the window's reach, then one token at a time past it
    assert_decodes_like(model, IDX, expected, prefill=3)
    back = exported(tmp_path / "hf", tmp_path / "export")
    assert type(back).__name__ == EXPORTED_CLASS[model_type]
    torch.testing.assert_close(hf_logits(back, IDX), expected, **TOL)


def test_windows_and_soft_caps_matter_in_these_tests():
    """The tiny models' windows and caps change transformers' logits, so matching them tests ours."""
    base = hf_logits(tiny("gemma2"), IDX)
    for change in (dict(sliding_window=64), dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None)):
        assert (hf_logits(tiny("gemma2", **change), IDX) - base).abs().max() > 1e-2, change
    wide = dict(FAMILIES["gemma3_text"]["rope_parameters"], sliding_attention={"rope_type": "default",
                                                                             "rope_theta": 1e6})
    gemma3 = hf_logits(tiny("gemma3_text"), IDX)
    assert (hf_logits(tiny("gemma3_text", rope_parameters=wide), IDX) - gemma3).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_state_dict_round_trip_reproduces_the_hf_tensors(converted, model_type):
    """hf -> lit -> hf gives back exactly the tensors transformers wrote: Gemma 2/3's four norms per block land on
    lit's norm_1, post_attention_norm, norm_2 and post_mlp_norm and back; the norm weights are kept as stored."""
    hf, _ = converted[model_type]
    hf_sd = hf.state_dict()
    config = config_from_hf(hf.config.to_dict())
    lit_sd = hf_to_lit_state_dict(hf_sd, config)
    layer = "model.layers.1"
    if model_type == "gemma":
        assert torch.equal(lit_sd["transformer.h.1.norm_2.weight"], hf_sd[f"{layer}.post_attention_layernorm.weight"])
    else:
        pairs = {"post_attention_norm": "post_attention_layernorm", "norm_2": "pre_feedforward_layernorm",
                 "post_mlp_norm": "post_feedforward_layernorm"}
        for lit, theirs in pairs.items():
            assert torch.equal(lit_sd[f"transformer.h.1.{lit}.weight"], hf_sd[f"{layer}.{theirs}.weight"]), lit
    back = lit_to_hf_state_dict(lit_sd, config)
    assert sorted(back) == sorted(k for k in hf_sd if k != "lm_head.weight")  # (tied: transformers saves no head)
    for k in back:
        assert torch.equal(back[k], hf_sd[k]), k


def test_transformers_4_config_files_give_the_same_config():
    """Gemma 3's config.json as transformers 4 wrote it (rope_theta, rope_scaling and rope_local_base_freq, the
    window pattern as sliding_window_pattern) and as transformers 5 writes it (rope_parameters per layer type,
    layer_types) are the same model; so are Gemma 1's legacy hidden_act "gelu" (run as the tanh GELU, as
    transformers does) and its "gelu_pytorch_tanh"."""
    new = tiny("gemma3_text").config.to_dict()
    assert isinstance(new["rope_parameters"].get("full_attention"), dict) and "layer_types" in new
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0},
               sliding_window_pattern=2)
    assert config_from_hf(old) == config_from_hf(new)
    gemma = {**TINY, "model_type": "gemma"}
    legacy = config_from_hf({**gemma, "hidden_act": "gelu"})
    assert legacy == config_from_hf({**gemma, "hidden_act": "gelu_pytorch_tanh"}) and legacy.gelu_approximate == "tanh"


def test_what_lit_gpt_cannot_express_is_refused():
    gemma2 = {**TINY, **FAMILIES["gemma2"], "model_type": "gemma2"}
    with pytest.raises(ConversionError, match="attention_bias=true"):
        config_from_hf({**gemma2, "attention_bias": True})
    with pytest.raises(ConversionError, match="use_bidirectional_attention=true"):
        config_from_hf({**gemma2, "model_type": "gemma3_text", "use_bidirectional_attention": True})
    with pytest.raises(ConversionError, match="layer_types must list 4 entries"):
        config_from_hf({**gemma2, "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(ConversionError, match="sliding_attention has rope_type 'linear'"):
        config_from_hf({**gemma2, "model_type": "gemma3_text", "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}})
    with pytest.raises(ConversionError, match="'query_pre_attn_scalar' must be an integer"):
        config_from_hf({**gemma2, "query_pre_attn_scalar": "big"})

    # a Gemma field on a model transformers' Llama would run without it
    llama = Config(name="t", n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32, bias=False,
                   norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=48)
    for change in (dict(scale_embeddings=True), dict(final_logit_softcapping=30.0), dict(norm_unit_offset=True),
                   dict(post_mlp_norm=True), dict(attention_scores_scalar=8)):
        field = next(iter(change))
        with pytest.raises(ConversionError, match=f"cannot be exported.*{field}"):
            config_to_hf(Config(**{**llama.to_dict(), **change}))


@pytest.mark.parametrize("change,message", [
    (dict(sliding_window_indices=[1, 0, 1]), "sliding_window_indices must be a list of 4 entries"),
    (dict(sliding_window_indices=[1, 0, 2, 0]), "each 0 or 1"),
    (dict(sliding_window_size=None), "sliding_window_indices is set but sliding_window_size is not"),
    (dict(sliding_window_size=0), "sliding_window_size=0 must be a positive number"),
    (dict(attention_logit_softcapping=-1.0), "attention_logit_softcapping=-1.0 must be a positive number"),
    (dict(norm_class_name="LayerNorm"), "norm_unit_offset=true needs norm_class_name 'RMSNorm'"),
    (dict(intermediate_size=None), "GemmaMLP needs an explicit intermediate_size"),
    (dict(sliding_window_size="4"), "sliding_window_size='4' must be a positive number"),  # (a quoted YAML value)
    (dict(sliding_window_size=True), "sliding_window_size=True must be a positive number"),
    (dict(sliding_window_indices=[True, False, True, False]), "each 0 or 1"),
    (dict(sliding_window_indices=[0, 0, 0, 0]), "sliding_window_indices has no 1"),
    (dict(rope_adjustments={"factor": 8.0, "low_freq_factor": 1.0}), r"rope_adjustments=.* must be null, \{factor\}"),
    (dict(rope_adjustments={"factor": 0}), "with positive numbers"),
    (dict(mlp_class_name="GemmaMlp"), "mlp_class_name='GemmaMlp' is none of 'GptNeoxMLP', 'LLaMAMLP', 'GemmaMLP'"),
])
def test_inconsistent_configs_are_refused_naming_the_field(change, message):
    fields = dict(name="t", n_layer=4, n_embd=32, n_head=4, vocab_size=64, block_size=32, bias=False,
                  norm_class_name="RMSNorm", norm_unit_offset=True, mlp_class_name="GemmaMLP", intermediate_size=48,
                  sliding_window_size=4, sliding_window_indices=[1, 0, 1, 0])
    with pytest.raises(ValueError, match=message):
        Config(**{**fields, **change})


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (transformers' deprecations that PEFT's code triggers)
def test_peft_lora_imports_and_exports_with_peft_logits(converted, tmp_path):
    pytest.importorskip("peft")
    from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter
    from lit_gpt.merge import load_finetuned
    from test_peft_format import hf_export, logits, peft_model, save_peft

    base, folder = converted["gemma2"]
    peft, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    expected = logits(peft)
    assert (expected - logits(base)).abs().max() > 1e-2
    adapter = import_peft_adapter(peft_dir, folder, tmp_path / "imported.safetensors")
    torch.testing.assert_close(logits(load_finetuned(folder, adapter)), expected, **TOL)

    # the other way, with Gemma 2's four norms per block trained in full (PEFT's modules_to_save)
    model = GPT.from_checkpoint(folder).eval()
    apply_adapters(model, AdapterConfig(method="lora", r=4, alpha=6.0, targets=["all-linear"],
                                        train_modules=["norms"]))
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        model.transformer.h[1].post_mlp_norm.weight.add_(0.5)
    lit = logits(model)
    out = export_peft_adapter(save_adapters(model, tmp_path / "a.safetensors"), folder, tmp_path / "peft_export")
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert any("post_feedforward_layernorm".endswith(name) for name in saved), saved
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), lit, **TOL)


@pytest.mark.parametrize("method,opts", [("ether", {"nb": 4}), ("etherplusHH", {"nb": 4}),
                                         ("oft", {"nb": 4}), ("lora", {"r": 3})])
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_adapters_merge_and_train(converted, model_type, method, opts):
    """Every method on every linear layer of a Gemma 2/3: the merged model computes the adapted one's logits, and a
    step's gradient reaches the adapters through soft-capped, windowed attention."""
    base = GPT.from_checkpoint(converted[model_type][1]).eval()
    model = copy.deepcopy(base)
    apply_adapters(model, AdapterConfig(method=method, targets=["all-linear"], **opts))
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        adapted = model(IDX)
    assert (adapted - base(IDX)).abs().max() > 1e-3
    merged = merge_adapters(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX), adapted, atol=1e-5 * adapted.abs().max().item(), rtol=0)
    model.train()
    loss = model(IDX, labels=IDX)
    torch.testing.assert_close(loss, F.cross_entropy(adapted[:, :-1].flatten(0, 1), IDX[:, 1:].flatten()), **TOL)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert sum(p.grad.abs().sum() for p in trained) > 0


# the parameter counts Google publishes (model cards) and transformers' models of the same configs give
PUBLISHED = {"gemma-2b": 2_506_172_416, "gemma-7b": 8_537_680_896, "gemma-2-2b": 2_614_341_888,
             "gemma-2-9b": 9_241_705_984, "gemma-2-27b": 27_227_128_320, "gemma-3-1b-pt": 999_885_952}


@pytest.mark.parametrize("name", [*PUBLISHED, "gemma-3-4b-pt", "gemma-3-12b-pt", "gemma-3-27b-pt"])
def test_named_configs_have_transformers_and_the_published_parameter_count(name):
    """(The multimodal Gemma 3 sizes' published counts include their vision towers: their text models are checked
    against transformers' only.)"""
    c = Config.from_name(name)
    hf = config_to_hf(c)
    with torch.device("meta"):
        ours = GPT(c)
        theirs = AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
    assert type(theirs).__name__ == EXPORTED_CLASS[hf["model_type"]]
    count = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == count == PUBLISHED.get(name, count)
    it = name.removesuffix("-pt") + "-it"
    assert Config.from_name(it).to_dict() == {**c.to_dict(), "name": it, "hf_config": {**c.hf_config, "name": it}}


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """(a random tiny `Gemma3ForConditionalGeneration`, as the 4B, 12B and 27B come; its folder, converted)."""
    config = transformers.AutoConfig.for_model(
        "gemma3", text_config={**TINY, **FAMILIES["gemma3_text"]}, mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    assert any(k.startswith("model.vision_tower.") for k in hf.state_dict())
    folder = tmp_path_factory.mktemp("gemma3-mm") / "hf"
    hf.save_pretrained(folder)
    convert_hf_checkpoint(folder)
    return hf, folder


def test_multimodal_gemma3_imports_its_text_model(multimodal, tmp_path, capsys):
    """Its text model is converted, the vision tower and projector dropped with a note, and the logits of text-only
    inputs are the multimodal model's."""
    hf, _ = multimodal
    hf.save_pretrained(tmp_path / "hf")
    lit_config = convert_hf_checkpoint(tmp_path / "hf")
    assert "converted its text model" in capsys.readouterr().err
    text_only = config_from_hf(tiny("gemma3_text").config.to_dict(), name="hf")
    assert lit_config == Config(**{**text_only.to_dict(), "hf_config": {**text_only.hf_config, "multimodal": True}})
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    torch.testing.assert_close(lit_logits(model, IDX), hf_logits(hf, IDX), **TOL)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (transformers' deprecations that PEFT's code triggers)
@pytest.mark.parametrize("targets", [r".*language_model.*\.(q_proj|v_proj)", ["q_proj", "v_proj"]],
                         ids=["regex-on-the-text-model", "list-also-adapting-the-vision-tower"])
def test_peft_adapter_trained_on_a_multimodal_gemma3(multimodal, targets, tmp_path, capsys):
    """A PEFT LoRA trained on the multimodal model names its modules `model.language_model.layers...` (and, with a
    list of names, adapts the vision tower's q/v too): imported onto the text model's conversion, it gives the
    multimodal PeftModel's logits, the vision tower's tensors dropped with a note. Exported back, the adapter names
    the text model's transformers export as its base (PEFT would find none of its modules in the Hub model)."""
    pytest.importorskip("peft")
    from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter
    from lit_gpt.merge import load_finetuned
    from test_peft_format import hf_export, logits, peft_model, save_peft

    hf, folder = multimodal
    peft, peft_dir = save_peft(hf, tmp_path, r=4, lora_alpha=8, target_modules=targets)
    expected = logits(peft)
    adapter = import_peft_adapter(peft_dir, folder, tmp_path / "imported.safetensors")
    assert ("also adapts the vision tower" in capsys.readouterr().err) == isinstance(targets, list)
    torch.testing.assert_close(logits(load_finetuned(folder, adapter)), expected, **TOL)

    out = export_peft_adapter(adapter, folder, tmp_path / "peft_export")
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base.endswith("peft_export-base-hf")
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), expected, **TOL)


def test_hub_style_multimodal_config_gives_the_named_config():
    """The config.json of google/gemma-3-4b-it lists only what differs from transformers' defaults in its
    text_config (heads, vocabulary, RoPE bases and the window pattern come from Gemma3TextConfig's defaults)."""
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model"}}
    ours = config_from_hf(hub, name="google/gemma-3-4b-it")
    assert ours == Config.from_name("gemma-3-4b-it")
    assert ours.hf_config == {"org": "google", "name": "gemma-3-4b-it", "multimodal": True}
    # transformers' reading of the same file: its text config alone is that text model, not a multimodal one
    theirs = transformers.AutoConfig.for_model(**{k: v for k, v in hub.items() if k != "architectures"}).text_config
    assert config_from_hf(theirs.to_dict(), name="google/gemma-3-4b-it") == Config(
        **{**ours.to_dict(), "hf_config": {"org": "google", "name": "gemma-3-4b-it"}})
    with pytest.raises(ConversionError, match="model_type 'gemma3' has no text_config object"):
        config_from_hf({"model_type": "gemma3"})


def test_a_named_config_with_fewer_blocks_keeps_its_window_pattern():
    """`Config.from_name(name, n_layer=2)` (a small model of the family, for tests and benchmarks) continues the
    named config's pattern of sliding-window blocks instead of failing on a list of the original length."""
    assert Config.from_name("gemma-2-9b", n_layer=3).sliding_window_indices == [1, 0, 1]
    assert Config.from_name("gemma-3-1b-it", n_layer=8).sliding_window_indices == [1, 1, 1, 1, 1, 0, 1, 1]
    assert Config.from_name("gemma-3-1b-it", n_layer=2, sliding_window_indices=[0, 1]).sliding_window_indices == [0, 1]
    assert Config.from_name("Mistral-7B-v0.1", n_layer=2).sliding_window_indices is None


def test_peft_norm_names_in_train_modules_mean_the_gemma_modules():
    """PEFT's modules_to_save names of Gemma 2/3's norms (`--*_train_modules post_attention_layernorm`) select the
    norms transformers' Gemma has under them: its post_attention_layernorm follows the attention; in every other
    family it is the pre-MLP norm, lit's norm_2."""
    from lit_gpt.adapters.base import train_module_names
    from lit_gpt.training import train_modules_from_flag

    with torch.device("meta"):
        gemma2 = GPT(Config.from_name("gemma-2-2b", n_layer=2))
        llama = GPT(Config.from_name("Llama-3.2-1B", n_layer=2))

    def trained(model, flag):
        return train_module_names(model, AdapterConfig(method="lora", train_modules=train_modules_from_flag(flag)))

    expected = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "norm_2",
                "post_feedforward_layernorm": "post_mlp_norm", "input_layernorm": "norm_1"}
    for flag, ours in expected.items():
        assert trained(gemma2, flag) == [f"transformer.h.{i}.{ours}" for i in range(2)], flag
    assert trained(llama, "post_attention_layernorm") == ["transformer.h.0.norm_2", "transformer.h.1.norm_2"]
    with pytest.raises(ValueError, match="'pre_feedforward_layernorm' matches no module of GPT"):
        trained(llama, "pre_feedforward_layernorm")
