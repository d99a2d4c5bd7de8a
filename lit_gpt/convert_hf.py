"""Hugging Face transformers checkpoints <-> lit_gpt checkpoints.

Import (`convert_hf_checkpoint`) reads a folder as `huggingface_hub.snapshot_download` leaves it (`config.json`,
`*.safetensors` or `pytorch_model*.bin`, sharded or not) and writes `lit_model.pth` + `model_config.yaml` next to
it. The `Config` comes from the folder's own `config.json` (`config_from_hf`), never from the named-config table, so
fine-tuned variants and unlisted sizes convert as they are.

Export (`convert_lit_checkpoint`) writes a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads:
`config.json` (`config_to_hf`), safetensors weights, `generation_config.json` and the tokenizer files.

Families: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, phi, phi3 (Phi-3, Phi-4), gemma, gemma2,
gemma3_text (Gemma 3's text model, `Gemma3ForCausalLM`), gpt2, gpt_neox. Both directions work
tensor by tensor (safetensors `safe_open` per shard, `.bin` shards memory-mapped), so a conversion holds one copy of
the weights, not two.

Decisions worth knowing:
* Sliding-window attention (Mistral v0.1, Phi-3, Qwen2/Qwen3 with `use_sliding_window`, Gemma 2 and 3) is kept as
  such (`sliding_window_size`, and `sliding_window_indices` where only some blocks have it), so the model's whole
  context (`max_position_embeddings`) stays usable with the logits transformers computes beyond the window.
  (Checkpoints converted before lit_gpt had sliding windows carry `block_size` capped at the window instead: up to
  it, full causal attention is the same computation.)
* LongRoPE (Phi-3.5, Phi-4-mini, the 128K Phi-3s) picks its long or short factors per forward call, by whether
  the call's last position is past the original context, as transformers does: a KV-cache decode that crosses it
  keeps the keys rotated before with the short factors. Such a model exports as `phi3`.
* Gemma's norms scale by `1 + weight`; lit stores the weights as transformers does (`norm_unit_offset`), so import
  and export copy them unchanged.
* Export picks the architecture from the config's shape. A Llama-shaped model is exported as `llama`, or as
  `mistral` with a sliding window in every block (Mistral v0.1); one with a bias on the QKV projection only as
  `qwen2`, because transformers' llama `attention_bias` also puts a bias on `o_proj`; one with per-head query/key
  norms (`norm_qk`) as `qwen3`, whose `q_norm`/`k_norm` are lit's `attn.norm_q`/`attn.norm_k`. A Phi-3 (its q/k/v
  in one `qkv_proj`, its gate and up projections in one `gate_up_proj`) is exported as the `llama` or `mistral` it
  computes, unless it rotates part of each head only, which those cannot: then as `phi3`.
* A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) is read from and written in its Hub layout, one tensor per
  expert and projection (`block_sparse_moe.experts.3.w1`), which is also what transformers 5 saves. A model with a
  shared expert exports as `qwen2_moe`, else one with norms on the query/key heads as `qwen3_moe`, else as
  `mixtral`.
* Export writes one `model.safetensors` up to `max_shard_bytes` (5 GB by default, the size the Hub recommends per
  file) and numbered shards plus `model.safetensors.index.json` beyond it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import torch

from lit_gpt.config import GRANITE_FIELDS, Config, hf_name_to_config, longrope_attention_factor, name_to_config

SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2",
    "gemma3_text", "gpt2", "gpt_neox", "smollm3", "olmo2", "olmo3", "granite")
# OLMo 2/3: norms after the attention and the MLP only, and query/key norms over all the heads
OLMO_TYPES = ("olmo2", "olmo3")
# the llama-shaped families whose MLP is a mixture of experts (lit's "LLaMAMoE")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
# the families of Llama's shape (RMSNorm, SwiGLU, q/k/v/o projections), converted by one path each way
LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "granite", *OLMO_TYPES, *MOE_TYPES)
HF_CONFIG_FILENAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# files a transformers model folder needs besides weights and config.json; copied as they are on export
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


# multimodal model types whose text model is imported alone (the vision tower dropped): {type: text model's type}
MULTIMODAL_TEXT_TYPES = {"gemma3": "gemma3_text"}


def text_config(hf_config: dict) -> dict:
    """`hf_config` itself, or the `text_config` of a multimodal model in `MULTIMODAL_TEXT_TYPES` (with its name)."""
    model_type = hf_config.get("model_type")
    if model_type not in MULTIMODAL_TEXT_TYPES:
        return hf_config
    text = hf_config.get("text_config")
    if not isinstance(text, dict):
        raise ConversionError(f"config.json of model_type {model_type!r} has no text_config object, which describes "
                              "the text model lit_gpt imports.")
    return {**text, "model_type": MULTIMODAL_TEXT_TYPES[model_type], _MULTIMODAL_KEY: model_type,
            **{k: hf_config[k] for k in ("_name_or_path", LIT_NAME_KEY) if k in hf_config}}


# what `text_config` marks a multimodal model's text config with (`Config.hf_config["multimodal"]` then says so)
_MULTIMODAL_KEY = "_lit_gpt_text_of"


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says which file/field and what to do."""


# Defaults of transformers' config classes for keys a `config.json` may leave out (older files often do).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    ),
    "mistral": dict(
        hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, sliding_window=4096, num_key_value_heads=8,
    ),
    "mixtral": dict(
        hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, rope_theta=1e6,
        tie_word_embeddings=False, sliding_window=None, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen2": dict(
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
        num_key_value_heads=32,
    ),
    "qwen2_moe": dict(
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
        num_key_value_heads=16, qkv_bias=True, num_experts_per_tok=4, num_experts=60, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=None,
    ),
    "qwen3": dict(
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
        num_key_value_heads=32, head_dim=128, attention_bias=False,
    ),
    "smollm3": dict(
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=2000000.0,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, num_key_value_heads=4,
        use_sliding_window=False, sliding_window=None, no_rope_layers=None, no_rope_layer_interval=4,
    ),
    "granite": dict(
        hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, embedding_multiplier=1.0,
        residual_multiplier=1.0, attention_multiplier=1.0, logits_scaling=1.0,
    ),
    "olmo2": dict(
        hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False,
    ),
    "olmo3": dict(
        hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, attention_bias=False, sliding_window=4096, layer_types=None,
    ),
    "qwen3_moe": dict(
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, num_key_value_heads=4,
        attention_bias=False, num_experts_per_tok=8, num_experts=128, moe_intermediate_size=768,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=None,
    ),
    "phi3": dict(
        hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, sliding_window=None,
    ),
    "phi": dict(
        hidden_act="gelu_new", max_position_embeddings=2048, layer_norm_eps=1e-5, rope_theta=10000.0,
        partial_rotary_factor=0.5, tie_word_embeddings=False, qk_layernorm=False,
    ),
    "gemma": dict(
        hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, attention_bias=False, num_key_value_heads=16, head_dim=256,
    ),
    "gemma2": dict(
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False, num_key_value_heads=4, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(  # (a multimodal Gemma 3's text_config leaves out even its width and depth)
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, tie_word_embeddings=True, attention_bias=False,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
    ),
    "gpt2": dict(
        activation_function="gelu_new", n_positions=1024, n_inner=None, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
    ),
    "gpt_neox": dict(
        hidden_act="gelu", max_position_embeddings=2048, layer_norm_eps=1e-5, rotary_emb_base=10000.0,
        rotary_pct=0.25, tie_word_embeddings=False, use_parallel_residual=True, attention_bias=True,
    ),
}

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


###################################################################################################
# config.json <-> Config
###################################################################################################
# the key of an exported config.json that names the lit model it came from (transformers keeps unknown keys)
LIT_NAME_KEY = "lit_gpt_name"


