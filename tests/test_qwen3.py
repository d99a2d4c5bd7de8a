"""Qwen3 (dense) against transformers' own `Qwen3ForCausalLM`: per-head RMSNorm on queries and keys before RoPE,
a head_dim other than hidden / heads, no QKV bias. Import, export, GGUF import and PEFT LoRA both ways, on a tiny
random model in float32; the named configs' sizes against transformers' parameter count."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.adapters import AdapterConfig, apply_adapters, merge_adapters, save_adapters  # noqa: E402
from lit_gpt.adapters.base import trained_modules  # noqa: E402
from lit_gpt.convert_hf import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    convert_hf_checkpoint,
    hf_to_lit_state_dict,
    lit_to_hf_state_dict,
)
import test_adapters  # noqa: E402
from test_convert_hf import (  # noqa: E402
    TOL, assert_decodes_like, exported, hf_logits, lit_logits, make_hf_model, save_hf)

try:  # (the GGUF tests need the gguf package; test_gguf skips the whole module without it)
    from test_gguf import byte_level_vocab  # noqa: F401 (a fixture)
except pytest.skip.Exception:
    byte_level_vocab = None
needs_gguf = pytest.mark.skipif(byte_level_vocab is None, reason="needs the gguf package")
one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors
randomize_adapters = test_adapters.randomize_adapters

# 16-wide heads in a 32-wide model of 4 heads: head_size != n_embd / n_head, as in Qwen3-0.6B, 4B and 32B
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=64, max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6)
IDX = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_qwen3(tied: bool = False, **kw):
    return make_hf_model("qwen3", **dict(TINY, tie_word_embeddings=tied, **kw))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers model, folder holding its files and their lit conversion), untied."""
    hf = tiny_qwen3()
    folder = tmp_path_factory.mktemp("qwen3") / "hf"
    save_hf(hf, folder, "safetensors")
    convert_hf_checkpoint(folder)
    return hf, folder


@pytest.mark.parametrize("tied", [False, True])
def test_import_kv_cache_and_export_match_transformers(tied, tmp_path):
    hf = tiny_qwen3(tied)
    save_hf(hf, tmp_path / "hf", "safetensors")
    config = convert_hf_checkpoint(tmp_path / "hf")
    assert (config.norm_qk, config.head_size, config.tie_embeddings) == (True, 16, tied)
    assert (config.bias, config.attn_bias, config.n_query_groups, config.rope_base) == (False, False, 2, 1e6)
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    assert model.transformer.h[0].attn.norm_q.weight.shape == (16,)
    expected = hf_logits(hf, IDX)
    torch.testing.assert_close(lit_logits(model, IDX), expected, **TOL)

    # decoding with the KV cache (which holds normed, rotated keys): a prefill, then one token at a time
    assert_decodes_like(model, IDX, expected, prefill=9)
    back = exported(tmp_path / "hf", tmp_path / "export")
    assert type(back).__name__ == "Qwen3ForCausalLM" and back.config.head_dim == 16
    torch.testing.assert_close(hf_logits(back, IDX), expected, **TOL)


def test_state_dict_round_trip_reproduces_the_hf_tensors(converted):
    """hf -> lit -> hf gives back exactly the tensors transformers wrote, q_norm/k_norm names included."""
    hf, folder = converted
    hf_sd = hf.state_dict()
    config = config_from_hf(hf.config.to_dict())
    lit_sd = hf_to_lit_state_dict(hf_sd, config)
    assert torch.equal(lit_sd["transformer.h.1.attn.norm_k.weight"], hf_sd["model.layers.1.self_attn.k_norm.weight"])
    back = lit_to_hf_state_dict(lit_sd, config)
    assert sorted(back) == sorted(hf_sd)
    for k in hf_sd:
        assert torch.equal(back[k], hf_sd[k]), k


def test_what_lit_gpt_cannot_express_is_refused():
    from lit_gpt.convert_hf import ConversionError

    hf = {**TINY, "model_type": "qwen3", "attention_bias": True}
    with pytest.raises(ConversionError, match="attention_bias=true"):
        config_from_hf(hf)
    c = config_from_hf({**TINY, "model_type": "qwen3"})
    # transformers' Qwen3Config default head_dim is 128, not hidden / heads
    no_head_dim = {k: v for k, v in TINY.items() if k != "head_dim"}
    assert config_from_hf({**no_head_dim, "model_type": "qwen3"}).head_size == 128
    with pytest.raises(ConversionError, match="norm_qk=True"):
        config_to_hf(Config(**{**c.to_dict(), "mlp_class_name": "GptNeoxMLP", "intermediate_size": 48}))


