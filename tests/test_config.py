"""The named-config table: every entry builds, sizes match the published parameter counts, and each entry equals what
`config_from_hf` derives from the model's real Hugging Face `config.json`."""

import copy

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.config import configs, hf_name_to_config, name_to_config
from lit_gpt.convert_hf import config_from_hf, config_to_hf
from lit_gpt.utils import num_parameters

# Fields that decide the computation (and the shapes of the weights). `vocab_size` is left out on purpose: the table
# records the tokenizer's size where it is smaller than the embedding, a config.json only the embedding's.
ARCH_FIELDS = (
    "block_size", "padded_vocab_size", "n_layer", "n_head", "head_size", "n_embd", "n_query_groups",
    "intermediate_size", "pos_embedding", "rotary_percentage", "rope_base", "rope_adjustments", "parallel_residual",
    "shared_attention_norm", "bias", "attn_bias", "lm_head_bias", "tie_embeddings", "norm_class_name", "norm_eps",
    "mlp_class_name", "gelu_approximate",
)


def arch(config: Config) -> dict:
    return {f: getattr(config, f) for f in ARCH_FIELDS}


def meta_param_count(config: Config) -> int:
    with torch.device("meta"):
        return num_parameters(GPT(config))


@pytest.mark.parametrize("name", list(name_to_config))
def test_every_named_config_builds(name):
    config = Config.from_name(name)
    assert config.name == name
    org_name = f"{config.hf_config['org']}/{config.hf_config['name']}"
    assert arch(Config.from_name(org_name)) == arch(config)
    assert config.vocab_size <= config.padded_vocab_size
    assert config.n_head % config.n_query_groups == 0
    assert meta_param_count(config) > 0
    # the table stays exportable: every entry maps to a transformers architecture and back unchanged
    assert arch(config_from_hf(config_to_hf(config))) == arch(config)


def test_table_names_are_unique():
    assert len(name_to_config) == len(configs) == len(hf_name_to_config)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown model name 'Llama-2-7b'\. Did you mean .*'Llama-2-7b-hf'"):
        Config.from_name("Llama-2-7b")
    with pytest.raises(ValueError, match="scripts/download.py"):
        Config.from_name("definitely-not-a-model")


def test_overrides_make_a_small_model():
    small = Config.from_name(
        "Llama-2-7b-hf", n_layer=2, n_embd=64, n_head=4, n_query_groups=4, intermediate_size=128, vocab_size=100
    )
    assert (small.n_layer, small.n_embd, small.head_size, small.intermediate_size) == (2, 64, 16, 128)
    assert small.padded_vocab_size == 128  # recomputed from the new vocabulary (padding_multiple 64)
    # embedding + head (128*64 each) + 2 layers of (qkv 64*192 + proj 64*64 + MLP 3*64*128 + 2 norms) + final norm
    assert meta_param_count(small) == 2 * 128 * 64 + 2 * (64 * 192 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert meta_param_count(small) < meta_param_count(Config.from_name("Llama-2-7b-hf")) / 10_000
    with pytest.raises(ValueError, match="Unknown Config field"):
        Config.from_name("gpt2", n_layers=2)


# Published totals. The Pythia ones are the "Total params" of Table 1 in Biderman et al., 2023 (arXiv 2304.01373);
# the others are the sizes the Hugging Face Hub reports for each repo's safetensors weights.
PUBLISHED_PARAMETERS = {
    "Llama-2-7b-hf": 6_738_415_616,
    "Llama-2-13b-hf": 13_015_864_320,
    "Meta-Llama-3-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,  # tied embeddings, counted once
    "Mistral-7B-v0.1": 7_241_732_096,
    "TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
    "SmolLM2-135M": 134_515_008,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-7B": 7_615_616_512,
    "phi-2": 2_779_683_840,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-xl": 1_557_611_200,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-1b": 1_011_781_632,
    "pythia-12b": 11_846_072_320,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_the_published_size(name):
    assert meta_param_count(Config.from_name(name)) == PUBLISHED_PARAMETERS[name]


# The real `config.json` files of these repos (transformers-4 format, as on the Hub), trimmed of training-only keys.
HF_CONFIGS = {
    "Llama-2-7b-hf": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
    },
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256,
    },
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256,
    },
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
    },
    "SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
        "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 49152,
    },
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
    },
    "phi-2": {
        "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0,
        "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560, "initializer_range": 0.02,
        "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "phi",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
        "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 51200,
    },
    "pythia-160m": {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12,
        "num_hidden_layers": 12, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
    },
    "gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    },
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_config_from_hf_equals_the_named_config(name):
    derived = config_from_hf(HF_CONFIGS[name], name=name)
    named = Config.from_name(name)
    assert arch(derived) == arch(named)
    assert derived.hf_config == named.hf_config  # a known name picks up its org


def test_transformers_5_rope_parameters_are_read_like_the_legacy_keys():
    legacy = copy.deepcopy(HF_CONFIGS["Llama-3.1-8B"])
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**legacy["rope_scaling"], "rope_theta": legacy["rope_theta"]}
    assert arch(config_from_hf(v5)) == arch(config_from_hf(legacy)) == arch(Config.from_name("Llama-3.1-8B"))

    neox = {k: v for k, v in HF_CONFIGS["pythia-160m"].items() if k not in ("rotary_pct", "rotary_emb_base")}
    neox["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    assert arch(config_from_hf(neox)) == arch(Config.from_name("pythia-160m"))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_transformers_builds_the_same_number_of_parameters(name):
    """transformers' own model for each config.json has exactly as many parameters as the named lit config."""
    transformers = pytest.importorskip("transformers")
    hf_config = dict(HF_CONFIGS[name])
    model_type = hf_config.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert num_parameters(model) == meta_param_count(Config.from_name(name))


@pytest.mark.parametrize("name,total,published", [("OLMo-2-0425-1B", 1_484_916_736, 1.5),
                                                  ("OLMo-2-1124-7B-Instruct", 7_298_617_344, 7.3),
                                                  ("OLMo-2-1124-13B", 13_716_198_400, 13.7),
                                                  ("OLMo-2-0325-32B", 32_234_279_936, 32.2)])
def test_olmo2_named_configs_have_transformers_count_and_the_published_size(name, total, published):
    """OLMo 2's 1B, 7B, 13B and 32B: 1.5B, 7.3B, 13.7B and 32.2B parameters (the sizes AI2 gives them), as
    transformers' Olmo2ForCausalLM counts the same config."""
    transformers = pytest.importorskip("transformers")
    from lit_gpt.convert_hf import config_to_hf

    config = Config.from_name(name)
    hf = config_to_hf(config)
    assert hf["model_type"] == "olmo2"
    with torch.device("meta"):
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**hf))
    assert num_parameters(model) == meta_param_count(config) == total and round(total / 1e9, 1) == published