def config_from_hf(hf_config: dict, name: str = "") -> Config:
    """The `Config` of a Hugging Face `config.json` (as a dict) for the families in `SUPPORTED_MODEL_TYPES`, and of
    the text model of a multimodal Gemma 3 (`MULTIMODAL_TEXT_TYPES`)."""
    hf_config = text_config(hf_config)
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type {model_type!r}, which lit_gpt cannot import; supported model types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    _check_field_types(hf_config)
    quantization = hf_config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ConversionError(
            f"config.json has a quantization_config (quant_method {method!r}): lit_gpt converts unquantized weights "
            "only; download the original float16/bfloat16/float32 model instead."
        )
    hf = dict(_HF_DEFAULTS[model_type])
    hf.update(hf_config)

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ConversionError(f"config.json (model_type {model_type!r}) lacks the required field {key!r}.")
        return hf[key]

    if model_type == "gpt2":
        n_embd, n_head = int(need("n_embd")), int(need("n_head"))
        if not hf["scale_attn_weights"] or hf["scale_attn_by_inverse_layer_idx"]:
            raise ConversionError(
                "config.json sets scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true; lit_gpt only "
                "supports GPT-2's standard 1/sqrt(head_size) attention scale."
            )
        arch = dict(
            n_layer=int(need("n_layer")), n_embd=n_embd, n_head=n_head, n_query_groups=n_head,
            intermediate_size=int(hf["n_inner"] or 4 * n_embd), block_size=int(need("n_positions")),
            pos_embedding="learned", bias=True, norm_class_name="LayerNorm", norm_eps=float(hf["layer_norm_epsilon"]),
            mlp_class_name="GptNeoxMLP", gelu_approximate=_gelu(hf["activation_function"], "activation_function"),
        )
    else:
        n_embd, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
        head_size = hf.get("head_dim") or n_embd // n_head
        n_query_groups = int(hf.get("num_key_value_heads") or n_head)
        if n_head % n_query_groups:
            default = "" if hf_config.get("num_key_value_heads") else f", transformers' default for {model_type}"
            raise ConversionError(
                f"config.json has num_attention_heads={n_head} and num_key_value_heads={n_query_groups}{default}: "
                "the attention heads must be a multiple of the key/value heads; set num_key_value_heads."
            )
        local_base = None
        if model_type in ("gemma3_text", "olmo3"):
            hf, local_base = _per_type_rope(hf, model_type)
        rope_base, rope_adjustments, partial = _rope_from_hf(hf, model_type)
        arch = dict(
            n_layer=int(need("num_hidden_layers")), n_embd=n_embd, n_head=n_head, head_size=int(head_size),
            n_query_groups=n_query_groups, intermediate_size=int(need("intermediate_size")),
            block_size=int(need("max_position_embeddings")), pos_embedding="rope", rope_base=float(rope_base),
            rope_adjustments=rope_adjustments, rotary_percentage=float(partial),
        )
        if model_type in LLAMA_SHAPED:
            if hf["hidden_act"] not in ("silu", "swish"):  # transformers' "swish" is SiLU
                raise ConversionError(
                    f"config.json sets hidden_act={hf['hidden_act']!r}; the {model_type} MLP lit_gpt implements is "
                    "SwiGLU with 'silu'."
                )
            if model_type == "smollm3":
                arch["rope_indices"] = _rope_layers(hf, arch["n_layer"])
            if model_type == "granite":  # (its scalings; 1.0, or an attention scale of 1/sqrt(head_size), is none)
                arch.update(_granite_fields(hf, int(head_size)))
            if model_type in ("llama", "smollm3", "granite"):
                if bool(hf["attention_bias"]) != bool(hf["mlp_bias"]):
                    raise ConversionError(
                        f"config.json sets attention_bias={hf['attention_bias']} but mlp_bias={hf['mlp_bias']}; "
                        "lit_gpt's Config can only give every linear layer a bias or none (or the QKV projection "
                        "only, as Qwen2 does)."
                    )
                bias = attn_bias = bool(hf["attention_bias"])
            elif model_type in OLMO_TYPES:
                if hf["attention_bias"]:
                    raise ConversionError(
                        "config.json sets attention_bias=true; lit_gpt's Config cannot put a bias on OLMo's q/k/v and "
                        "o_proj but not on its MLP.")
                bias = attn_bias = False
                arch.update(norm_qk=True, norm_qk_type="all", pre_norms=False, post_attention_norm=True,
                            post_mlp_norm=True)
            elif model_type in ("qwen3", "qwen3_moe"):
                if hf["attention_bias"]:
                    raise ConversionError(
                        "config.json sets attention_bias=true; lit_gpt's Config cannot put a bias on Qwen3's q/k/v "
                        "and o_proj but not on its MLP (Qwen2's bias on q/k/v only, or none, it can)."
                    )
                bias = attn_bias = False
                arch["norm_qk"] = True
            elif model_type == "qwen2_moe":  # (its q/k/v have a bias unless qkv_bias says otherwise; o_proj none)
                bias, attn_bias = False, bool(hf["qkv_bias"])
            else:  # (Phi-3's projections have no bias)
                bias, attn_bias = False, model_type == "qwen2"
            arch.update(
                bias=bias, attn_bias=attn_bias, norm_class_name="RMSNorm", norm_eps=float(hf["rms_norm_eps"]),
                mlp_class_name="LLaMAMLP", parallel_residual=False,
            )
            if model_type in MOE_TYPES:
                arch.update(_experts_from_hf(hf, model_type, arch["n_layer"]))
            window = _sliding_window(hf, model_type, arch["n_layer"])
            if window is not None and window[0] < arch["block_size"]:
                arch.update(sliding_window_size=window[0], sliding_window_indices=window[1])
                # (OLMo 3: a base of their own, or plain RoPE where the global blocks scale theirs)
                if local_base is not None and (float(local_base) != arch["rope_base"] or arch["rope_adjustments"]):
                    arch["rope_local_base_freq"] = float(local_base)
        elif model_type in GEMMA_TYPES:
            arch.update(_gemma_arch(hf, model_type, arch["n_layer"]))
            if local_base is not None and arch.get("sliding_window_size") is not None:
                arch["rope_local_base_freq"] = float(local_base)
        elif model_type == "phi":
            if hf["qk_layernorm"]:
                raise ConversionError("config.json sets qk_layernorm=true, which lit_gpt's Phi does not implement.")
            arch.update(
                parallel_residual=True, shared_attention_norm=True, bias=True, lm_head_bias=True,
                norm_class_name="LayerNorm", norm_eps=float(hf["layer_norm_eps"]), mlp_class_name="GptNeoxMLP",
                gelu_approximate=_gelu(hf["hidden_act"], "hidden_act"),
            )
        else:  # gpt_neox
            if not hf["attention_bias"]:
                raise ConversionError(
                    "config.json sets attention_bias=false; lit_gpt's Config cannot drop the attention biases while "
                    "keeping GPT-NeoX's MLP biases."
                )
            if n_query_groups != n_head or head_size * n_head != n_embd:
                raise ConversionError("config.json gives GPT-NeoX key/value heads or a head_dim it does not support.")
            arch.update(
                parallel_residual=bool(hf["use_parallel_residual"]), shared_attention_norm=False, bias=True,
                norm_class_name="LayerNorm", norm_eps=float(hf["layer_norm_eps"]), mlp_class_name="GptNeoxMLP",
                gelu_approximate=_gelu(hf["hidden_act"], "hidden_act"),
            )
    # the HF vocab_size is the embedding's row count, padding included
    vocab = int(need("vocab_size"))
    org, short = _split_name(name or hf_config.get("_name_or_path") or "")
    hub = dict(org=org, name=short or model_type, **({"multimodal": True} if _MULTIMODAL_KEY in hf_config else {}))
    try:
        return Config(
            name=short or model_type, hf_config=hub, vocab_size=vocab,
            padded_vocab_size=vocab, tie_embeddings=bool(hf["tie_word_embeddings"]), **arch,
        )
    except ValueError as e:  # e.g. an odd number of rotary features: the sentence names the field, not the file
        raise ConversionError(f"config.json describes a model lit_gpt cannot build: {e}") from None


_INT_FIELDS = (
    "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "hidden_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
    "vocab_size", "sliding_window", "max_window_layers", "original_max_position_embeddings", "query_pre_attn_scalar",
    "sliding_window_pattern", "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "decoder_sparse_step",
)
_FLOAT_FIELDS = (
    "layer_norm_epsilon", "rms_norm_eps", "layer_norm_eps", "rope_theta", "rotary_emb_base", "rotary_pct",
    "partial_rotary_factor", "factor", "low_freq_factor", "high_freq_factor", "attn_logit_softcapping",
    "final_logit_softcapping", "rope_local_base_freq",
)


def _check_field_types(hf_config: dict, prefix: str = "") -> None:
    """Refuse, naming the field, a value of the wrong type where the conversion reads a number or an object (a
    hand-edited config, another tool's), before Python's own message would leave the field unnamed."""
    for key, value in hf_config.items():
        if value is None:
            continue
        name = f"{prefix}{key}"
        if key in ("rope_scaling", "rope_parameters") and not prefix:
            if not isinstance(value, dict):
                raise ConversionError(f"config.json field {name!r} must be an object or null, got {value!r}.")
            if all(isinstance(v, dict) for v in value.values()):  # per layer type (Gemma 3)
                for layer_type, params in value.items():
                    _check_field_types(params, prefix=f"{name}.{layer_type}.")
            else:
                _check_field_types(value, prefix=f"{name}.")
        elif key in _INT_FIELDS and not (
                type(value) is int or (isinstance(value, float) and value.is_integer())):
            raise ConversionError(f"config.json field {name!r} must be an integer, got {value!r}.")
        elif key in _FLOAT_FIELDS and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ConversionError(f"config.json field {name!r} must be a number, got {value!r}.")


def _split_name(name: str) -> tuple[str, str]:
    name = str(name).rstrip("/")
    if not name:
        return "", ""
    known = hf_name_to_config.get(name) or name_to_config.get(name)
    if known is not None:
        return known["hf_config"]["org"], known["hf_config"]["name"]
    parts = name.split("/")
    # "org/name" as on the Hub; anything longer is a local path, whose last part is the name
    return (parts[0], parts[1]) if len(parts) == 2 else ("", parts[-1])


def _gelu(act: str, field: str) -> str:
    if act not in _GELU:
        raise ConversionError(
            f"config.json sets {field}={act!r}; lit_gpt's MLP supports {', '.join(repr(a) for a in _GELU)}."
        )
    return _GELU[act]


