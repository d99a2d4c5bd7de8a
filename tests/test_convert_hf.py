"""HF transformers <-> lit conversion, checked against transformers' own models.

Every family is built as a small random transformers model, saved the way the Hub stores it, converted with the same
`main` the CLI runs, loaded with `GPT.from_checkpoint` and compared on logits; the export is then loaded back with
`AutoModelForCausalLM.from_pretrained` and compared again.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as load_safetensors

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.convert_hf import (  # noqa: E402
    ConversionError,
    config_from_hf,
    config_to_hf,
    convert_hf_checkpoint,
    convert_lit_checkpoint,
    hf_to_lit_state_dict,
    lit_to_hf_state_dict,
)
from lit_gpt.utils import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
TOL = dict(atol=1e-5, rtol=1e-5)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_hf_script = load_script("convert_hf_checkpoint")
convert_lit_script = load_script("convert_lit_checkpoint")

_LLAMA = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
    max_position_embeddings=64, rms_norm_eps=1e-5,
)
_PHI3_TOKENS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)  # (Phi3Config's own are past a tiny vocabulary)
# the smallest tokenizer.json the tokenizers library loads: an export loads the tokenizer before it copies it
TOKENIZER_JSON = '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}'
_SMOLLM3_TOKENS = _PHI3_TOKENS  # (SmolLM3Config's too)
# (model_type, HF config kwargs, transformers class, lit fields the conversion must produce)
FAMILIES = {
    "llama": ("llama", dict(_LLAMA, num_key_value_heads=4), "LlamaForCausalLM", dict(tie_embeddings=False)),
    "llama_tied": ("llama", dict(_LLAMA, tie_word_embeddings=True), "LlamaForCausalLM", dict(tie_embeddings=True)),
    "llama_bias": (
        "llama", dict(_LLAMA, attention_bias=True, mlp_bias=True), "LlamaForCausalLM", dict(bias=True, attn_bias=True)
    ),
    "llama3_rope": (
        "llama",
        dict(
            _LLAMA, num_key_value_heads=2, max_position_embeddings=256,
            # original length 64 with head_size 16 puts RoPE frequencies in all three llama3 bands
            rope_parameters=dict(
                rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        "LlamaForCausalLM",
        dict(rope_adjustments=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)),
    ),
    # head_dim != hidden_size / num_attention_heads (as Mistral-Nemo's 128 with 5120 / 32): the attention scale,
    # the RoPE width and the q/k/v/proj widths must all come from head_dim
    "llama_head_dim": (
        "llama", dict(_LLAMA, num_key_value_heads=2, head_dim=24), "LlamaForCausalLM", dict(head_size=24),
    ),
    "mistral_head_dim": (
        "mistral", dict(_LLAMA, num_attention_heads=8, num_key_value_heads=4, head_dim=12, sliding_window=None),
        "LlamaForCausalLM", dict(head_size=12, n_head=8, n_query_groups=4),
    ),
    "mistral_gqa": (
        "mistral", dict(_LLAMA, num_key_value_heads=2, sliding_window=16, max_position_embeddings=64),
        "MistralForCausalLM", dict(n_query_groups=2, block_size=64, sliding_window_size=16),
    ),
    "qwen2_qkv_bias": (
        "qwen2", dict(_LLAMA, num_key_value_heads=2, rope_theta=1e6), "Qwen2ForCausalLM",
        dict(bias=False, attn_bias=True, rope_base=1e6),
    ),
    # Phi-3 / Phi-4: q/k/v in one qkv_proj, gate and up in one gate_up_proj; exported as the Llama it computes,
    # unless it rotates part of each head only (Phi-4-mini's 0.75)
    "phi3": ("phi3", dict(_LLAMA, **_PHI3_TOKENS, num_key_value_heads=2), "LlamaForCausalLM",
             dict(n_query_groups=2)),
    "phi3_partial": (
        "phi3", dict(_LLAMA, **_PHI3_TOKENS, num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=16,
                     max_position_embeddings=64),
        "Phi3ForCausalLM", dict(rotary_percentage=0.5, block_size=64, sliding_window_size=16),
    ),
    # SmolLM3: Llama with no position embedding (NoPE) in some blocks: every second one here, or a list
    "smollm3": ("smollm3", dict(_LLAMA, **_SMOLLM3_TOKENS, num_hidden_layers=4, no_rope_layer_interval=2),
                "SmolLM3ForCausalLM", dict(rope_indices=[1, 0, 1, 0], tie_embeddings=True, rope_base=2e6)),
    "smollm3_list": ("smollm3", dict(_LLAMA, **_SMOLLM3_TOKENS, num_hidden_layers=3, no_rope_layers=[0, 1, 1],
                                     tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
                     "SmolLM3ForCausalLM", dict(rope_indices=[0, 1, 1], tie_embeddings=False, bias=True)),
    # OLMo 2: norms after the attention and the MLP only, query/key norms over all the heads; OLMo 3 adds a window
    # in three blocks of four, whose RoPE base may differ
    "olmo2": ("olmo2", dict(_LLAMA, **_PHI3_TOKENS, num_key_value_heads=2), "Olmo2ForCausalLM",
              dict(pre_norms=False, post_attention_norm=True, post_mlp_norm=True, norm_qk=True, norm_qk_type="all")),
    "olmo3": ("olmo3", dict(_LLAMA, **_PHI3_TOKENS, num_hidden_layers=4, sliding_window=6, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}), "Olmo3ForCausalLM",
        dict(pre_norms=False, sliding_window_size=6, sliding_window_indices=[1, 1, 1, 0], rope_base=10000.0,
             rope_local_base_freq=500.0)),
    # Granite: embeddings, residual branches, attention scores and logits scaled by constants of its config
    "granite": ("granite", dict(_LLAMA, num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                                attention_multiplier=0.0625, logits_scaling=8.0), "GraniteForCausalLM",
                dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_scale=0.0625, logits_scaling=8.0)),
    "granite_bias_tied": ("granite", dict(_LLAMA, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                          embedding_multiplier=4.0, attention_multiplier=0.25),
                          "GraniteForCausalLM", dict(bias=True, tie_embeddings=True, residual_multiplier=None,
                                                     logits_scaling=None, attention_scale=None)),
    # mixtures of experts: a router and SwiGLU experts in every block, Qwen3-MoE's narrower than intermediate_size
    "mixtral": (
        "mixtral", dict(_LLAMA, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "MixtralForCausalLM", dict(mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2, rope_base=1e6),
    ),
    "qwen3_moe": (
        "qwen3_moe", dict(_LLAMA, num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
                          norm_topk_prob=True, head_dim=16),
        "Qwen3MoeForCausalLM", dict(n_expert=6, n_expert_per_token=3, moe_intermediate_size=40, moe_norm_topk=True,
                                    norm_qk=True, head_size=16),
    ),
    "qwen2_moe": (
        "qwen2_moe", dict(_LLAMA, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                          shared_expert_intermediate_size=56),
        "Qwen2MoeForCausalLM", dict(n_expert=6, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                                    moe_norm_topk=False, attn_bias=True, bias=False),
    ),
    "phi": (
        "phi",
        dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            partial_rotary_factor=0.5, max_position_embeddings=64,
        ),
        "PhiForCausalLM",
        dict(rotary_percentage=0.5, lm_head_bias=True, shared_attention_norm=True, gelu_approximate="tanh"),
    ),
    "gpt2": (
        "gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0),
        "GPT2LMHeadModel", dict(pos_embedding="learned", block_size=32, tie_embeddings=True),
    ),
    "gpt_neox": (
        "gpt_neox",
        dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            rotary_pct=0.25, max_position_embeddings=64,
        ),
        "GPTNeoXForCausalLM", dict(rotary_percentage=0.25, parallel_residual=True, gelu_approximate="none"),
    ),
    "gpt_neox_sequential": (
        "gpt_neox",
        dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            rotary_pct=0.5, max_position_embeddings=64, use_parallel_residual=False, hidden_act="gelu_new",
        ),
        "GPTNeoXForCausalLM", dict(parallel_residual=False, gelu_approximate="tanh"),
    ),
}


def make_hf_model(model_type: str, seed: int = 0, **kwargs):
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    # transformers initialises biases to zero and norms to one: randomise everything so a misplaced bias, norm or
    # transposition changes the logits
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def save_hf(model, path: Path, mode: str) -> None:
    if mode == "safetensors":
        model.save_pretrained(path)
    elif mode == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file()
    elif mode == "bin":
        # a transformers-4 style `pytorch_model.bin` with the legacy layout of the Hub's gpt2 files: no
        # "transformer." prefix and the causal-mask buffers stored as tensors
        model.config.save_pretrained(path)
        sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        n = model.config.n_positions
        for i in range(model.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, path / "pytorch_model.bin")
    else:
        raise ValueError(mode)


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def lit_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


def assert_decodes_like(model: GPT, idx: torch.Tensor, expected: torch.Tensor, prefill: int) -> None:
    """Decoding with the KV cache, a prefill of `prefill` tokens and then one token at a time, gives `expected` (the
    logits of the whole sequence at once)."""
    model.set_kv_cache(batch_size=idx.size(0), max_seq_length=idx.size(1) + 4)
    with torch.no_grad():
        steps = [model(idx[:, :prefill], input_pos=torch.arange(prefill))]
        steps += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(prefill, idx.size(1))]
    model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)


def exported(checkpoint_dir: Path, out: Path):
    """The transformers model scripts/convert_lit_checkpoint.py writes for `checkpoint_dir`, loaded (eager)."""
    convert_lit_checkpoint(checkpoint_dir, out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()


SAVE_MODE = {"gpt2": "bin", "qwen2_qkv_bias": "sharded"}


def test_defaults_for_keys_a_config_json_leaves_out_are_transformers_own():
    """An older or hand-written config.json may omit a key: the conversion then assumes what transformers' config
    class assumes (its constructor's default; RoPE's base and fraction, which transformers 5 keeps in
    rope_parameters, from a default instance)."""
    import inspect

    from lit_gpt.convert_hf import _HF_DEFAULTS

    for model_type, defaults in _HF_DEFAULTS.items():
        instance = AutoConfig.for_model(model_type)
        signature = inspect.signature(type(instance).__init__).parameters
        rope = getattr(instance, "rope_parameters", None) or {}
        # Gemma 3's and OLMo 3's RoPE: per layer type (Gemma 3's window pattern a kwarg of __post_init__)
        if "full_attention" in rope:
            rope = dict(rope_theta=rope["full_attention"]["rope_theta"],
                        rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                        sliding_window_pattern=getattr(instance, "_sliding_window_pattern", None))
        for key, ours in defaults.items():
            if key in signature:
                theirs = signature[key].default
            else:
                theirs = rope[{"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"}.get(key, key)]
            assert ours == theirs, (model_type, key, ours, theirs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_and_export_match_transformers(family, tmp_path):
    model_type, kwargs, export_class, expected_fields = FAMILIES[family]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "export"
    save_hf(hf_model, hf_dir, SAVE_MODE.get(family, "safetensors"))

    convert_hf_script.main(checkpoint_dir=hf_dir)
    config = Config.from_checkpoint(hf_dir)
    for field, value in expected_fields.items():
        assert getattr(config, field) == value, field
    model = GPT.from_checkpoint(hf_dir).eval()
    assert next(model.parameters()).dtype == torch.float32
    idx = torch.randint(0, VOCAB, (2, min(16, config.block_size)), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf_model, idx)
    torch.testing.assert_close(lit_logits(model, idx), expected, **TOL)

    convert_lit_script.main(checkpoint_dir=hf_dir, output_dir=out_dir)
    exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(exported).__name__ == export_class
    torch.testing.assert_close(hf_logits(exported, idx), expected, **TOL)


def test_llama3_rope_scaling_changes_the_logits(tmp_path):
    """Guards the llama3 case above from passing vacuously: without the adjustments the logits must differ."""
    model_type, kwargs, _, _ = FAMILIES["llama3_rope"]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_model.save_pretrained(tmp_path)
    convert_hf_checkpoint(tmp_path)
    config = Config.from_checkpoint(tmp_path)
    plain = GPT(Config(**{**config.to_dict(), "rope_adjustments": None}))
    plain.load_state_dict(GPT.from_checkpoint(tmp_path).state_dict())
    idx = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    assert (lit_logits(plain.eval(), idx) - hf_logits(hf_model, idx)).abs().max() > 1e-3


def test_smollm3_blocks_without_rope_change_the_logits(tmp_path):
    """Guards the SmolLM3 cases above from passing vacuously: with RoPE in every block the logits must differ."""
    model_type, kwargs, _, _ = FAMILIES["smollm3"]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_model.save_pretrained(tmp_path)
    config = convert_hf_checkpoint(tmp_path)
    everywhere = GPT(Config(**{**config.to_dict(), "rope_indices": None}))
    everywhere.load_state_dict(GPT.from_checkpoint(tmp_path).state_dict())
    idx = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    assert (lit_logits(everywhere.eval(), idx) - hf_logits(hf_model, idx)).abs().max() > 1e-3


@pytest.mark.parametrize("model_type,kwargs,exported_class", [
    ("mistral", dict(sliding_window=6), "MistralForCausalLM"),
    ("phi3", dict(**_PHI3_TOKENS, sliding_window=6), "MistralForCausalLM"),
    ("phi3", dict(**_PHI3_TOKENS, sliding_window=6, partial_rotary_factor=0.5), "Phi3ForCausalLM"),
    # the windows in blocks 1 and up only (max_window_layers), as Qwen's configs have them
    ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1), "Qwen2ForCausalLM"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, head_dim=16), "Qwen3ForCausalLM"),
    # (SmolLM3's default: the window in its NoPE blocks, here block 1)
    ("smollm3", dict(_SMOLLM3_TOKENS, use_sliding_window=True, sliding_window=6, no_rope_layer_interval=2),
     "SmolLM3ForCausalLM"),
    ("olmo3", dict(_PHI3_TOKENS, sliding_window=6, layer_types=["full_attention", "sliding_attention"]),
     "Olmo3ForCausalLM"),
], ids=["mistral", "phi3", "phi3_partial", "qwen2", "qwen3", "smollm3", "olmo3"])
def test_sliding_windows_are_kept_through_import_decoding_and_export(model_type, kwargs, exported_class, tmp_path):
    """A 6-token window against 20-token inputs: the whole context stays usable, with transformers' logits past the
    window, through a KV-cache decode, and in the exported model."""
    hf_model = make_hf_model(model_type, **dict(_LLAMA, num_key_value_heads=2, max_position_embeddings=64, **kwargs))
    hf_model.save_pretrained(tmp_path / "hf")
    config = convert_hf_checkpoint(tmp_path / "hf")
    assert (config.block_size, config.sliding_window_size) == (64, 6)
    assert config.sliding_window_indices == ([0, 1] if model_type.startswith(("qwen", "smollm3", "olmo3")) else None)
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(hf_model, idx)
    torch.testing.assert_close(lit_logits(model, idx), expected, **TOL)
    full = GPT(Config(**{**config.to_dict(), "sliding_window_size": None, "sliding_window_indices": None}))
    full.load_state_dict(model.state_dict())
    assert (lit_logits(full.eval(), idx) - expected).abs().max() > 1e-3  # the window matters here
    assert_decodes_like(model, idx, expected, prefill=4)
    back = exported(tmp_path / "hf", tmp_path / "export")
    assert type(back).__name__ == exported_class
    torch.testing.assert_close(hf_logits(back, idx), expected, **TOL)


def test_windows_transformers_cannot_export_are_refused():
    base = dict(name="t", n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32, bias=False,
                norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=48, sliding_window_size=4)
    config_to_hf(Config(**base))  # Mistral's
    with pytest.raises(ConversionError, match="sliding_window_indices .transformers' mistral has the window in every"):
        config_to_hf(Config(**base, sliding_window_indices=[0, 1]))
    with pytest.raises(ConversionError, match="a bias .on every linear layer"):
        config_to_hf(Config(**{**base, "bias": True}))
    with pytest.raises(ConversionError, match="sliding_window_size .transformers' gpt_neox has no sliding window"):
        config_to_hf(Config(**{**base, "norm_class_name": "LayerNorm", "mlp_class_name": "GptNeoxMLP", "bias": True,
                               "parallel_residual": True}))


@pytest.mark.parametrize("family", ["llama3_rope", "qwen2_qkv_bias", "phi", "phi3_partial", "gpt2", "gpt_neox",
                                    "mixtral", "qwen3_moe", "qwen2_moe"])
def test_state_dict_round_trip_reproduces_the_hf_files(family, tmp_path):
    """hf -> lit -> hf gives back exactly the tensors transformers wrote, names included."""
    model_type, kwargs, _, _ = FAMILIES[family]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_model.save_pretrained(tmp_path)
    hf_sd = load_safetensors(tmp_path / "model.safetensors")
    config = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    lit_sd = hf_to_lit_state_dict(hf_sd, config)
    back = lit_to_hf_state_dict(lit_sd, config, config_to_hf(config)["model_type"])
    assert sorted(back) == sorted(hf_sd)
    for k in hf_sd:
        torch.testing.assert_close(back[k], hf_sd[k], atol=0, rtol=0)


def test_dtype_and_sharded_export(tmp_path):
    model_type, kwargs, _, _ = FAMILIES["llama"]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    convert_hf_checkpoint(hf_dir, dtype="bfloat16")
    assert {v.dtype for v in load_file(hf_dir / "lit_model.pth").values()} == {torch.bfloat16}

    out = convert_lit_checkpoint(hf_dir, tmp_path / "out", dtype="float32", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    lit = GPT.from_checkpoint(hf_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(exported, idx), lit_logits(lit, idx), **TOL)
    # converting the export back keeps the model's name (what adapters record as their base), not the folder's
    convert_hf_checkpoint(out)
    assert Config.from_checkpoint(out).name == Config.from_checkpoint(hf_dir).name == "hf"
    # without --dtype the export keeps lit_model.pth's (bfloat16 here), as --help says
    kept = convert_lit_checkpoint(hf_dir, tmp_path / "kept")
    assert json.loads((kept / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v.dtype for v in load_safetensors(kept / "model.safetensors").values()} == {torch.bfloat16}


def test_sharded_export_fills_each_shard_as_huggingface_hub_does(tmp_path):
    """Each weight file is filled up to the shard limit before the next one starts, as transformers' save_pretrained
    (huggingface_hub's split_torch_state_dict_into_shards) fills them; a count that never restarted would write a 7B
    export with 5 GB shards as one full file and then one file per tensor. The limit is above the largest tensor,
    where the Hub's split is a plain greedy fill of the tensors in the order they are written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    model_type, kwargs, _, _ = FAMILIES["llama"]
    hf_dir = tmp_path / "hf"
    make_hf_model(model_type, **kwargs).save_pretrained(hf_dir)
    convert_hf_checkpoint(hf_dir)
    limit = 50_000
    out = convert_lit_checkpoint(hf_dir, tmp_path / "out", max_shard_bytes=limit)
    # the export's tensors in the order it converts (and writes) them
    written = lit_to_hf_state_dict(load_file(hf_dir / "lit_model.pth"), Config.from_checkpoint(hf_dir))
    assert max(t.numel() * t.element_size() for t in written.values()) < limit
    ref = split_torch_state_dict_into_shards(written, max_shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(ref.filename_to_tensors) > 2
    assert index["weight_map"] == ref.tensor_to_filename
    assert index["metadata"]["total_size"] == ref.metadata["total_size"]
    for name, tensors in ref.filename_to_tensors.items():
        assert sorted(load_safetensors(out / name)) == sorted(tensors)


@pytest.mark.parametrize("first_shard_bytes, second_shard_bytes", [(None, 20_000), (20_000, None)],
                         ids=["single_then_sharded", "sharded_then_single"])
def test_export_into_an_earlier_export_loads_the_new_model(first_shard_bytes, second_shard_bytes, tmp_path,
                                                          capsys):
    """transformers reads model.safetensors before an index: files of the earlier export must not stay behind."""
    model_type, kwargs, _, _ = FAMILIES["llama"]
    dirs = []
    for seed in (0, 1):
        hf_dir = tmp_path / f"hf{seed}"
        make_hf_model(model_type, seed=seed, **kwargs).save_pretrained(hf_dir)
        convert_hf_checkpoint(hf_dir)
        dirs.append(hf_dir)
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "model.safetensors").write_text("not ours")  # not a weight file of this folder: kept
    (out / "model_backup.safetensors").write_text("not ours either")
    for hf_dir, shard_bytes in zip(dirs, (first_shard_bytes, second_shard_bytes)):
        convert_lit_checkpoint(hf_dir, out, dtype="float32", **({"max_shard_bytes": shard_bytes} if shard_bytes
                                                                   else {}))
    (removed,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Removed ")]
    sharded = second_shard_bytes is not None
    assert "earlier export" in removed
    removed = removed.removeprefix("Removed ").split(" from ")[0].split(", ")
    if sharded:
        assert removed == ["model.safetensors"]
    else:
        assert len(removed) > 2 and set(removed) == {"model.safetensors.index.json"} | {
            n for n in removed if n.startswith("model-0") and n.endswith(".safetensors")}
    names = {p.name for p in out.iterdir()}
    assert ("model.safetensors" in names) != sharded and ("model.safetensors.index.json" in names) == sharded
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert {n for n in names if n.startswith("model-")} == set(index["weight_map"].values())
    else:
        assert not [n for n in names if n.startswith("model-")]
    assert (out / "notes" / "model.safetensors").is_file() and (out / "model_backup.safetensors").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    lit = GPT.from_checkpoint(dirs[1], dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(exported, idx), lit_logits(lit, idx), **TOL)


def stop_export_on_its_second_shard(checkpoint: Path, out: Path, monkeypatch) -> None:
    """An export of `checkpoint` into `out` in shards of 20 kB, stopped (Ctrl-C) while its second shard is written:
    what is left must not be loadable."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def ctrl_c_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", ctrl_c_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_lit_checkpoint(checkpoint, out, max_shard_bytes=20_000)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    with pytest.raises(OSError):  # refused, not loaded
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def export_again_and_compare(checkpoint: Path, out: Path) -> None:
    """The same command again completes the export, which computes the checkpoint's logits."""
    convert_lit_checkpoint(checkpoint, out, max_shard_bytes=20_000)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    lit = GPT.from_checkpoint(checkpoint, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(exported, idx), lit_logits(lit, idx), **TOL)


def test_interrupted_export_into_an_earlier_one_is_never_a_loadable_mix(tmp_path, monkeypatch):
    """Shards share their names from one export to the next: an export stopped after its first shard must not leave
    the earlier export's later shards and index beside it (transformers would load that mix without a word)."""
    model_type, kwargs, _, _ = FAMILIES["llama"]
    hf_dir = tmp_path / "hf"
    make_hf_model(model_type, **kwargs).save_pretrained(hf_dir)
    convert_hf_checkpoint(hf_dir)
    out = tmp_path / "out"
    convert_lit_checkpoint(hf_dir, out, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    # the same model after more training: every weight changed
    trained = tmp_path / "trained"
    make_hf_model(model_type, seed=1, **kwargs).save_pretrained(trained)
    convert_hf_checkpoint(trained)
    stop_export_on_its_second_shard(trained, out, monkeypatch)
    export_again_and_compare(trained, out)


def test_a_first_export_stopped_part_way_is_completed_by_the_same_command(tmp_path, monkeypatch):
    """config.json (which marks our export) came after the weights: a first export stopped after a shard left shards
    alone, and the rerun refused them as "a transformers model that is not an export of lit_gpt"."""
    model_type, kwargs, _, _ = FAMILIES["llama"]
    hf_dir = tmp_path / "hf"
    make_hf_model(model_type, **kwargs).save_pretrained(hf_dir)
    convert_hf_checkpoint(hf_dir)
    stop_export_on_its_second_shard(hf_dir, tmp_path / "out", monkeypatch)
    export_again_and_compare(hf_dir, tmp_path / "out")


def test_export_into_a_folder_of_another_transformers_model_is_refused(tmp_path):
    """An export replaces an earlier export's weight files; a download's (no lit_gpt name in its config.json) are
    the user's, and stay."""
    model_type, kwargs, _, _ = FAMILIES["llama"]
    hf_dir, download = tmp_path / "hf", tmp_path / "download"
    make_hf_model(model_type, **kwargs).save_pretrained(hf_dir)
    convert_hf_checkpoint(hf_dir)
    make_hf_model(model_type, seed=1, **kwargs).save_pretrained(download)
    before = {p.name: p.read_bytes() for p in download.iterdir()}
    with pytest.raises(ConversionError, match=r"holds a transformers model that is not an export of lit_gpt "
                                              r"\(model.safetensors\), .*: pick a new folder"):
        convert_lit_checkpoint(hf_dir, download)
    assert {p.name: p.read_bytes() for p in download.iterdir()} == before


def test_export_into_an_earlier_one_drops_its_tokenizer_files(tmp_path, capsys):
    """transformers prefers chat_template.jinja to tokenizer_config.json's template and still reads the legacy
    special-token files: an earlier export's must not stay beside the new model's tokenizer."""
    model_type, kwargs, _, _ = FAMILIES["llama"]
    hf_dir = tmp_path / "hf"
    make_hf_model(model_type, **kwargs).save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(TOKENIZER_JSON)
    (hf_dir / "tokenizer_config.json").write_text('{"chat_template": "NEW"}')
    convert_hf_checkpoint(hf_dir)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("chat_template.jinja", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"):
        (out / name).write_text("{}")  # as an export of another model left them
    (out / "README.md").write_text("the user's")
    convert_lit_checkpoint(hf_dir, out)
    (removed,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Removed ")]
    assert removed.startswith("Removed special_tokens_map.json, added_tokens.json, chat_template.jinja from ")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_text() == TOKENIZER_JSON

    # a checkpoint without a tokenizer of its own leaves the folder's alone (the export's warning says to copy them
    # there by hand)
    (hf_dir / "tokenizer.json").unlink()
    (out / "chat_template.jinja").write_text("{{ messages }}")
    convert_lit_checkpoint(hf_dir, out)
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()


def test_unindexed_weight_files_are_read_as_transformers_reads_them(tmp_path):
    from safetensors.torch import save_file

    model_type, kwargs, _, _ = FAMILIES["llama"]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    # what a Hub repo or an old download may hold next to model.safetensors: same tensor names, other values
    stale = {k: torch.ones_like(v) for k, v in load_safetensors(hf_dir / "model.safetensors").items()}
    save_file(stale, hf_dir / "model.fp16.safetensors")
    save_file({"base_model.model.lora_A.weight": torch.ones(2, 2)}, hf_dir / "adapter_model.safetensors")
    convert_hf_checkpoint(hf_dir)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    lit = GPT.from_checkpoint(hf_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(reference, idx), lit_logits(lit, idx), **TOL)

    # without model.safetensors or an index, two files holding one tensor are refused, naming both
    (hf_dir / "model.safetensors").rename(hf_dir / "a.safetensors")
    (hf_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(ConversionError) as e:
        convert_hf_checkpoint(hf_dir)
    message = str(e.value)
    assert "is in both" in message and "a.safetensors" in message and "model.fp16.safetensors" in message
    assert "\n" not in message


def converted_with_tokenizer_files(tmp_path: Path, family: str) -> Path:
    """A tiny transformers model of `family` with a tokenizer.json, tokenizer_config.json and generation_config.json,
    converted to a lit checkpoint in the same folder."""
    model_type, kwargs, _, _ = FAMILIES[family]
    hf_dir = tmp_path / "hf"
    make_hf_model(model_type, **kwargs).save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(TOKENIZER_JSON)
    (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (hf_dir / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.5}')
    convert_hf_checkpoint(hf_dir)
    return hf_dir


def test_export_copies_tokenizer_and_generation_files(tmp_path):
    hf_dir = converted_with_tokenizer_files(tmp_path, "llama_tied")
    out = convert_lit_checkpoint(hf_dir, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_text() == (hf_dir / name).read_text()
    exported = json.loads((out / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, 2)
    # a tied model stores the embedding once, as transformers does
    assert not any(k.startswith("lm_head") for k in load_safetensors(out / "model.safetensors"))
    # an ordinary file mode (safetensors writes its file as 0600 unless atomic_path fixes it)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_a_corrupt_tokenizer_file_stops_the_export_before_it_writes(name, tmp_path):
    """Before, a cut tokenizer file was copied into the export, which then reported success."""
    hf_dir = converted_with_tokenizer_files(tmp_path, "llama")
    text = (hf_dir / name).read_text()
    (hf_dir / name).write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=f"^{str(hf_dir / name)!r} ") as e:
        convert_lit_checkpoint(hf_dir, tmp_path / "out")
    assert str(e.value).endswith(("from the original model again.", "fix or delete the file."))
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("special_tokens_map.json", b'{"bos_token": "<s>"', "is not valid JSON"),
        ("added_tokens.json", b"[1, 2]", "must hold a JSON object"),
        ("vocab.json", b'{"a": 0,', "is not valid JSON"),
        ("chat_template.json", b"\xff\xfe{}", "is not valid JSON"),
        ("merges.txt", b"#version: 0.2\n\xe2\x96 a\n", "is not UTF-8 text"),
        ("chat_template.jinja", b"{% for m in messages %}{{ m.content }}", "the chat template does not parse as Jinja"),
        ("chat_template.jinja", b"\xff{{ messages }}", "is not UTF-8 text"),
    ],
)
def test_a_corrupt_tokenizer_side_file_stops_the_export_before_it_writes(name, content, expected, tmp_path):
    """The files the tokenizer itself does not read (special_tokens_map.json, added_tokens.json, vocab.json,
    merges.txt, chat templates) were copied into the export unread, corrupt or not."""
    hf_dir = converted_with_tokenizer_files(tmp_path, "llama")
    (hf_dir / name).write_bytes(content)
    with pytest.raises(ValueError) as e:
        convert_lit_checkpoint(hf_dir, tmp_path / "out")
    message = str(e.value)
    assert message.startswith(f"{str(hf_dir / name)!r}") and expected in message, message
    assert len(message.splitlines()) == 1 and not (tmp_path / "out").exists()
    # the same files, intact, are copied as they are
    (hf_dir / name).write_text('{"x": 1}' if name.endswith(".json") else "#version: 0.2\n")
    if name == "chat_template.jinja":
        (hf_dir / name).write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    out = convert_lit_checkpoint(hf_dir, tmp_path / "out")
    assert (out / name).read_bytes() == (hf_dir / name).read_bytes()


@pytest.mark.parametrize(
    "name, overrides, export_class",
    [
        # no output bias: transformers' Phi always has one, so the export writes zeros
        ("phi-2", dict(lm_head_bias=False), "PhiForCausalLM"),
        ("pythia-14m", dict(tie_embeddings=True), "GPTNeoXForCausalLM"),
        ("Qwen2.5-0.5B", dict(n_query_groups=2, intermediate_size=96), "Qwen2ForCausalLM"),
    ],
)
def test_export_of_lit_native_checkpoints(name, overrides, export_class, tmp_path):
    """Checkpoints that never were transformers models (trained or imported from GGUF) export exactly too."""
    from lit_gpt.utils import save_model_weights

    small = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=64)
    config = Config.from_name(name, **{**small, **overrides})
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    save_model_weights(model, tmp_path / "lit")
    config.save(tmp_path / "lit")
    out = convert_lit_checkpoint(tmp_path / "lit", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(exported).__name__ == export_class
    idx = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(hf_logits(exported, idx), lit_logits(model, idx), **TOL)


# ---------------------------------------------------------------------------------------------- clear errors
def test_missing_directory_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json.*download.py"):
        convert_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="llama", **_LLAMA)))
    with pytest.raises(FileNotFoundError, match=r"has no weights \(\*\.safetensors or pytorch_model\*\.bin\)"):
        convert_hf_checkpoint(tmp_path)


def test_unsupported_model_type_and_fields():
    with pytest.raises(ConversionError, match="model_type 'bert'.*supported model types are llama, mistral"):
        config_from_hf({"model_type": "bert", "hidden_size": 64})
    with pytest.raises(ConversionError, match="rope scaling type 'dynamic'"):
        config_from_hf(dict(_LLAMA, model_type="llama", rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
    # both spellings at once, disagreeing: which one transformers applies depends on its version
    with pytest.raises(ConversionError, match=r"both rope_scaling \(type 'linear'\) and rope_parameters \(type 'def"):
        config_from_hf(dict(_LLAMA, model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0},
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    agreeing = dict(_LLAMA, model_type="llama", rope_scaling={"type": "default"},
                    rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert config_from_hf(agreeing).rope_base == 500.0
    with pytest.raises(ConversionError, match="attention_bias=True but mlp_bias=False"):
        config_from_hf(dict(_LLAMA, model_type="llama", attention_bias=True))
    with pytest.raises(ConversionError, match="hidden_act='gelu'"):
        config_from_hf(dict(_LLAMA, model_type="llama", hidden_act="gelu"))
    with pytest.raises(ConversionError, match="qk_layernorm"):
        config_from_hf(dict(FAMILIES["phi"][1], model_type="phi", qk_layernorm=True))
    with pytest.raises(ConversionError, match="lacks the required field 'num_hidden_layers'"):
        config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(ConversionError, match="cannot be exported.*norm_class_name='LayerNorm'"):
        config_to_hf(Config(n_layer=1, n_embd=64, n_head=4, mlp_class_name="LLaMAMLP", intermediate_size=96,
                            norm_class_name="LayerNorm", bias=False))


def test_config_json_read_as_transformers_reads_it():
    """Fields transformers reads otherwise than their names suggest: Llama-like models rotate the whole head whatever
    partial_rotary_factor says (Phi honours it), "swish" is SiLU, and Mistral/Qwen2 default num_key_value_heads to
    8/32, not to the number of heads."""
    for model_type in ("llama", "mistral", "qwen2"):
        for spelling in (dict(partial_rotary_factor=0.5),
                         dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5))):
            config = config_from_hf(dict(_LLAMA, model_type=model_type, num_key_value_heads=2, **spelling))
            assert config.rotary_percentage == 1.0 and config.rope_n_elem == config.head_size, (model_type, spelling)
    assert config_from_hf(dict(FAMILIES["phi"][1], model_type="phi", partial_rotary_factor=0.4)).rotary_percentage \
        == 0.4
    assert config_from_hf(dict(_LLAMA, model_type="llama", hidden_act="swish")).mlp_class_name == "LLaMAMLP"
    for model_type, default in (("mistral", 8), ("qwen2", 32)):
        heads = dict(_LLAMA, model_type=model_type, num_attention_heads=default * 2, hidden_size=default * 2 * 4)
        assert config_from_hf(heads).n_query_groups == default
        with pytest.raises(ConversionError, match=f"num_attention_heads=4 and num_key_value_heads={default}, "
                                                  f"transformers' default for {model_type}: .*set num_key_value_h"):
            config_from_hf(dict(_LLAMA, model_type=model_type))
    with pytest.raises(ConversionError, match="num_attention_heads=4 and num_key_value_heads=3: "):
        config_from_hf(dict(_LLAMA, model_type="llama", num_key_value_heads=3))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", ["phi3", "phi3_partial"])
@pytest.mark.parametrize("kind", ["lora", "dora", "oft", "lora-rank-pattern"])
def test_peft_adapters_on_phi3s_fused_layers_import(family, kind, tmp_path):
    """PEFT's usual Phi-3 targets are its fused qkv_proj and gate_up_proj: the import splits such an adapter into
    adapters on the layers they fuse (rows of lora_B and of DoRA's magnitudes with the rows, transforms of the inputs
    copied), with PeftModel's logits; whether the checkpoint exports q/k/v apart (a llama) or fused (a Phi-3 rotating
    part of each head). An export back to the fused gate_up_proj is refused in one sentence."""
    import copy
    import warnings

    peft = pytest.importorskip("peft")
    from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter
    from lit_gpt.merge import load_finetuned
    from test_peft_format import logits, randomize_lora

    model_type, kwargs, _, _ = FAMILIES[family]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_model.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    targets = ["qkv_proj", "gate_up_proj", "down_proj"]
    # (rank_pattern: the fused layers' own ranks and scales, which the parts they are split into keep)
    patterns = dict(rank_pattern={"qkv_proj": 4}, alpha_pattern={"gate_up_proj": 3}) if kind.endswith("pattern") else {}
    config = (peft.OFTConfig(oft_block_size=8, r=0, target_modules=targets) if kind == "oft" else
              peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=kind == "dora", **patterns))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(copy.deepcopy(hf_model), config)
    randomize_lora(adapted, 3)
    with torch.no_grad():  # (OFT starts at the identity too: random skew blocks)
        for name, p in adapted.named_parameters():
            if "oft_R" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    adapted.save_pretrained(tmp_path / "peft")
    expected = logits(adapted.eval())
    assert (expected - logits(hf_model)).abs().max() > 1e-3
    path = import_peft_adapter(tmp_path / "peft", tmp_path / "hf", tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(load_finetuned(tmp_path / "hf", path)), expected, rtol=1e-4, atol=1e-4)
    if family == "phi3_partial":
        with pytest.raises(ValueError, match="fuses into one gate_up_proj, where a PEFT adapter would have to be one "
                                             "transform of both"):
            export_peft_adapter(path, tmp_path / "hf", tmp_path / "back")


def test_partial_rotary_factor_of_a_llama_computes_what_transformers_computes(tmp_path):
    hf_model = make_hf_model("llama", **dict(_LLAMA, num_key_value_heads=2, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)))
    hf_model.save_pretrained(tmp_path)
    convert_hf_checkpoint(tmp_path)
    idx = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lit_logits(GPT.from_checkpoint(tmp_path).eval(), idx), hf_logits(hf_model, idx), **TOL)


@pytest.mark.parametrize("model_type, kwargs", [("llama", dict(_LLAMA)), ("gpt2", FAMILIES["gpt2"][1])])
def test_a_tied_head_that_differs_from_the_embedding_is_kept_as_transformers_keeps_it(model_type, kwargs, tmp_path,
                                                                                       capsys):
    """A fine-tune that trained the output head on its own saves a config that still says tie_word_embeddings with
    a head of its own: transformers unties them and uses the stored head; so does the conversion, with a note. An
    equal copy is dropped (the checkpoint stays tied)."""
    from safetensors.torch import load_file as load_st, save_file

    hf_model = make_hf_model(model_type, **dict(kwargs, tie_word_embeddings=True))
    for name, differ in (("same", False), ("own", True)):
        folder = tmp_path / name
        hf_model.save_pretrained(folder)
        sd = load_st(folder / "model.safetensors")
        wte = next(v for k, v in sd.items() if k.endswith(("embed_tokens.weight", "wte.weight")))
        sd["lm_head.weight"] = wte + 0.5 if differ else wte.clone()
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
        capsys.readouterr()
        config = convert_hf_checkpoint(folder)
        assert config.tie_embeddings is not differ
        assert ("its lm_head.weight differs from the embedding" in capsys.readouterr().err) is differ
        idx = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(lit_logits(GPT.from_checkpoint(folder).eval(), idx), hf_logits(reference, idx),
                                   **TOL)


def test_configs_the_model_cannot_compute_are_refused_when_read(tmp_path):
    neox = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
                rotary_pct=0.25, max_position_embeddings=64)  # head 12 * 0.25: 3 rotary features
    with pytest.raises(ConversionError, match="config.json describes a model lit_gpt cannot build: .*gives 3 rotary "
                                              "features, but RoPE rotates pairs"):
        config_from_hf(dict(neox, model_type="gpt_neox"))
    with pytest.raises(ValueError, match="shared_attention_norm=true needs parallel_residual=true"):
        Config(n_layer=1, n_embd=32, n_head=4, shared_attention_norm=True, parallel_residual=False)
    fp8 = dict(_LLAMA, model_type="llama", quantization_config={"quant_method": "fp8", "weight_block_size": [8, 8]})
    with pytest.raises(ConversionError, match="quantization_config \\(quant_method 'fp8'\\): lit_gpt converts "
                                              "unquantized weights only; download the original"):
        config_from_hf(fp8)


@pytest.mark.parametrize("field, value, match", [
    ("rope_parameters", [1, 2], "'rope_parameters' must be an object or null, got \\[1, 2\\]"),
    ("rope_scaling", "linear", "'rope_scaling' must be an object or null, got 'linear'"),
    ("hidden_size", "sixty-four", "'hidden_size' must be an integer, got 'sixty-four'"),
    ("num_key_value_heads", 2.5, "'num_key_value_heads' must be an integer, got 2.5"),
    ("rms_norm_eps", "1e-5", "'rms_norm_eps' must be a number, got '1e-5'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, "'rope_scaling.factor' must be a number, got '8'"),
])
def test_config_values_of_the_wrong_type_name_the_field(field, value, match):
    """Hand-edited configs and other tools' configs: one sentence naming the field, not Python's own message."""
    with pytest.raises(ConversionError, match=f"^config.json field {match}\\.$"):
        config_from_hf(dict(_LLAMA, model_type="llama", **{field: value}))
    assert config_from_hf(dict(_LLAMA, model_type="llama", intermediate_size=96.0)).intermediate_size == 96


def test_bad_checkpoint_contents(tmp_path):
    model_type, kwargs, _, _ = FAMILIES["qwen2_qkv_bias"]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    config = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    sd = dict(hf_model.state_dict())

    with pytest.raises(ConversionError, match="Unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
        hf_to_lit_state_dict({**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, config)
    with pytest.raises(ConversionError, match=r"no k_proj.weight for layer 1"):
        hf_to_lit_state_dict({k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.weight"}, config)
    with pytest.raises(ConversionError, match="missing.*transformer.h.1.mlp.fc_1.weight"):
        hf_to_lit_state_dict({k: v for k, v in sd.items() if k != "model.layers.1.mlp.gate_proj.weight"}, config)
    wide = dict(sd, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(ConversionError, match=r"'transformer.ln_f.weight'.*shape \(65,\).*\(64,\)"):
        hf_to_lit_state_dict(wide, config)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(ConversionError, match=f"lists '{shard}', which is missing"):
        convert_hf_checkpoint(tmp_path)


def test_missing_and_extra_tensors_are_named_as_in_the_users_file(tmp_path):
    from safetensors.torch import save_file

    model_type, kwargs, _, _ = FAMILIES["mistral_gqa"]
    sd = {k: v.contiguous() for k, v in make_hf_model(model_type, **kwargs).state_dict().items()}
    AutoConfig.for_model(model_type, **kwargs).save_pretrained(tmp_path)
    del sd["model.layers.1.mlp.down_proj.weight"], sd["model.layers.0.self_attn.k_proj.weight"]
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match=r"no k_proj.weight for layer 0"):
        convert_hf_checkpoint(tmp_path)
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:32].clone()
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ConversionError) as e:
        convert_hf_checkpoint(tmp_path)
    assert "missing ['model.layers.1.mlp.down_proj.weight']" in str(e.value)
    assert "unexpected ['model.layers.0.self_attn.o_proj.bias']" in str(e.value)


def test_export_refuses_adapter_weights_and_its_own_directory(tmp_path):
    model_type, kwargs, _, _ = FAMILIES["llama"]
    make_hf_model(model_type, **kwargs).save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    with pytest.raises(ConversionError, match="is the checkpoint directory itself"):
        convert_lit_checkpoint(tmp_path / "hf", tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "lit_model.pth", mmap=False)  # not mmapped: the file is rewritten below
    sd["transformer.h.0.attn.qkv.adapter.u"] = torch.zeros(4)
    torch.save(sd, tmp_path / "hf" / "lit_model.pth")
    with pytest.raises(ConversionError, match="adapter weights: merge them"):
        convert_lit_checkpoint(tmp_path / "hf", tmp_path / "out")


@pytest.mark.slow
def test_cli_entry_points(tmp_path):
    """Both scripts run as `python scripts/x.py` (no install needed) and fail in one sentence, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, env=env,
            cwd=tmp_path, timeout=300,
        )

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = run("convert_hf_checkpoint.py", "--checkpoint_dir", str(empty))
    assert failed.returncode != 0
    assert "error:" in failed.stderr and "config.json" in failed.stderr and "Traceback" not in failed.stderr

    model_type, kwargs, _, _ = FAMILIES["gpt_neox"]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_model.save_pretrained(tmp_path / "hf")
    done = run("convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "hf"), "--model_name", "org/tiny-neox")
    assert done.returncode == 0, done.stderr
    assert Config.from_checkpoint(tmp_path / "hf").hf_config == {"org": "org", "name": "tiny-neox"}
    done = run(
        "convert_lit_checkpoint.py", "--checkpoint_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "out")
    )
    assert done.returncode == 0, done.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager")
    idx = torch.randint(0, VOCAB, (1, 10))
    torch.testing.assert_close(hf_logits(exported.eval(), idx), hf_logits(hf_model, idx), **TOL)


@pytest.mark.slow
def test_real_smollm2_weights_round_trip(smollm2_checkpoint, tmp_path):
    """Real weights at real size (SmolLM2-135M-Instruct: 30 layers, 9 heads in 3 KV groups, tied embeddings):
    export the lit checkpoint, load it with transformers, compare logits; import that folder back, compare again."""
    lit = GPT.from_checkpoint(smollm2_checkpoint, dtype=torch.float32).eval()
    out = convert_lit_checkpoint(smollm2_checkpoint, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, lit.config.padded_vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(reference, idx)
    torch.testing.assert_close(lit_logits(lit, idx), expected, atol=1e-4, rtol=1e-4)

    convert_hf_checkpoint(out)
    config = Config.from_checkpoint(out)
    assert arch_of(config) == arch_of(lit.config)
    reimported = GPT.from_checkpoint(out).eval()
    torch.testing.assert_close(lit_logits(reimported, idx), expected, atol=1e-4, rtol=1e-4)


def arch_of(config: Config) -> dict:
    d = config.to_dict()
    for field in ("name", "hf_config", "vocab_size", "padding_multiple"):
        d.pop(field)
    return d


@pytest.mark.parametrize("partial", [1.0, 0.5], ids=["phi3.5-like", "phi4-mini-like"])
def test_longrope_matches_transformers_short_long_decoding_and_export(partial, tmp_path):
    """LongRoPE (Phi-3.5-mini, Phi-4-mini): per-frequency short factors while a forward's last position is within the
    original context (16 here), long ones past it, cos and sin scaled by the attention factor transformers derives
    from the context's growth (64 / 16). A KV-cache decode crossing the original context keeps each key's rotation,
    as transformers' own cached decode does; the export is a Phi3ForCausalLM with the same logits."""
    g = torch.Generator().manual_seed(0)
    half = int(16 * partial) // 2
    short, long = (1 + torch.rand(half, generator=g)).tolist(), (1 + 4 * torch.rand(half, generator=g)).tolist()
    hf_model = make_hf_model("phi3", **dict(
        _LLAMA, **_PHI3_TOKENS, num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=16,
        partial_rotary_factor=partial, rope_scaling=dict(type="longrope", short_factor=short, long_factor=long)))
    hf_model.save_pretrained(tmp_path / "hf")
    config = convert_hf_checkpoint(tmp_path / "hf")
    adj = config.rope_adjustments
    assert adj["original_max_seq_len"] == 16
    assert adj["attention_factor"] == pytest.approx((1 + math.log(64 / 16) / math.log(16)) ** 0.5)
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    same_factors = GPT(Config(**{**config.to_dict(), "rope_adjustments": {**adj, "long_factor": short}})).eval()
    same_factors.load_state_dict(model.state_dict())
    for T in (12, 30):
        idx = torch.randint(0, VOCAB, (2, T), generator=g)
        expected = hf_logits(hf_model, idx)
        torch.testing.assert_close(lit_logits(model, idx), expected, **TOL)
        assert ((lit_logits(same_factors, idx) - expected).abs().max() > 1e-3) == (T > 16)  # the long factors count

    idx = torch.randint(0, VOCAB, (1, 30), generator=g)
    with torch.no_grad():  # transformers' cached decode: a prefill within the original context, then token by token
        out = hf_model(input_ids=idx[:, :10], use_cache=True)
        steps = [out.logits]
        for t in range(10, 30):
            out = hf_model(input_ids=idx[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert_decodes_like(model, idx, torch.cat(steps, dim=1), prefill=10)
    assert (torch.cat(steps, dim=1) - hf_logits(hf_model, idx)).abs().max() > 1e-3  # (not the one-pass logits)

    back = exported(tmp_path / "hf", tmp_path / "export")
    assert type(back).__name__ == "Phi3ForCausalLM"
    idx = torch.randint(0, VOCAB, (2, 30), generator=g)
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf_model, idx), **TOL)


def test_olmo_and_smollm3_fields_are_refused_where_they_cannot_hold_or_export():
    """The new fields (OLMo's pre_norms and norm_qk_type, SmolLM3's rope_indices) in one sentence naming them: an
    inconsistent Config, a config.json the conversion cannot express, and an export no transformers family runs."""
    from lit_gpt.convert_hf import config_from_hf, config_to_hf

    llama = dict(name="t", n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32, bias=False,
                 norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=48)
    for change, message in ((dict(pre_norms=False), "pre_norms=false .* needs post_attention_norm and post_mlp_norm"),
                            (dict(norm_qk_type="all"), "norm_qk_type='all' is the width .* but norm_qk is false"),
                            (dict(norm_qk=True, norm_qk_type="some"), "norm_qk_type='some' is none of 'head', 'all'"),
                            (dict(rope_indices=[1]), r"rope_indices must be a list of 2 entries"),
                            (dict(rope_indices=[1, 2]), r"each 0 or 1, got \[1, 2\]")):
        with pytest.raises(ValueError, match=message):
            Config(**{**llama, **change})
    for change, field in ((dict(norm_qk=True, norm_qk_type="all"), "norm_qk_type='all'"),
                          (dict(pre_norms=False, post_attention_norm=True, post_mlp_norm=True), "no norm_qk over all")):
        with pytest.raises(ConversionError, match=f"cannot be exported.*{field}"):
            config_to_hf(Config(**{**llama, **change}))
    olmo = dict(_LLAMA, model_type="olmo2")
    with pytest.raises(ConversionError, match="attention_bias=true; lit_gpt's Config cannot put a bias on OLMo's"):
        config_from_hf({**olmo, "attention_bias": True})
    smollm3 = dict(_LLAMA, model_type="smollm3")
    with pytest.raises(ConversionError, match=r"no_rope_layers=\[1\]; it must list 2 entries \(one per layer\)"):
        config_from_hf({**smollm3, "no_rope_layers": [1]})
    with pytest.raises(ConversionError, match="no_rope_layer_interval=0; it must be a whole number, 1 or more"):
        config_from_hf({**smollm3, "no_rope_layer_interval": 0})


_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1000.0}


@pytest.mark.parametrize("model_type,kwargs", [
    ("qwen2", dict(rope_parameters=_YARN)),
    ("llama", dict(rope_parameters={**_YARN, "beta_fast": 8, "beta_slow": 2, "truncate": False})),  # (gpt-oss's)
    ("llama", dict(rope_parameters={**_YARN, "mscale": 1.0, "mscale_all_dim": 0.5})),  # (DeepSeek's scale)
    ("qwen3", dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                   rope_theta=1000.0, head_dim=16)),  # (transformers 4's keys, as Qwen's model cards give them)
    ("olmo3", dict(_PHI3_TOKENS, sliding_window=6, rope_parameters={
        "full_attention": _YARN, "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
], ids=["qwen2", "llama_betas_untruncated", "llama_mscale", "qwen3_legacy_keys", "olmo3_global_blocks"])
def test_yarn_rope_scaling_matches_transformers_past_the_original_context(model_type, kwargs, tmp_path):
    """A context of 64 grown from 16 with YaRN: transformers' logits at 48 tokens, through a KV-cache decode and in
    the export; without the scaling they differ."""
    hf_model = make_hf_model(model_type, **dict(_LLAMA, num_hidden_layers=4, num_key_value_heads=2, **kwargs))
    hf_model.save_pretrained(tmp_path / "hf")
    config = convert_hf_checkpoint(tmp_path / "hf")
    assert config.rope_adjustments["factor"] == 4.0 and config.rope_adjustments["original_max_seq_len"] == 16
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(hf_model, idx)
    torch.testing.assert_close(lit_logits(model, idx), expected, **TOL)
    plain = GPT(Config(**{**config.to_dict(), "rope_adjustments": None}))
    plain.load_state_dict(model.state_dict())
    assert (lit_logits(plain.eval(), idx) - expected).abs().max() > 1e-3
    assert_decodes_like(model, idx, expected, prefill=20)
    back = exported(tmp_path / "hf", tmp_path / "export")
    torch.testing.assert_close(hf_logits(back, idx), expected, **TOL)


def test_yarn_settings_that_cannot_hold_are_refused_in_one_sentence():
    from lit_gpt.convert_hf import config_from_hf

    with pytest.raises(ConversionError, match="yarn rope scaling lacks the field 'original_max_position_embeddings'"):
        config_from_hf(dict(_LLAMA, model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                          "rope_theta": 1e4}))
    fields = dict(name="t", n_layer=1, n_embd=32, n_head=4, vocab_size=64, block_size=64, bias=False,
                  norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=48)
    yarn = dict(factor=4.0, original_max_seq_len=16, beta_fast=32.0, beta_slow=1.0, attention_factor=1.1)
    Config(**fields, rope_adjustments={**yarn, "truncate": False})
    for bad in ({**yarn, "truncate": "no"}, {**yarn, "beta_fast": 0},
                {k: v for k, v in yarn.items() if k != "beta_slow"}):
        with pytest.raises(ValueError, match=r"rope_adjustments=.* must be null, .* \(YaRN's, and a bool truncate\)"):
            Config(**fields, rope_adjustments=bad)


def test_granite_loss_is_transformers_and_its_scalings_are_refused_elsewhere(tmp_path):
    """Training's chunked loss divides the logits by logits_scaling as transformers' GraniteForCausalLM does; the
    scalings export as Granite only, and a non-positive one is refused."""
    from lit_gpt.convert_hf import config_from_hf, config_to_hf

    model_type, kwargs, _, _ = FAMILIES["granite"]
    hf_model = make_hf_model(model_type, **kwargs)
    hf_model.save_pretrained(tmp_path)
    convert_hf_checkpoint(tmp_path)
    model = GPT.from_checkpoint(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, labels=idx), hf_model(idx, labels=idx).loss)
    with pytest.raises(ConversionError, match=r"residual_multiplier=0; it must be a positive number"):
        config_from_hf({**kwargs, "model_type": "granite", "residual_multiplier": 0})
    gemma_like = Config(name="t", n_layer=1, n_embd=32, n_head=4, vocab_size=64, block_size=32, bias=False,
                        norm_class_name="RMSNorm", mlp_class_name="GemmaMLP", intermediate_size=48,
                        logits_scaling=8.0)
    with pytest.raises(ConversionError, match="cannot be exported.*logits_scaling=8.0 .*only Granite"):
        config_to_hf(gemma_like)
    with pytest.raises(ValueError, match="attention_scale and attention_scores_scalar both set"):
        Config(**{**gemma_like.to_dict(), "attention_scale": 0.1, "attention_scores_scalar": 16})