@needs_gguf
def test_gguf_import_equals_the_hf_conversion(converted, tmp_path, byte_level_vocab):
    from test_gguf import import_and_compare, tokenizer_metadata

    tokens, merges = byte_level_vocab
    hf = tiny_qwen3(tied=True, vocab_size=len(tokens))
    config, model = import_and_compare(tmp_path, hf, "qwen3", tokenizer_metadata(tokens, merges, pre="qwen2"))
    assert (config.norm_qk, config.head_size, config.tie_embeddings) == (True, 16, True)
    expected = hf_to_lit_state_dict(hf.state_dict(), config_from_hf(hf.config.to_dict()))
    ours = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(ours[k], v), k


@needs_gguf
def test_gguf_qwen3_file_without_its_query_key_norms_is_refused(tmp_path, byte_level_vocab):
    from lit_gpt.gguf import GGUFImportError, convert_gguf
    from test_gguf import gguf_tensors_from_hf, model_metadata, tokenizer_metadata, write_gguf

    tokens, merges = byte_level_vocab
    hf = tiny_qwen3(vocab_size=len(tokens))
    tensors = {k: v for k, v in gguf_tensors_from_hf(hf, "qwen3").items() if "attn_q_norm" not in k}
    path = write_gguf(tmp_path / "q.gguf", "qwen3", {**model_metadata(hf.config, "qwen3"),
                                                     **tokenizer_metadata(tokens, merges, pre="qwen2")}, tensors)
    with pytest.raises(GGUFImportError, match=r"lacks tensors for \['transformer\.h\.0\.attn\.norm_q\.weight'"):
        convert_gguf(path, tmp_path / "ckpt")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (transformers' deprecations that PEFT's code triggers)
def test_peft_lora_imports_and_exports_with_peft_logits(converted, tmp_path):
    pytest.importorskip("peft")
    from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter
    from lit_gpt.merge import load_finetuned
    from test_peft_format import hf_export, logits, peft_model, save_peft

    base, folder = converted
    peft, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    expected = logits(peft)
    assert (expected - logits(base)).abs().max() > 1e-2
    adapter = import_peft_adapter(peft_dir, folder, tmp_path / "imported.safetensors")
    torch.testing.assert_close(logits(load_finetuned(folder, adapter)), expected, **TOL)

    # the other way, with the per-head norms trained in full: PEFT's modules_to_save
    model = GPT.from_checkpoint(folder).eval()
    apply_adapters(model, AdapterConfig(method="lora", r=4, alpha=6.0, targets=["query", "key", "value", "projection"],
                                        train_modules=["norms"]))
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        model.transformer.h[0].attn.norm_q.weight.mul_(1.5)
    lit = logits(model)
    out = export_peft_adapter(save_adapters(model, tmp_path / "a.safetensors"), folder, tmp_path / "peft_export")
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert any("q_norm".endswith(name) for name in saved), saved
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), lit, **TOL)


@pytest.mark.parametrize("method,opts", [("ether", {"nb": 4}), ("etherplus", {"nb": 4, "flip_side": True}),
                                         ("oft", {"nb": 4}), ("lora", {"r": 3})])
def test_adapters_on_qkv_merge_and_train_the_per_head_norms(converted, method, opts):
    base = GPT.from_checkpoint(converted[1]).eval()
    model = copy.deepcopy(base)
    apply_adapters(model, AdapterConfig(method=method, targets=["query", "key", "value"], train_modules=["norms"],
                                        **opts))
    trained = {name for name, _ in trained_modules(model)}
    assert {"transformer.h.0.attn.norm_q", "transformer.h.1.attn.norm_k", "transformer.h.0.norm_1"} <= trained
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        adapted = model(IDX)
    assert (adapted - base(IDX)).abs().max() > 1e-3
    merged = merge_adapters(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX), adapted, atol=1e-5 * adapted.abs().max().item(), rtol=0)
    model.train()
    F.cross_entropy(model(IDX).flatten(0, 1), IDX.flatten()).backward()
    norm_k = model.transformer.h[1].attn.norm_k.weight
    assert norm_k.requires_grad and norm_k.grad is not None and norm_k.grad.abs().sum() > 0


def test_named_config_has_transformers_parameter_count():
    """Qwen3-8B (untied, head_dim 128 = 4096 / 32); every other size was checked the same way by hand."""
    c = Config.from_name("Qwen3-8B")
    hf_config = transformers.Qwen3Config(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
        head_dim=c.head_size, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, rope_parameters=dict(rope_type="default", rope_theta=c.rope_base),
    )
    with torch.device("meta"):
        ours, theirs = GPT(c), transformers.Qwen3ForCausalLM(hf_config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 8_190_735_360
    assert config_to_hf(c)["model_type"] == "qwen3"