def _rope_from_hf(hf: dict, model_type: str) -> tuple[float, Optional[dict], float]:
    """(base, llama3 adjustments or None, rotary fraction) from either the transformers 4 keys (`rope_theta`,
    `rope_scaling`, `partial_rotary_factor`, GPT-NeoX's `rotary_emb_base`/`rotary_pct`) or transformers 5's
    `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConversionError("config.json gives per-layer-type rope_parameters, which lit_gpt does not support.")
    scaling = dict(hf.get("rope_scaling") or {})
    if params and scaling:
        types = [d.get("rope_type") or d.get("type") or "default" for d in (scaling, params)]
        if types[0] != types[1]:  # transformers versions disagree on which one wins: refuse rather than guess
            raise ConversionError(
                f"config.json gives both rope_scaling (type {types[0]!r}) and rope_parameters (type {types[1]!r}); "
                "keep the one the model was trained with and remove the other."
            )
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if model_type == "gpt_neox":
        base = merged.get("rope_theta", hf.get("rope_theta", hf["rotary_emb_base"]))
        partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf["rotary_pct"]))
    else:
        base = merged.get("rope_theta", hf["rope_theta"])
        # transformers' Llama, Mistral, Qwen2 and Qwen3 rotate the whole head whatever partial_rotary_factor says
        # (Phi and Phi-3 rotate that part of it)
        partial = (merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
                   if model_type in ("phi", "phi3") else 1.0)
    if rope_type == "default":
        return base, None, partial
    if rope_type == "linear":
        if "factor" not in merged:
            raise ConversionError("config.json's linear rope scaling lacks the field 'factor'.")
        return base, dict(factor=float(merged["factor"])), partial
    if rope_type == "llama3":
        try:
            adjustments = dict(
                factor=float(merged["factor"]),
                low_freq_factor=float(merged["low_freq_factor"]),
                high_freq_factor=float(merged["high_freq_factor"]),
                original_max_seq_len=int(merged["original_max_position_embeddings"]),
            )
        except KeyError as missing:
            raise ConversionError(f"config.json's llama3 rope scaling lacks the field {missing.args[0]!r}.") from None
        return base, adjustments, partial
    if rope_type in ("longrope", "su") and model_type == "phi3":  # ("su": its name in Phi-3's first configs)
        return base, _longrope_from_hf(hf, merged), partial
    if rope_type == "yarn":
        return base, _yarn_from_hf(hf, merged), partial
    raise ConversionError(
        f"config.json uses rope scaling type {rope_type!r}; lit_gpt supports plain RoPE, 'linear', 'llama3' and "
        "'yarn' scaling, and Phi-3's 'longrope'."
    )


def _yarn_from_hf(hf: dict, params: dict) -> dict:
    """`Config.rope_adjustments` of YaRN: what transformers leaves implicit made explicit, as it computes it: the
    factor from the context's growth, beta_fast 32 and beta_slow 1, and the scale of cos and sin from the factor
    (0.1 ln(factor) + 1, the YaRN paper's; DeepSeek's mscale and mscale_all_dim make it a ratio of two such)."""
    original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if original is None:
        raise ConversionError("config.json's yarn rope scaling lacks the field 'original_max_position_embeddings' "
                              "(the context the model was pretrained with).")
    factor = params.get("factor") or hf["max_position_embeddings"] / original

    def scale(mscale: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        mscale, every = params.get("mscale"), params.get("mscale_all_dim")
        attention = scale(mscale) / scale(every) if mscale and every else scale()
    adj = dict(factor=float(factor), original_max_seq_len=int(original),
               beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
               attention_factor=float(attention))
    if params.get("truncate", True) is False:
        adj["truncate"] = False
    return adj


def _longrope_from_hf(hf: dict, params: dict) -> dict:
    """`Config.rope_adjustments` of LongRoPE (Phi-3.5, Phi-4-mini): its factors, original context, and the factor
    cos and sin are scaled by, computed as transformers computes it when the file does not give it."""
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    missing = [k for k, v in (("short_factor", params.get("short_factor")), ("long_factor", params.get("long_factor")),
                              ("original_max_position_embeddings", original)) if v is None]
    if missing:
        raise ConversionError(f"config.json's longrope scaling lacks {', '.join(repr(m) for m in missing)}.")
    attention = params.get("attention_factor")
    if attention is None:  # from the context's growth, as the LongRoPE paper sets it
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        attention = longrope_attention_factor(factor, original)
    return dict(short_factor=[float(f) for f in params["short_factor"]],
                long_factor=[float(f) for f in params["long_factor"]],
                original_max_seq_len=int(original), attention_factor=float(attention))


def _per_type_rope(hf: dict, model_type: str) -> tuple[dict, Optional[float]]:
    """Gemma 3's and OLMo 3's two RoPEs: `hf` with the full-attention blocks' parameters as plain keys, and the base
    of the sliding-window blocks. transformers 5 writes them per layer type in `rope_parameters`; for Gemma 3
    transformers 4 wrote `rope_theta`, `rope_scaling` (of the full-attention blocks) and `rope_local_base_freq`."""
    params = hf.get("rope_parameters") or {}
    if not (params and all(isinstance(v, dict) for v in params.values())):
        return hf, hf.get("rope_local_base_freq")
    unknown = sorted(set(params) - {"full_attention", "sliding_attention"})
    if unknown:
        family = {"gemma3_text": "Gemma 3", "olmo3": "OLMo 3"}[model_type]
        raise ConversionError(f"config.json's rope_parameters has the layer type(s) {unknown}, which {family} has not; "
                              "expected 'full_attention' and 'sliding_attention'.")
    local = dict(params.get("sliding_attention") or {})
    if (local.get("rope_type") or "default") != "default":
        raise ConversionError(f"config.json's rope_parameters.sliding_attention has rope_type {local['rope_type']!r}; "
                              "lit_gpt's sliding-window blocks use plain RoPE only.")
    full = dict(params.get("full_attention") or {})
    full.setdefault("rope_theta", hf["rope_theta"])
    return {**hf, "rope_parameters": full}, local.get("rope_theta", hf.get("rope_local_base_freq"))


def _gemma_arch(hf: dict, model_type: str, n_layer: int) -> dict:
    """The Config fields of a Gemma, Gemma 2 or Gemma 3 (text) config.json beyond the common ones."""
    if hf["attention_bias"]:
        raise ConversionError(
            "config.json sets attention_bias=true; lit_gpt's Config cannot put a bias on Gemma's q/k/v and o_proj but "
            "not on its MLP."
        )
    if hf.get("use_bidirectional_attention"):
        raise ConversionError("config.json sets use_bidirectional_attention=true (an encoder); lit_gpt's models are "
                              "causal decoders.")
    if model_type == "gemma":
        # transformers reads Gemma 1's "gelu" as the tanh approximation the model was trained with
        act = hf.get("hidden_activation") or hf["hidden_act"]
        approximate = "tanh" if act == "gelu" else _gelu(act, "hidden_act")
    else:
        approximate = _gelu(hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
                            "hidden_activation")
    arch = dict(
        bias=False, attn_bias=False, norm_class_name="RMSNorm", norm_eps=float(hf["rms_norm_eps"]),
        norm_unit_offset=True, mlp_class_name="GemmaMLP", gelu_approximate=approximate, scale_embeddings=True,
        parallel_residual=False,
    )
    if model_type == "gemma":
        return arch
    arch.update(post_attention_norm=True, post_mlp_norm=True, norm_qk=model_type == "gemma3_text",
                attention_scores_scalar=int(hf["query_pre_attn_scalar"]))
    for ours, theirs in (("attention_logit_softcapping", "attn_logit_softcapping"),
                         ("final_logit_softcapping", "final_logit_softcapping")):
        if hf.get(theirs) is not None:
            arch[ours] = float(hf[theirs])
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers' default pattern: every 2nd (Gemma 2) / 6th (Gemma 3) block is global
        every = 2 if model_type == "gemma2" else int(hf["sliding_window_pattern"])
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)]
    flags = _window_flags(layer_types, n_layer)
    if hf.get("sliding_window") is not None and any(flags):
        arch.update(sliding_window_size=int(hf["sliding_window"]), sliding_window_indices=flags)
    return arch


def _window_flags(layer_types: Any, n_layer: int) -> list[int]:
    """`Config.sliding_window_indices` of transformers' `layer_types` (1 for each "sliding_attention" block)."""
    if (not isinstance(layer_types, list) or len(layer_types) != n_layer
            or not set(layer_types) <= {"sliding_attention", "full_attention"}):
        raise ConversionError(
            f"config.json's layer_types must list {n_layer} entries, each 'sliding_attention' or 'full_attention'.")
    return [int(t == "sliding_attention") for t in layer_types]


def _layer_types(c: Config) -> list[str]:
    """transformers' `layer_types` of `c`'s blocks (the inverse of `_window_flags`)."""
    return ["sliding_attention" if c.sliding_window(i) else "full_attention" for i in range(c.n_layer)]


def _sliding_window(hf: dict, model_type: str, n_layer: int) -> Optional[tuple[int, Optional[list[int]]]]:
    """(window, `Config.sliding_window_indices`: None for every block) of a llama-shaped family, or None."""
    if model_type in ("mistral", "mixtral", "phi3", "qwen3_moe"):
        # (transformers' Qwen3-MoE has the window in every block, when use_sliding_window says so)
        window = hf.get("sliding_window") if model_type != "qwen3_moe" or hf["use_sliding_window"] else None
        return (int(window), None) if window else None
    if model_type == "olmo3":  # (transformers' default: the window in three blocks of four, the fourth global)
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n_layer)]
        flags = _window_flags(layer_types, n_layer)
        if hf.get("sliding_window") is None or not any(flags):
            return None
        return int(hf["sliding_window"]), None if all(flags) else flags
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "smollm3"):
        window = hf["sliding_window"] if hf["use_sliding_window"] else None
        if window is None:
            return None
        layer_types = hf.get("layer_types")
        if not layer_types:  # (SmolLM3's default: the window in its NoPE blocks; Qwen's: past max_window_layers)
            windowed = ([not rope for rope in _rope_layers(hf, n_layer)] if model_type == "smollm3"
                        else [i >= hf["max_window_layers"] for i in range(n_layer)])
            layer_types = ["sliding_attention" if w else "full_attention" for w in windowed]
        flags = _window_flags(layer_types, n_layer)
        if not any(flags):
            return None
        return int(window), None if all(flags) else flags
    return None


def _granite_fields(hf: dict, head_size: int) -> dict:
    """Granite's four scalings as Config fields (those that change nothing left out)."""
    fields = {}
    for key, field in (("embedding_multiplier", "embedding_multiplier"), ("residual_multiplier", "residual_multiplier"),
                       ("attention_multiplier", "attention_scale"), ("logits_scaling", "logits_scaling")):
        value = hf[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConversionError(f"config.json sets {key}={value!r}; it must be a positive number.")
        if value != (head_size ** -0.5 if key == "attention_multiplier" else 1.0):
            fields[field] = float(value)
    return fields


def _rope_layers(hf: dict, n_layer: int) -> list[int]:
    """SmolLM3's `no_rope_layers` (1: the block uses RoPE, 0: NoPE), or transformers' default from
    `no_rope_layer_interval` (every such block, counting from 1, NoPE), refused in one sentence when malformed."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        every = hf.get("no_rope_layer_interval")
        if type(every) is not int or every < 1:
            raise ConversionError(f"config.json sets no_rope_layer_interval={every!r}; it must be a whole number, 1 "
                                  "or more (or give no_rope_layers).")
        flags = [int((i + 1) % every != 0) for i in range(n_layer)]
    if not isinstance(flags, list) or len(flags) != n_layer or any(f not in (0, 1) or type(f) is bool for f in flags):
        raise ConversionError(f"config.json sets no_rope_layers={flags!r}; it must list {n_layer} entries (one per "
                              "layer), each 1 (RoPE) or 0 (no position embedding).")
    return [int(f) for f in flags]


_MOE_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}


def _experts_from_hf(hf: dict, model_type: str, n_layer: int) -> dict:
    """The `Config` fields of a Mixtral's, Qwen2-MoE's or Qwen3-MoE's experts."""
    if model_type == "mixtral":
        if hf.get("router_jitter_noise"):
            print(f"Note: config.json sets router_jitter_noise={hf['router_jitter_noise']}, the noise transformers "
                  "multiplies a Mixtral's router inputs by in training; lit_gpt trains without it (inference is the "
                  "same), and an export writes 0.", file=sys.stderr)
        return dict(mlp_class_name="LLaMAMoE", n_expert=int(hf["num_local_experts"]),
                    n_expert_per_token=int(hf["num_experts_per_tok"]))
    # (transformers 5 writes num_local_experts; Qwen's own files, num_experts)
    n_expert = hf.get("num_local_experts") or hf["num_experts"]
    dense = sorted(set(hf["mlp_only_layers"] or []) | {
        i for i in range(n_layer) if (i + 1) % int(hf["decoder_sparse_step"] or 1)})
    if dense:
        raise ConversionError(
            f"config.json gives blocks {dense[:8]} a dense MLP (mlp_only_layers={hf['mlp_only_layers']}, "
            f"decoder_sparse_step={hf['decoder_sparse_step']}); lit_gpt's {_MOE_NAMES[model_type]} has experts in "
            "every block, as Qwen's released models do.")
    fields = dict(mlp_class_name="LLaMAMoE", n_expert=int(n_expert), n_expert_per_token=int(hf["num_experts_per_tok"]),
                  moe_intermediate_size=int(hf["moe_intermediate_size"]), moe_norm_topk=bool(hf["norm_topk_prob"]))
    if model_type == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = int(hf["shared_expert_intermediate_size"])
    return fields


def hf_model_type(config: Config) -> str:
    """The transformers architecture that computes exactly what `GPT(config)` computes."""
    if config.pos_embedding == "learned":
        return "gpt2"
    if config.mlp_class_name == "GemmaMLP":
        if config.norm_qk:
            return "gemma3_text"
        return "gemma2" if config.post_attention_norm or config.post_mlp_norm else "gemma"
    if config.mlp_class_name == "LLaMAMoE":
        if config.shared_expert_intermediate_size is not None:
            return "qwen2_moe"
        return "qwen3_moe" if config.norm_qk else "mixtral"
    if config.mlp_class_name == "LLaMAMLP":
        if any(getattr(config, key) is not None for key in GRANITE_FIELDS):
            return "granite"
        if not config.pre_norms:  # (the one transformers family with post norms only)
            return "olmo3" if config.sliding_window_size is not None else "olmo2"
        if config.rope_indices is not None:
            return "smollm3"  # (the one transformers family with blocks that have no RoPE)
        if config.norm_qk:
            return "qwen3"
        longrope = bool(config.rope_adjustments) and "long_factor" in config.rope_adjustments
        if (config.rotary_percentage < 1.0 or longrope) and not config.bias and not config.attn_bias:
            return "phi3"  # (transformers' Llama rotates whole heads; LongRoPE is Phi-3's)
        if config.attn_bias and not config.bias:
            return "qwen2"
        # (transformers' Llama has no sliding window; Mistral is Llama with one in every block)
        return "mistral" if config.sliding_window_size is not None else "llama"
    return "phi" if config.shared_attention_norm else "gpt_neox"


def config_to_hf(config: Config) -> dict:
    """A `config.json` (as a dict) that transformers loads into a model computing the same logits as `GPT(config)`.

    Raises `ConversionError` naming the field when no supported transformers architecture matches the config.
    """
    c = config
    model_type = hf_model_type(c)
    problems = []

    def require(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    gelu = {"none": "gelu", "tanh": "gelu_new"}[c.gelu_approximate]
    if model_type not in ("qwen3", "qwen3_moe", "gemma3_text", *OLMO_TYPES):
        require(not c.norm_qk, "norm_qk=True (of the transformers families, only Qwen3, Qwen3-MoE, Gemma 3 and OLMo "
                               "2/3 have query/key norms)")
    if model_type in OLMO_TYPES:
        require(c.norm_qk and c.norm_qk_type == "all", "no norm_qk over all the heads (norm_qk_type 'all': OLMo 2/3 "
                                                       "has it)")
        require(c.post_attention_norm and c.post_mlp_norm, "pre_norms=False without both post norms")
    else:
        require(c.pre_norms, "pre_norms=False (of the transformers families, only OLMo 2/3, with mlp_class_name "
                             "'LLaMAMLP', has no norm before the attention and the MLP)")
        require(c.norm_qk_type == "head", "norm_qk_type='all' (only OLMo 2/3 norms all the heads at once)")
    if model_type != "granite":
        for key in GRANITE_FIELDS:
            require(getattr(c, key) is None, f"{key}={getattr(c, key)!r} (of the transformers families, only Granite "
                                             "has it, with mlp_class_name 'LLaMAMLP')")
    if model_type not in GEMMA_TYPES:
        gemma_fields = ("norm_unit_offset", "scale_embeddings", "attention_scores_scalar",
                        "attention_logit_softcapping", "final_logit_softcapping")
        gemma_fields += () if model_type in OLMO_TYPES else ("post_attention_norm", "post_mlp_norm")
        gemma_fields += () if model_type == "olmo3" else ("rope_local_base_freq",)
        for key in gemma_fields:
            require(not getattr(c, key), f"{key}={getattr(c, key)!r} (only the Gemma families, with mlp_class_name "
                                         "'GemmaMLP', have it)")
        require(not c.rope_adjustments or set(c.rope_adjustments) != {"factor"},
                "linear rope_adjustments (exported as Gemma 3 only)")
    if model_type != "phi3":
        require(not c.rope_adjustments or "long_factor" not in c.rope_adjustments,
                "LongRoPE rope_adjustments (exported as Phi-3 only, a model without biases or query/key norms)")
    if model_type != "smollm3":
        require(c.rope_indices is None, "rope_indices (of the transformers families, only SmolLM3 has blocks without "
                                        "RoPE, and an MLP of mlp_class_name 'LLaMAMLP')")
    if model_type not in ("mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "smollm3",
                          "olmo3", *GEMMA_TYPES):
        require(c.sliding_window_size is None, f"sliding_window_size (transformers' {model_type} has no sliding "
                                               "window)")
    if model_type in ("mistral", "mixtral", "phi3", "qwen3_moe"):
        require(c.sliding_window_indices is None, f"sliding_window_indices (transformers' {model_type} has the "
                                                  "window in every block)")
    if model_type in GEMMA_TYPES:
        hf = _gemma_to_hf(c, model_type, require)
    elif model_type in LLAMA_SHAPED:
        require(c.norm_class_name == "RMSNorm", f"norm_class_name={c.norm_class_name!r} (needs 'RMSNorm')")
        require(not c.parallel_residual, "parallel_residual=True")
        require(c.rotary_percentage == 1.0 or model_type == "phi3",
                f"rotary_percentage={c.rotary_percentage} (needs 1.0)")
        require(not c.lm_head_bias, "lm_head_bias=True")
        require(c.bias == c.attn_bias or model_type not in ("llama", "smollm3", "granite"),
                "bias=True with attn_bias=False")
        require(not c.bias or model_type in ("llama", "smollm3", "granite"),
                "a bias (on every linear layer: only transformers' Llama, SmolLM3 and Granite have that)")
        if model_type in ("qwen3", "qwen3_moe"):
            require(not c.attn_bias and not c.bias, "a bias (transformers' Qwen3 has none, or one on q/k/v and o_proj "
                                                    "both)")
        if model_type in OLMO_TYPES:
            require(not c.attn_bias and not c.bias, "a bias (transformers' OLMo 2/3 has none, or one on q/k/v and "
                                                    "o_proj both)")
        if model_type == "mixtral":
            require(c.moe_norm_topk, "moe_norm_topk=False (Mixtral renormalises the chosen experts' weights)")
            require(c.expert_intermediate_size == c.intermediate_size,
                    f"moe_intermediate_size={c.moe_intermediate_size} differing from intermediate_size (Mixtral's "
                    "experts are intermediate_size wide)")
        architecture = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                        "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                        "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                        "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                        "olmo3": "Olmo3ForCausalLM", "granite": "GraniteForCausalLM"}.get(
            model_type, "LlamaForCausalLM")
        hf = dict(
            architectures=[architecture],
            model_type=model_type, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
            head_dim=c.head_size, hidden_act="silu", max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_base, rope_scaling=_rope_scaling_to_hf(c),
        )
        window = c.sliding_window_size
        if model_type == "llama":
            hf.update(attention_bias=c.bias, mlp_bias=c.bias)
        elif model_type == "granite":
            require(window is None, "sliding_window_size (transformers' Granite has no sliding window)")
            hf.update(attention_bias=c.bias, mlp_bias=c.bias, embedding_multiplier=c.embedding_multiplier or 1.0,
                      residual_multiplier=c.residual_multiplier or 1.0, logits_scaling=c.logits_scaling or 1.0,
                      attention_multiplier=c.attention_scale or c.head_size ** -0.5)
        elif model_type in OLMO_TYPES:
            hf.update(attention_bias=False)
            if model_type == "olmo3":  # (its RoPE per layer type, as transformers 5 writes it)
                local = c.rope_local_base_freq if c.rope_local_base_freq is not None else c.rope_base
                adj = c.rope_adjustments
                require(not adj or "beta_fast" in adj, "rope_adjustments other than YaRN's (exported for OLMo 3)")
                require(not adj or c.rope_local_base_freq is not None,
                        "YaRN rope_adjustments in the sliding-window blocks too (OLMo 3 scales its global ones only)")
                full = {"rope_type": "default", **(hf.pop("rope_scaling") or {}), "rope_theta": c.rope_base}
                hf.update(sliding_window=window, layer_types=_layer_types(c), rope_parameters={
                    "full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}})
        elif model_type == "smollm3":
            # (layer_types places the window, which transformers' SmolLM3 takes in any blocks)
            hf.update(attention_bias=c.bias, mlp_bias=c.bias, no_rope_layers=list(c.rope_indices),
                      no_rope_layer_interval=4, use_sliding_window=window is not None, sliding_window=window,
                      layer_types=_layer_types(c))
        elif model_type in ("mistral", "mixtral"):
            hf.update(sliding_window=window)
            if model_type == "mixtral":
                hf.update(num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
                          router_jitter_noise=0.0, output_router_logits=False)
        elif model_type == "phi3":
            adj = c.rope_adjustments
            require(not adj or "long_factor" in adj, "rope_adjustments other than LongRoPE's (Phi-3 has no other)")
            hf.update(partial_rotary_factor=c.rotary_percentage, sliding_window=window, resid_pdrop=0.0,
                      embd_pdrop=0.0, attention_dropout=0.0)
            if adj:
                hf.update(original_max_position_embeddings=adj["original_max_seq_len"])
        elif model_type == "qwen3_moe":
            # (num_experts: Qwen's own name, which transformers 4 reads and 5 maps to num_local_experts)
            hf.update(use_sliding_window=window is not None, sliding_window=window, attention_bias=False,
                      num_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
                      moe_intermediate_size=c.expert_intermediate_size, norm_topk_prob=c.moe_norm_topk,
                      decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False)
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
            if window is not None:
                # layer_types is what transformers reads now; max_window_layers what it read before it (the same
                # blocks when the windowed ones are the last ones, as Qwen's own configs have them)
                types = _layer_types(c)
                hf.update(use_sliding_window=True, sliding_window=window, layer_types=types,
                          max_window_layers=types.index("sliding_attention"))
            if model_type == "qwen3":
                hf.update(attention_bias=False)
            if model_type == "qwen2_moe":
                hf.update(qkv_bias=c.attn_bias, num_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
                          moe_intermediate_size=c.expert_intermediate_size, norm_topk_prob=c.moe_norm_topk,
                          shared_expert_intermediate_size=c.shared_expert_intermediate_size, decoder_sparse_step=1,
                          mlp_only_layers=[], output_router_logits=False)
    elif model_type == "phi":
        require(c.norm_class_name == "LayerNorm", f"norm_class_name={c.norm_class_name!r} (needs 'LayerNorm')")
        require(c.parallel_residual, "parallel_residual=False with a shared attention norm")
        require(c.bias, "bias=False (Phi has biases on every linear layer)")
        require(c.attn_bias, "attn_bias=False")
        require(c.rope_adjustments is None, "rope_adjustments (Phi has no llama3 rope scaling)")
        hf = dict(
            architectures=["PhiForCausalLM"], model_type="phi", hidden_size=c.n_embd,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
            num_key_value_heads=c.n_query_groups, hidden_act=gelu, max_position_embeddings=c.block_size,
            layer_norm_eps=c.norm_eps, rope_theta=c.rope_base, partial_rotary_factor=c.rotary_percentage,
            qk_layernorm=False, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        )
        if c.head_size * c.n_head != c.n_embd:
            hf["head_dim"] = c.head_size
    elif model_type == "gpt_neox":
        require(c.norm_class_name == "LayerNorm", f"norm_class_name={c.norm_class_name!r} (needs 'LayerNorm')")
        require(c.bias and c.attn_bias, "bias=False (GPT-NeoX has biases on every linear layer)")
        require(not c.lm_head_bias, "lm_head_bias=True")
        require(c.n_query_groups == c.n_head, f"n_query_groups={c.n_query_groups} (GPT-NeoX has no grouped KV)")
        require(c.head_size * c.n_head == c.n_embd, f"head_size={c.head_size} (needs n_embd / n_head)")
        require(c.rope_adjustments is None, "rope_adjustments (GPT-NeoX has no llama3 rope scaling)")
        hf = dict(
            architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_size=c.n_embd,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
            hidden_act=gelu, max_position_embeddings=c.block_size, layer_norm_eps=c.norm_eps,
            rotary_emb_base=c.rope_base, rotary_pct=c.rotary_percentage, use_parallel_residual=c.parallel_residual,
            attention_bias=True,
        )
    else:  # gpt2
        require(c.norm_class_name == "LayerNorm", f"norm_class_name={c.norm_class_name!r} (needs 'LayerNorm')")
        require(c.mlp_class_name == "GptNeoxMLP", f"mlp_class_name={c.mlp_class_name!r} (needs 'GptNeoxMLP')")
        require(not c.parallel_residual, "parallel_residual=True")
        require(c.bias and c.attn_bias, "bias=False (GPT-2 has biases on every linear layer)")
        require(not c.lm_head_bias, "lm_head_bias=True")
        require(c.n_query_groups == c.n_head, f"n_query_groups={c.n_query_groups} (GPT-2 has no grouped KV)")
        require(c.head_size * c.n_head == c.n_embd, f"head_size={c.head_size} (needs n_embd / n_head)")
        hf = dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, n_inner=c.intermediate_size, n_positions=c.block_size, n_ctx=c.block_size,
            activation_function=gelu, layer_norm_epsilon=c.norm_eps,
        )
    if problems:
        raise ConversionError(
            f"Config {c.name!r} cannot be exported as a transformers {model_type!r} model: {'; '.join(problems)}."
        )
    hf.update(vocab_size=c.padded_vocab_size, tie_word_embeddings=c.tie_embeddings)
    return hf


def _gemma_to_hf(c: Config, model_type: str, require) -> dict:
    require(c.norm_class_name == "RMSNorm" and c.norm_unit_offset,
            "norm_class_name other than 'RMSNorm' with norm_unit_offset=True (Gemma's norm)")
    require(c.scale_embeddings, "scale_embeddings=False (Gemma scales its embeddings)")
    require(not c.bias and not c.attn_bias and not c.lm_head_bias, "a bias (Gemma's linear layers have none)")
    require(c.rotary_percentage == 1.0, f"rotary_percentage={c.rotary_percentage} (needs 1.0)")
    require(not c.parallel_residual, "parallel_residual=True")
    require(c.post_attention_norm == c.post_mlp_norm, "only one of post_attention_norm and post_mlp_norm")
    architecture = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
    hf = dict(
        architectures=[architecture[model_type]], model_type=model_type, hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_query_groups, head_dim=c.head_size, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, attention_bias=False,
    )
    act = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[c.gelu_approximate]
    if model_type == "gemma":
        require(c.gelu_approximate == "tanh", "gelu_approximate='none' (transformers runs Gemma 1 with the tanh GELU)")
        require(c.attention_scores_scalar in (None, c.head_size), "attention_scores_scalar (Gemma 1 has none)")
        require(c.sliding_window_size is None, "sliding_window_size (Gemma 1 has no sliding window)")
        require(c.attention_logit_softcapping is None and c.final_logit_softcapping is None,
                "logit soft-capping (Gemma 1 has none)")
        require(c.rope_adjustments is None, "rope_adjustments (Gemma 1 has plain RoPE)")
        hf.update(hidden_act=act)
        return hf
    window = c.sliding_window_size
    hf.update(
        hidden_activation=act, hidden_act=act, query_pre_attn_scalar=c.attention_scores_scalar or c.head_size,
        attn_logit_softcapping=c.attention_logit_softcapping, final_logit_softcapping=c.final_logit_softcapping,
        sliding_window=window,
        layer_types=_layer_types(c),
    )
    if model_type == "gemma2":
        require(c.rope_adjustments is None, "rope_adjustments (Gemma 2 has plain RoPE)")
        require(c.rope_local_base_freq is None, "rope_local_base_freq (Gemma 2 has one RoPE base)")
    else:
        adj = c.rope_adjustments
        require(not adj or set(adj) == {"factor"}, "llama3 rope_adjustments (Gemma 3 scales RoPE linearly)")
        hf.update(rope_scaling=_rope_scaling_to_hf(c),
                  rope_local_base_freq=c.rope_local_base_freq if c.rope_local_base_freq is not None else c.rope_base)
    return hf


def _rope_scaling_to_hf(config: Config) -> Optional[dict]:
    adj = config.rope_adjustments
    if not adj:
        return None
    if set(adj) == {"factor"}:
        return dict(rope_type="linear", factor=adj["factor"])
    if "beta_fast" in adj:
        return dict(rope_type="yarn", factor=adj["factor"],
                    original_max_position_embeddings=adj["original_max_seq_len"], beta_fast=adj["beta_fast"],
                    beta_slow=adj["beta_slow"], attention_factor=adj["attention_factor"],
                    truncate=adj.get("truncate", True))
    if "long_factor" in adj:
        return dict(rope_type="longrope", type="longrope", short_factor=adj["short_factor"],
                    long_factor=adj["long_factor"], attention_factor=adj["attention_factor"],
                    original_max_position_embeddings=adj["original_max_seq_len"])
    return dict(
        rope_type="llama3", factor=adj["factor"], low_freq_factor=adj["low_freq_factor"],
        high_freq_factor=adj["high_freq_factor"], original_max_position_embeddings=adj["original_max_seq_len"],
    )


###################################################################################################
# state dicts
###################################################################################################
_PREFIX = re.compile(r"^(?:model|transformer|gpt_neox)\.")
# a multimodal Gemma 3's text model, as transformers >= 4.52 and as transformers 4.50/4.51 saved it; its vision tower
# and projector, which the text model does not use
_MULTIMODAL_TEXT = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|language_model\.)")
MULTIMODAL_OTHER = re.compile(r"^(?:model\.)?(?:vision_tower|multi_modal_projector)\.")
_LAYER = re.compile(r"^(?:layers|h)\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBALS = {
    "embed_tokens": "transformer.wte", "wte": "transformer.wte", "embed_in": "transformer.wte",
    "wpe": "transformer.wpe",
    "norm": "transformer.ln_f", "final_layernorm": "transformer.ln_f", "final_layer_norm": "transformer.ln_f",
    "ln_f": "transformer.ln_f",
    "lm_head": "lm_head", "embed_out": "lm_head",
}
# per-layer HF module -> (lit module, GPT-2 Conv1D weight stored transposed)
_LAYER_MODULES = {
    "input_layernorm": ("norm_1", False), "ln_1": ("norm_1", False),
    "post_attention_layernorm": ("norm_2", False), "ln_2": ("norm_2", False),
    "self_attn.o_proj": ("attn.proj", False), "self_attn.dense": ("attn.proj", False),
    "attention.dense": ("attn.proj", False), "attn.c_proj": ("attn.proj", True),
    "attn.c_attn": ("attn.qkv", True),
    "mlp.gate_proj": ("mlp.fc_1", False), "mlp.up_proj": ("mlp.fc_2", False), "mlp.down_proj": ("mlp.proj", False),
    "self_attn.q_norm": ("attn.norm_q", False), "self_attn.k_norm": ("attn.norm_k", False),  # Qwen3
    "mlp.fc1": ("mlp.fc", False), "mlp.fc2": ("mlp.proj", False),
    "mlp.dense_h_to_4h": ("mlp.fc", False), "mlp.dense_4h_to_h": ("mlp.proj", False),
    "mlp.c_fc": ("mlp.fc", True), "mlp.c_proj": ("mlp.proj", True),
}
_SPLIT_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
# Phi-3's fused layers: its q/k/v rows are lit's layout already; its gate_up_proj is [gate | up]
_FUSED_QKV, _GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"
# Gemma 2/3's sandwich norms: its post_attention_layernorm follows the attention (lit's post_attention_norm) and its
# pre_feedforward_layernorm is lit's norm_2; in every other family post_attention_layernorm is norm_2
_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "norm_2",
                "post_feedforward_layernorm": "post_mlp_norm"}
# a mixture of experts' router and experts: Mixtral's (block_sparse_moe, w1/w3/w2) and Qwen3-MoE's (mlp,
# gate_proj/up_proj/down_proj), lit's `mlp.gate` and `mlp.experts.{e}.fc_1/fc_2/proj`
_ROUTER = ("block_sparse_moe.gate", "mlp.gate")
# Qwen2-MoE's shared expert and its gate, lit's `mlp.shared_expert.fc_1/fc_2/proj` and `mlp.shared_expert_gate`
_SHARED_EXPERT = {"mlp.shared_expert.gate_proj": "mlp.shared_expert.fc_1",
                  "mlp.shared_expert.up_proj": "mlp.shared_expert.fc_2",
                  "mlp.shared_expert.down_proj": "mlp.shared_expert.proj",
                  "mlp.shared_expert_gate": "mlp.shared_expert_gate"}
_SHARED_EXPERT_HF = {lit: hf for hf, lit in _SHARED_EXPERT.items()}
_EXPERT = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)$")
_FUSED_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_EXPERT_PARTS = {"w1": "fc_1", "w3": "fc_2", "w2": "proj", "gate_proj": "fc_1", "up_proj": "fc_2", "down_proj": "proj"}
# of a model without `norm_qk`, these are unexpected tensors like any other unknown one
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
# buffers some checkpoints carry (causal masks, RoPE frequencies); recomputed by the model, never weights
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|^(?:layers|h)\.\d+\.(?:attn|attention)\.(?:bias|masked_bias))$")


def iter_hf_to_lit(
    tensors: Iterable[tuple[str, torch.Tensor]], config: Config, dtype: Optional[torch.dtype] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Lit (name, tensor) pairs from HF ones, in one pass: only the q/k/v pieces of a layer wait for each other."""
    hs = config.head_size
    pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    for hf_key, t in tensors:
        if MULTIMODAL_OTHER.match(hf_key):
            continue
        key = _PREFIX.sub("", _MULTIMODAL_TEXT.sub("", hf_key))
        if _IGNORED.search(key):
            continue
        module, _, param = key.rpartition(".")
        if module in _GLOBALS and param in ("weight", "bias"):
            # a tied head is yielded too: `untie_differing_head` drops it, or unties the config as transformers does
            yield f"{_GLOBALS[module]}.{param}", cast(t)
            continue
        fused = _FUSED_EXPERTS.match(key) if config.n_expert else None
        if fused:  # transformers 5's layout in memory: every expert's projection in one tensor
            layer, name = fused.group(1), fused.group(2)
            for e, w in enumerate(t.unbind(0)):
                parts = w.chunk(2) if name == "gate_up_proj" else (w,)
                for part, lit_name in zip(parts, ("fc_1", "fc_2") if name == "gate_up_proj" else ("proj",)):
                    yield f"transformer.h.{layer}.mlp.experts.{e}.{lit_name}.weight", cast(part.clone())
            continue
        m = _LAYER.match(key)
        if m is None:
            raise ConversionError(f"Unexpected tensor {hf_key!r}: lit_gpt does not know where it belongs.")
        layer, module, param = int(m.group(1)), m.group(2), m.group(3)
        prefix = f"transformer.h.{layer}"
        if module in _SPLIT_QKV:
            parts = pending.setdefault((layer, param), {})
            parts[_SPLIT_QKV[module]] = t
            if len(parts) == 3:
                del pending[(layer, param)]
                yield f"{prefix}.attn.qkv.{param}", cast(torch.cat((parts["q"], parts["k"], parts["v"])))
        elif module == _FUSED_QKV:
            yield f"{prefix}.attn.qkv.{param}", cast(t)
        elif module == _GATE_UP:
            gate, up = t.chunk(2)
            yield f"{prefix}.mlp.fc_1.{param}", cast(gate.clone())
            yield f"{prefix}.mlp.fc_2.{param}", cast(up.clone())
        elif module == "attention.query_key_value":
            # GPT-NeoX interleaves per head: rows are [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]
            t = t.reshape(config.n_head, 3, hs, *t.shape[1:])
            qkv = torch.cat([t[:, i].reshape(config.n_head * hs, *t.shape[3:]) for i in range(3)])
            yield f"{prefix}.attn.qkv.{param}", cast(qkv)
        elif module in _GEMMA_NORMS and config.post_attention_norm:
            yield f"{prefix}.{_GEMMA_NORMS[module]}.{param}", cast(t)
        elif config.n_expert and module in _ROUTER:
            yield f"{prefix}.mlp.gate.{param}", cast(t)
        elif config.shared_expert_intermediate_size and module in _SHARED_EXPERT:
            yield f"{prefix}.{_SHARED_EXPERT[module]}.{param}", cast(t)
        elif config.n_expert and (expert := _EXPERT.match(module)):
            yield f"{prefix}.mlp.experts.{expert.group(1)}.{_EXPERT_PARTS[expert.group(2)]}.{param}", cast(t)
        elif module in _LAYER_MODULES and (config.norm_qk or module not in _QK_NORMS):
            lit_module, transposed = _LAYER_MODULES[module]
            if transposed and param == "weight":
                t = t.t().contiguous()
            yield f"{prefix}.{lit_module}.{param}", cast(t)
        else:
            raise ConversionError(f"Unexpected tensor {hf_key!r}: lit_gpt does not know where it belongs.")
    if pending:
        (layer, param), parts = next(iter(pending.items()))
        missing = sorted({"q", "k", "v"} - set(parts))
        raise ConversionError(
            f"The checkpoint has no {'/'.join(f'{p}_proj' for p in missing)}.{param} for layer {layer}; "
            "it is incomplete (a shard missing?)."
        )


def untie_differing_head(lit_sd: dict, config: Config, where: str) -> Optional[str]:
    """With `tie_embeddings`, drop a stored `lm_head.weight` equal to the embedding (lit stores the shared tensor
    once), or keep one that differs and set `config.tie_embeddings = False`: transformers then loads the stored head
    (a fine-tune that trained it on its own), so the logits stay the same. Returns a note for the user in that case."""
    head = lit_sd.get("lm_head.weight")
    if not config.tie_embeddings or head is None:
        return None
    wte = lit_sd.get("transformer.wte.weight")
    if wte is None or (head.shape == wte.shape and torch.equal(head, wte)):
        del lit_sd["lm_head.weight"]
        return None
    config.tie_embeddings = False
    return (
        f"Note: config.json of {where} sets tie_word_embeddings, but its lm_head.weight differs from the embedding; "
        "kept both, as transformers does (the model is converted untied)."
    )


def hf_to_lit_state_dict(hf_sd: dict, config: Config, dtype: Optional[torch.dtype] = None) -> dict:
    """A lit state dict (as `lit_model.pth` stores it) from a transformers state dict of any supported family.
    A tied head that differs from the embedding unties `config` (`untie_differing_head`)."""
    lit_sd = dict(iter_hf_to_lit(hf_sd.items(), config, dtype))
    untie_differing_head(lit_sd, config, "the state dict")
    check_lit_state_dict(lit_sd, config, "the converted checkpoint")
    return lit_sd


def expected_lit_shapes(config: Config) -> dict[str, torch.Size]:
    from lit_gpt.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_lit_state_dict(sd: dict, config: Config, where: str, hf_model_type: Optional[str] = None) -> None:
    """Fail with one sentence when `sd` does not fit `GPT(config)` (names, shapes).

    With `hf_model_type` (`sd` was converted from a transformers checkpoint of that type), missing and unexpected
    tensors are named as they are in the user's file, not by their lit names.
    """
    expected = expected_lit_shapes(config)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if hf_model_type is not None:
        missing = _hf_names(missing, expected, config, hf_model_type)
        unexpected = _hf_names(unexpected, {k: v.shape for k, v in sd.items()}, config, hf_model_type)
    if missing or unexpected:
        hint = ""
        if any(("adapter" in k or "lora" in k or "ether" in k or "oft" in k) for k in unexpected):
            hint = " It holds adapter weights: merge them into the base first (scripts/merge_ether.py, merge_lora.py)."
        raise ConversionError(
            f"The tensors of {where} do not match the model config: missing {missing[:4]}"
            f"{' …' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}{' …' if len(unexpected) > 4 else ''}."
            + hint
        )
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise ConversionError(
                f"Tensor {k!r} of {where} has shape {tuple(sd[k].shape)} but the model config needs {tuple(shape)}."
            )


def _hf_names(names: list[str], shapes: dict, config: Config, model_type: str) -> list[str]:
    """The transformers names of lit tensors (a fused qkv is three); a name without one is kept as it is."""
    out = []
    for name in names:
        try:
            hf = [k for k, _ in iter_lit_to_hf([(name, torch.empty(shapes[name], device="meta"))], config, model_type)]
        except Exception:  # a shape the split does not fit: the lit name still says which tensor
            hf = []
        if model_type == "phi" and name != "lm_head.bias":
            hf = [k for k in hf if k != "lm_head.bias"]  # the zero bias a phi export adds is not this tensor
        out.extend(hf or [name])
    return sorted(dict.fromkeys(out))


def iter_lit_to_hf(
    tensors: Iterable[tuple[str, torch.Tensor]], config: Config, model_type: str, dtype: Optional[torch.dtype] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs, named as `save_pretrained` of `model_type` names them, from lit ones."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"Cannot export to model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}.")
    c = config
    llama_like = model_type in GEMMA_TYPES or (model_type in LLAMA_SHAPED and model_type not in MOE_TYPES)
    moe = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    expert_parts = {"fc_1": "w1", "fc_2": "w3", "proj": "w2"} if model_type == "mixtral" else {
        "fc_1": "gate_proj", "fc_2": "up_proj", "proj": "down_proj"}
    gate_up: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # Phi-3: (layer, param) -> the half seen first
    prefix = {"gpt2": "transformer.", "gpt_neox": "gpt_neox."}.get(model_type, "model.")
    layers = "h" if model_type == "gpt2" else "layers"
    globals_ = {
        "transformer.wte": {"gpt2": "wte", "gpt_neox": "embed_in"}.get(model_type, "embed_tokens"),
        "transformer.wpe": "wpe",
        "transformer.ln_f": {"gpt2": "ln_f", "gpt_neox": "final_layer_norm", "phi": "final_layernorm"}.get(
            model_type, "norm"
        ),
    }
    modules = {
        "norm_1": "ln_1" if model_type == "gpt2" else "input_layernorm",
        "norm_2": "ln_2" if model_type == "gpt2" else "post_attention_layernorm",
        "attn.proj": {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense", "phi": "self_attn.dense"}.get(
            model_type, "self_attn.o_proj"
        ),
        "mlp.fc_1": "mlp.gate_proj", "mlp.fc_2": "mlp.up_proj",
        "mlp.proj": {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "phi": "mlp.fc2"}.get(
            model_type, "mlp.down_proj"
        ),
        "mlp.fc": {"gpt2": "mlp.c_fc", "gpt_neox": "mlp.dense_h_to_4h"}.get(model_type, "mlp.fc1"),
        "attn.norm_q": "self_attn.q_norm", "attn.norm_k": "self_attn.k_norm",
    }
    if c.post_attention_norm or c.post_mlp_norm:  # Gemma 2/3 (`_GEMMA_NORMS`)
        modules.update({lit: hf for hf, lit in _GEMMA_NORMS.items()})
    lm_head = "embed_out" if model_type == "gpt_neox" else "lm_head"
    q_size, kv_size = c.n_head * c.head_size, c.n_query_groups * c.head_size
    seen_lm_head_bias = False

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    for key, t in tensors:
        key = key.removeprefix("_orig_mod.")
        module, _, param = key.rpartition(".")
        if module == "lm_head":
            if param == "weight" and c.tie_embeddings:
                continue
            seen_lm_head_bias |= param == "bias"
            yield f"{lm_head}.{param}", cast(t)
            continue
        if module in globals_:
            yield f"{prefix}{globals_[module]}.{param}", cast(t)
            continue
        m = re.match(r"^transformer\.h\.(\d+)\.(.+)$", module)
        if m is None:
            raise ConversionError(f"Unexpected tensor {key!r} in the lit checkpoint.")
        layer, sub = m.group(1), m.group(2)
        base = f"{prefix}{layers}.{layer}"
        if sub == "attn.qkv":
            q, k, v = t.split((q_size, kv_size, kv_size))
            if model_type == "gpt2":
                fused = torch.cat((q, k, v))
                yield f"{base}.attn.c_attn.{param}", cast(fused.t() if param == "weight" else fused)
            elif model_type == "phi3":
                yield f"{base}.self_attn.qkv_proj.{param}", cast(t)
            elif model_type == "gpt_neox":
                rest = t.shape[1:]
                heads = [x.reshape(c.n_head, c.head_size, *rest) for x in (q, k, v)]
                yield f"{base}.attention.query_key_value.{param}", cast(
                    torch.stack(heads, dim=1).reshape(3 * q_size, *rest)
                )
            else:
                # clones: the three slices must not share storage in a safetensors file
                for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    yield f"{base}.self_attn.{name}.{param}", cast(part.clone())
            continue
        if model_type in MOE_TYPES and sub == "mlp.gate":
            yield f"{base}.{moe}.gate.{param}", cast(t)
            continue
        if model_type == "qwen2_moe" and sub in _SHARED_EXPERT_HF:
            yield f"{base}.{_SHARED_EXPERT_HF[sub]}.{param}", cast(t)
            continue
        expert = re.match(r"^mlp\.experts\.(\d+)\.(fc_1|fc_2|proj)$", sub)
        if model_type in MOE_TYPES and expert:
            yield f"{base}.{moe}.experts.{expert.group(1)}.{expert_parts[expert.group(2)]}.{param}", cast(t)
            continue
        if (sub not in modules or (sub in ("mlp.fc_1", "mlp.fc_2") and not llama_like)
                or (sub in ("attn.norm_q", "attn.norm_k")
                    and model_type not in ("qwen3", "qwen3_moe", "gemma3_text", *OLMO_TYPES))
                or (sub in ("post_attention_norm", "post_mlp_norm") and model_type not in (*GEMMA_TYPES, *OLMO_TYPES))):
            raise ConversionError(f"Unexpected tensor {key!r} in the lit checkpoint for a {model_type} export.")
        if model_type == "phi3" and sub in ("mlp.fc_1", "mlp.fc_2"):
            halves = gate_up.setdefault((layer, param), {})
            halves[sub] = t
            if len(halves) == 2:
                del gate_up[(layer, param)]
                yield f"{base}.mlp.gate_up_proj.{param}", cast(torch.cat((halves["mlp.fc_1"], halves["mlp.fc_2"])))
            continue
        transposed = model_type == "gpt2" and param == "weight" and sub in ("attn.proj", "mlp.fc", "mlp.proj")
        yield f"{base}.{modules[sub]}.{param}", cast(t.t() if transposed else t)
    if gate_up:
        (layer, param), halves = next(iter(gate_up.items()))
        raise ConversionError(f"The lit checkpoint has only {next(iter(halves))}.{param} of layer {layer}'s MLP.")
    if model_type == "phi" and not seen_lm_head_bias:
        # transformers' Phi always has an output bias; zeros compute what a bias-free head computes
        yield "lm_head.bias", torch.zeros(c.padded_vocab_size, dtype=dtype or torch.float32)


def lit_to_hf_state_dict(lit_sd: dict, config: Config, model_type: Optional[str] = None) -> dict:
    """A transformers state dict of `model_type` (default: `hf_model_type(config)`) from a lit state dict."""
    return dict(iter_lit_to_hf(lit_sd.items(), config, model_type or hf_model_type(config)))


###################################################################################################
# folders
###################################################################################################
def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def find_hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files of a transformers folder, in transformers' order: `model.safetensors`, else the shards its
    index (`*.index.json`) lists, then the same for `pytorch_model.bin`; without either, every `*.safetensors`
    (or `pytorch_model*.bin`), which `iter_hf_tensors` refuses to merge when two hold the same tensor."""
    for single, index_name, pattern in (
        ("model.safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        # e.g. next to adapter_model.safetensors or model.fp16.safetensors, which transformers does not load
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise ConversionError(
                    f"{index} is not a JSON index with a weight_map ({e}); download it again."
                ) from None
            files = [checkpoint_dir / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ConversionError(
                    f"{index} lists {absent[0]!r}, which is missing from {checkpoint_dir}: the download is "
                    "incomplete; run scripts/download.py again."
                )
            return files
        # Mistral repos also ship `consolidated.safetensors` in Mistral's own layout: not a transformers file
        files = sorted(p for p in checkpoint_dir.glob(pattern) if not p.name.startswith("consolidated"))
        if files:
            return files
    return []


def iter_hf_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from each weight file in turn, one tensor in memory at a time for safetensors."""
    from lit_gpt.utils import checkpoint_read_error, load_file

    found_in: dict[str, Path] = {}

    def check_new(key: str, path: Path) -> None:
        # two unindexed files with the same tensor (an old copy, another variant): silently keeping the last one
        # would convert a model transformers never loads
        if key in found_in:
            raise ConversionError(
                f"Tensor {key!r} is in both {str(found_in[key])!r} and {str(path)!r}, so it is unclear which file "
                "belongs to the model: move the one that does not out of the folder (or add an index file)."
            )
        found_in[key] = path

    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                f = safe_open(str(path), framework="pt", device="cpu")
            except SafetensorError as e:  # a truncated download: "incomplete metadata, file not fully covered"
                raise checkpoint_read_error(path, e) from None
            with f:
                for key in f.keys():
                    check_new(key, path)
                    yield key, f.get_tensor(key)
        else:
            sd = load_file(path)  # torch.load(weights_only=True, mmap=True): no pickled code runs
            if not isinstance(sd, dict):
                raise ConversionError(f"{path} does not hold a state dict.")
            for key in list(sd):
                check_new(key, path)
                yield key, sd.pop(key)
            del sd


def read_hf_config(path: Path) -> dict:
    """The JSON object in a transformers `config.json`, or a `ConversionError` naming the file."""
    from lit_gpt.utils import read_json_object

    return read_json_object(path, "download it again", holds="the model's config", error=ConversionError)


def convert_hf_checkpoint(
    checkpoint_dir: Path | str, dtype: Optional[str | torch.dtype] = None, model_name: Optional[str] = None
) -> Config:
    """Write `lit_model.pth` and `model_config.yaml` into `checkpoint_dir`, a transformers model folder.

    The config is derived from the folder's `config.json`; `model_name` (e.g. `meta-llama/Llama-2-7b-hf`) only names
    it (default: the folder's name). Floats are cast to `dtype` when given, else kept as stored.
    """
    from lit_gpt.utils import WEIGHTS_FILENAME, atomic_save

    checkpoint_dir = Path(checkpoint_dir)
    torch_dtype = parse_dtype(dtype)
    if checkpoint_dir.is_file():
        from lit_gpt.utils import not_a_directory_error

        raise not_a_directory_error(checkpoint_dir, "a Hugging Face model folder (config.json + weights)")
    if not checkpoint_dir.is_dir():
        from lit_gpt.utils import missing_checkpoint_dir_error

        raise missing_checkpoint_dir_error(checkpoint_dir, hf_folder=True)
    hf_config_path = checkpoint_dir / HF_CONFIG_FILENAME
    if not hf_config_path.is_file():
        from lit_gpt.utils import peft_adapter_error

        peft = peft_adapter_error(checkpoint_dir)
        if peft is not None:
            raise peft
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} has no config.json: download the model with "
            "`python scripts/download.py --repo_id ORG/NAME` (it fetches config.json with the weights)."
        )
    hf_config = read_hf_config(hf_config_path)
    multimodal = hf_config.get("model_type") in MULTIMODAL_TEXT_TYPES
    hf_config = text_config(hf_config)
    # an export of ours names the model it came from, so a round trip keeps the name adapters were trained under
    config = config_from_hf(hf_config, name=model_name or hf_config.get(LIT_NAME_KEY) or checkpoint_dir.name)
    files = find_hf_weight_files(checkpoint_dir)
    if not files:
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} has no weights (*.safetensors or pytorch_model*.bin): download them with "
            "`python scripts/download.py --repo_id ORG/NAME`."
        )
    lit_sd = dict(iter_hf_to_lit(iter_hf_tensors(files), config, torch_dtype))
    note = untie_differing_head(lit_sd, config, repr(str(checkpoint_dir)))
    if note is not None:
        print(note, file=sys.stderr)
    check_lit_state_dict(lit_sd, config, f"the checkpoint in {checkpoint_dir}", hf_config.get("model_type"))
    atomic_save(lit_sd, checkpoint_dir / WEIGHTS_FILENAME)
    config.save(checkpoint_dir)
    if multimodal:
        print(f"Note: {str(checkpoint_dir)!r} holds a multimodal model; converted its text model (images are not "
              "supported), which exports as a text-only transformers model.", file=sys.stderr)
    return config


def convert_lit_checkpoint(
    checkpoint_dir: Path | str,
    output_dir: Path | str,
    dtype: Optional[str | torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a transformers model folder for the lit checkpoint in `checkpoint_dir` into `output_dir`."""
    from lit_gpt.utils import WEIGHTS_FILENAME, atomic_write_text, check_checkpoint_dir, check_output_dir, load_file

    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    from lit_gpt.merge import check_tokenizer_files

    check_tokenizer_files(checkpoint_dir)  # copied into the export: a corrupt one stops it before the weight work
    output_dir = check_output_dir(output_dir, "--output_dir")
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ConversionError(
            f"--output_dir {str(output_dir)!r} is the checkpoint directory itself; pick a new folder so the export "
            "does not overwrite the original config.json and weights."
        )
    _check_not_another_model(output_dir)
    torch_dtype = parse_dtype(dtype)
    config = Config.from_checkpoint(checkpoint_dir)
    hf_config = config_to_hf(config)
    model_type = hf_config["model_type"]

    lit_sd = load_file(checkpoint_dir / WEIGHTS_FILENAME)
    if "model" in lit_sd and isinstance(lit_sd["model"], dict):  # a training checkpoint
        lit_sd = lit_sd["model"]
    lit_sd = {k.removeprefix("_orig_mod."): v for k, v in lit_sd.items()}
    if config.tie_embeddings:
        lit_sd.pop("lm_head.weight", None)
    check_lit_state_dict(lit_sd, config, str(checkpoint_dir / WEIGHTS_FILENAME))
    floats = [v.dtype for v in lit_sd.values() if v.is_floating_point()]
    out_dtype = torch_dtype or (floats[0] if floats else torch.float32)

    output_dir.mkdir(parents=True, exist_ok=True)
    convert = lambda sd: iter_lit_to_hf(sd.items(), config, model_type, out_dtype)  # noqa: E731
    plan = _shard_plan(convert, lit_sd, max_shard_bytes)
    # An earlier export's files go before the first new one is written: transformers would load stale weight files
    # with (or instead of) ours, and stale shards next to new ones of the same names would make an interrupted
    # export a silent mix of two models (without them it is a folder transformers refuses: shards, no index). Its
    # tokenizer files go too where the checkpoint has its own (a stale chat_template.jinja takes priority).
    stale = _remove_earlier_export(output_dir, checkpoint_dir if _has_vocabulary(checkpoint_dir) else None)
    gone = [name for name in stale if name not in plan.names]
    if gone:
        print(f"Removed {', '.join(gone)} from {str(output_dir)!r}: files of an earlier export that transformers "
              "would have loaded with (or instead of) this one.", file=sys.stderr)
    source_hf = _read_json(checkpoint_dir / HF_CONFIG_FILENAME)
    generation = _read_json(checkpoint_dir / "generation_config.json")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf_config[key] = source_hf.get(key, generation.get(key))
    hf_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    hf_config[LIT_NAME_KEY] = config.name
    # config.json before the weights: it marks the folder as our export, so that the same command run again after
    # an interruption goes on (shards without their index or config.json would be taken for another model), and
    # transformers loads nothing from it until the weights (the index, or model.safetensors) are in place
    atomic_write_text(output_dir / HF_CONFIG_FILENAME, json.dumps(hf_config, indent=2) + "\n")
    _write_shards(convert, lit_sd, output_dir, plan)
    if generation:
        _copy(checkpoint_dir / "generation_config.json", output_dir)
    else:
        ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config[k] is not None}
        atomic_write_text(output_dir / "generation_config.json", json.dumps(ids, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            _copy(checkpoint_dir / name, output_dir)
    _carry_prompt_style(checkpoint_dir, output_dir)
    warning = tokenizer_files_warning(checkpoint_dir, output_dir)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)
    return output_dir


def _carry_prompt_style(checkpoint_dir: Path, output_dir: Path) -> None:
    """A fine-tuned checkpoint's `prompt_style.yaml` (the format and system prompt it was trained with) goes along,
    so that converting the export back restores it, with a note: transformers never reads it, and its chat template
    (with its own default system prompt) is not what the model learnt."""
    from lit_gpt.merge import PROMPT_STYLE_FILENAME, read_prompt_style_file, write_prompt_style_file

    spec = read_prompt_style_file(checkpoint_dir)
    write_prompt_style_file(output_dir, spec)  # (None: an earlier export's goes)
    if spec is None:
        return
    system, name = spec.get("system_prompt"), spec["prompt_style"]
    if name == "chat_template" and not system:
        return  # the export's own chat template is the format
    fmt = "its chat template" if name == "chat_template" else f"the {name} prompt format"
    with_system = f" with the system prompt {system!r}" if system else ""
    print(f"note: {str(checkpoint_dir)!r} was fine-tuned on {fmt}{with_system} ({PROMPT_STYLE_FILENAME}, copied "
          "along), which transformers does not read: prompt the export "
          + ("that way" if name != "chat_template" else "with its chat template")
          + (", giving that system prompt as the first message" if system else "") + ".", file=sys.stderr)


def tokenizer_files_warning(checkpoint_dir: Path, output_dir: Path) -> Optional[str]:
    """What an export of `checkpoint_dir` lacks for `transformers.AutoTokenizer.from_pretrained(output_dir)` (None:
    nothing): a vocabulary (tokenizer.json, tokenizer.model, or vocab.json with merges.txt), or tokenizer_config.json
    (without it AutoTokenizer guesses the tokenizer class, special tokens and chat template from the model type)."""
    present = [name for name in TOKENIZER_FILES if (checkpoint_dir / name).is_file()]
    has_vocab = _has_vocabulary(checkpoint_dir)
    fix = (f"copy the tokenizer files from the original model folder (the Hugging Face download the checkpoint was "
           f"converted from) into {str(output_dir)!r}")
    if not has_vocab:
        missing = "tokenizer.json, tokenizer.model, vocab.json + merges.txt, tokenizer_config.json"
        found = f" (it has only {', '.join(present)})" if present else ""
        return (f"the checkpoint folder {str(checkpoint_dir)!r} has no tokenizer files{found}, so the export cannot "
                f"be loaded with AutoTokenizer.from_pretrained: none of {missing} was found; {fix}.")
    if "tokenizer_config.json" not in present:
        return (f"the checkpoint folder {str(checkpoint_dir)!r} has {', '.join(present)} but no tokenizer_config.json, "
                "so AutoTokenizer.from_pretrained guesses the export's tokenizer class, special tokens and chat "
                f"template from its model type; {fix}.")
    return None


class _ShardPlan(NamedTuple):
    names: list[str]  # the weight files, the index last where there is one
    shard_of: dict[str, int]  # HF tensor name -> index into `names`
    total_bytes: int


def _has_vocabulary(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer's vocabulary: tokenizer.json, tokenizer.model, or vocab.json + merges.txt."""
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")) or all(
        (folder / name).is_file() for name in ("vocab.json", "merges.txt"))


def _shard_plan(convert, lit_sd: dict, max_shard_bytes: int) -> _ShardPlan:
    """Which tensors of `convert(lit_sd)` go into which safetensors file: a pass over meta tensors (free: no data)
    sizes them, which fixes the shard count before anything is written."""
    plan: list[list[str]] = [[]]
    shard_bytes = total = 0
    for name, t in convert({k: v.to("meta") for k, v in lit_sd.items()}):
        size = t.numel() * t.element_size()
        if plan[-1] and shard_bytes + size > max_shard_bytes:
            plan.append([])
            shard_bytes = 0
        plan[-1].append(name)
        shard_bytes += size
        total += size
    n = len(plan)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {name: i for i, names_in in enumerate(plan) for name in names_in}
    if n > 1:
        names.append("model.safetensors.index.json")
    return _ShardPlan(names, shard_of, total)


def _write_shards(convert, lit_sd: dict, output_dir: Path, plan: _ShardPlan) -> None:
    """Write `convert(lit_sd)` as `plan` says, holding one shard's converted tensors in memory at a time, each file
    atomically and the index last, so that an interrupted export is never a loadable folder."""
    from safetensors.torch import save_file

    from lit_gpt.utils import atomic_path, atomic_write_text

    def write(i: int, tensors: dict) -> None:
        with atomic_path(output_dir / plan.names[i]) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})

    current, buffer = 0, {}
    for name, t in convert(lit_sd):
        if plan.shard_of[name] != current:
            write(current, buffer)
            current, buffer = plan.shard_of[name], {}
        buffer[name] = t
    write(current, buffer)
    if plan.names[-1].endswith(".index.json"):
        weight_map = {name: plan.names[i] for name, i in plan.shard_of.items()}
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
        atomic_write_text(output_dir / plan.names[-1], json.dumps(index, indent=2))


# the names transformers loads weights from: an earlier export's files among them would be loaded instead of ours
# (model.safetensors is read before an index) or next to them; other files in the folder are the user's
_HF_WEIGHT_FILE = re.compile(
    r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json"
)


def _check_not_another_model(output_dir: Path) -> None:
    """Refuse an --output_dir holding transformers weights that are not an earlier export of ours (its config.json
    names the lit model it came from): an export replaces those, which must not destroy a download."""
    if not output_dir.is_dir():
        return
    weights = sorted(p.name for p in output_dir.iterdir() if p.is_file() and _HF_WEIGHT_FILE.fullmatch(p.name))
    if weights and LIT_NAME_KEY not in _read_json(output_dir / HF_CONFIG_FILENAME):
        raise ConversionError(
            f"--output_dir {str(output_dir)!r} holds a transformers model that is not an export of lit_gpt "
            f"({', '.join(weights[:3])}{', …' if len(weights) > 3 else ''}), whose weight files an export would "
            "replace: pick a new folder."
        )


def _remove_earlier_export(output_dir: Path, tokenizer_source: Optional[Path]) -> list[str]:
    """Delete the HF weight files and indexes in `output_dir` (the indexes first), and the tokenizer files that
    `tokenizer_source` (the checkpoint being exported; None: keep them) lacks; returns their names."""
    weights = sorted((p.name for p in output_dir.iterdir() if p.is_file() and _HF_WEIGHT_FILE.fullmatch(p.name)),
                     key=lambda name: (not name.endswith(".index.json"), name))
    tokenizer = [] if tokenizer_source is None else [
        name for name in TOKENIZER_FILES if (output_dir / name).is_file() and not (tokenizer_source / name).is_file()]
    for name in weights + tokenizer:
        (output_dir / name).unlink()
    return weights + tokenizer


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _copy(src: Path, output_dir: Path) -> None:
    from lit_gpt.utils import atomic_path

    with atomic_path(output_dir / src.name) as tmp:
        shutil.copyfile(src, tmp)
