"""Import a GGUF model (llama.cpp's file format) as a lit checkpoint.

The `gguf` package reads the file and dequantizes its tensors; this module maps them onto `lit_gpt.GPT`'s names,
undoes the row permutation llama.cpp applies to Llama's query/key weights, derives the `Config` from the file's
metadata and rebuilds a Hugging Face `tokenizer.json` from the `tokenizer.ggml.*` vocabulary.

Why the permutation: Hugging Face Llama checkpoints rotate the two halves of each head ("rotate half"), llama.cpp
rotates adjacent pairs. Its converter therefore reorders the rows of every head of `attn_q`/`attn_k` so that the
rows forming a rotation pair sit next to each other: HF row `s * hd/2 + j` (half `s`, frequency `j`) becomes GGUF
row `2 * j + s`. Qwen2 and Qwen3 use llama.cpp's "neox" rope, which is rotate-half already, so their weights are
stored as is, as are Phi-3's (its q/k/v in one `attn_qkv`, its gate and up projections in one `ffn_up`, gate first,
as transformers' `qkv_proj` and `gate_up_proj`). Qwen3's per-head query/key norms are `blk.N.attn_q_norm` /
`attn_k_norm` (lit `attn.norm_q`/`norm_k`), of `qwen3.attention.key_length` (its head_dim) features.

Mixtures of experts (lit's "LLaMAMoE"): Mixtral is a `llama` file with `llama.expert_count` and
`llama.expert_used_count`, Qwen3-MoE a `qwen3moe` one (Qwen3's attention with per-head q/k norms), Qwen2-MoE a
`qwen2moe` one (Qwen2's attention, q/k/v biases, plus a shared expert). The router is `blk.N.ffn_gate_inp` (lit
`mlp.gate`); llama.cpp's converter stacks each block's experts into one 3-D tensor per projection,
`ffn_gate_exps`/`ffn_up_exps`/`ffn_down_exps` (`torch.stack(..., dim=0)` of the HF experts, so the gguf reader's
numpy shape, the reverse of GGUF's `ne`, is `(n_expert, out, in)`), while older files hold one 2-D tensor per
expert, `blk.N.ffn_gate.E` (llama.cpp's LLM_TENSOR_FFN_GATE_EXP, "blk.%d.ffn_gate.%d"). Both become lit's
`mlp.experts.E.fc_1` (gate), `fc_2` (up) and `proj` (down). Qwen2-MoE's shared expert is
`ffn_gate_shexp`/`ffn_up_shexp`/`ffn_down_shexp` (lit `mlp.shared_expert.fc_1`/`fc_2`/`proj`) and its gate
`ffn_gate_inp_shexp` (lit `mlp.shared_expert_gate`, one output), a vector of `n_embd` in llama.cpp's loader, stored
`(1, n_embd)` by the current converter and `(n_embd,)` by older, squeezing ones. llama.cpp renormalises the chosen
experts' weights for llama and qwen3moe files but not for qwen2moe ones (`_expert_fields`).

Gemma (1, 2, 3) also uses neox rope, so its q/k rows are as transformers stores them. Its RMSNorms scale by
`1 + weight`; llama.cpp's converter stores every `*norm.weight` plus 1 (its graph multiplies by the weight), so the
import subtracts 1 again (lit keeps transformers' convention, `Config.norm_unit_offset`). What the file does not say
(the sliding-window layer pattern, Gemma 3's local RoPE base, the attention scale) is decided as llama.cpp decides
it when it loads the file (`_gemma_fields`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from lit_gpt.config import CONFIG_FILENAME, Config, longrope_attention_factor
from lit_gpt.utils import WEIGHTS_FILENAME, atomic_paths, check_output_dir

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "phi3", "gemma", "gemma2", "gemma3",
                           "smollm3", "olmo2", "granite")
# architectures whose attn_q/attn_k rows llama.cpp permutes for its interleaved ("normal") rope (its converter's
# SmolLM3Model and GraniteModel are LlamaModels, which permute them)
_PERMUTED_QK = ("llama", "smollm3", "granite")
# llama.cpp's SmolLM3 skips RoPE in every fourth block, (il + 1) % 4 == 0 (n_no_rope_layer_step, set to 4 in
# src/models/smollm3.cpp: no GGUF key holds it), as transformers' default no_rope_layer_interval does
_SMOLLM3_NO_ROPE_STEP = 4
_GEMMA = ("gemma", "gemma2", "gemma3")

# llama.cpp token types (llama_token_type in llama.h / gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GLOBAL_TENSORS = {
    "token_embd.weight": "transformer.wte.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "norm_1.weight",
    "ffn_norm.weight": "norm_2.weight",
    "attn_output.weight": "attn.proj.weight",
    "attn_output.bias": "attn.proj.bias",
    "attn_q_norm.weight": "attn.norm_q.weight",  # Qwen3
    "attn_k_norm.weight": "attn.norm_k.weight",
    "post_attention_norm.weight": "post_attention_norm.weight",  # Gemma 2/3 (`ffn_norm` is then the pre-MLP norm)
    "post_ffw_norm.weight": "post_mlp_norm.weight",
    "ffn_gate.weight": "mlp.fc_1.weight",
    "ffn_up.weight": "mlp.fc_2.weight",
    "ffn_down.weight": "mlp.proj.weight",
}
_QKV = ("attn_q", "attn_k", "attn_v")
# block tensors that exist only with a Config flag: GGUF name -> that flag
_OPTIONAL_TENSORS = {
    "attn_q_norm.weight": "norm_qk", "attn_k_norm.weight": "norm_qk",
    "post_attention_norm.weight": "post_attention_norm", "post_ffw_norm.weight": "post_mlp_norm",
}
# a mixture of experts' tensors: the router, the stacked experts (GGUF projection -> lit expert layer) and the
# older one-tensor-per-expert names
_DENSE_MLP = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
_EXPERT_PARTS = {"gate": "fc_1", "up": "fc_2", "down": "proj"}
_STACKED_EXPERTS = re.compile(r"^ffn_(gate|up|down)_exps\.weight$")
_ONE_EXPERT = re.compile(r"^ffn_(gate|up|down)\.(\d+)\.weight$")
# architectures whose blocks are mixtures of experts (a llama file only with experts: Mixtral)
_MOE = ("llama", "qwen2moe", "qwen3moe")
# Qwen2-MoE's shared expert (llama.cpp's LLM_TENSOR_FFN_*_SHEXP, "blk.%d.ffn_gate_shexp" ...) and its gate
_SHARED_EXPERT = {
    "ffn_gate_shexp.weight": "mlp.shared_expert.fc_1.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.fc_2.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}


class GGUFImportError(ValueError):
    """A GGUF file this importer cannot turn into a lit checkpoint; the message says which file and why."""


# ---------------------------------------------------------------------------------------------------- reading
def open_gguf(path: Path | str):
    """A `gguf.GGUFReader` over `path` (memory-mapped; tensors are read when touched)."""
    import gguf

    path = Path(path)
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.gguf"))[:3]
        inside = f" such as {', '.join(repr(str(path / f)) for f in files)}" if files else ""
        raise GGUFImportError(f"GGUF path {str(path)!r} is a directory, but a .gguf file is expected{inside}.")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError) as e:
        raise GGUFImportError(f"{str(path)!r} is not a readable GGUF file ({e}).") from None


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value of the file as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _require(metadata: dict, key: str, path: Path) -> Any:
    if key not in metadata:
        raise GGUFImportError(f"{str(path)!r} lacks the metadata key {key!r}, which the import needs.")
    return metadata[key]


def _architecture(metadata: dict, path: Path) -> str:
    arch = _require(metadata, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{str(path)!r} holds a {arch!r} model; only {', '.join(SUPPORTED_ARCHITECTURES)} GGUF files can be "
            "imported."
        )
    return arch


# ---------------------------------------------------------------------------------------------------- config
def config_from_gguf(metadata: dict, tensor_shapes: dict[str, tuple[int, ...]], path: Path | str,
                     rope_freqs: Optional[np.ndarray] = None,
                     rope_factors: Optional[dict[str, np.ndarray]] = None) -> Config:
    """The lit `Config` a GGUF file describes. `tensor_shapes` are numpy-order shapes (`(out, in)`); `rope_freqs`
    and `rope_factors` ({name: values} of `_ROPE_FACTORS`) the RoPE tensors the file holds, if any."""
    path = Path(path)
    arch = _architecture(metadata, path)

    def key(name: str) -> str:
        return f"{arch}.{name}"

    n_embd = int(_require(metadata, key("embedding_length"), path))
    n_head = int(_require(metadata, key("attention.head_count"), path))
    n_kv = metadata.get(key("attention.head_count_kv"), n_head)
    if isinstance(n_kv, list):
        raise GGUFImportError(f"{str(path)!r} has a different number of KV heads per layer, which GPT cannot express.")
    head_size = int(metadata.get(key("attention.key_length"), n_embd // n_head))
    if int(metadata.get(key("attention.value_length"), head_size)) != head_size:
        raise GGUFImportError(
            f"{str(path)!r} has value heads of another size than key heads, which GPT cannot express."
        )
    rope_dims = int(metadata.get(key("rope.dimension_count"), head_size))
    if arch in _PERMUTED_QK and rope_dims != head_size:
        # llama.cpp rotates the first `rope_dims` features in its interleaved layout; in the rotate-half layout the
        # un-permuted rows would need a different subset, which Config cannot describe
        raise GGUFImportError(
            f"{str(path)!r} rotates {rope_dims} of {head_size} features per head; partial RoPE is only supported "
            "for qwen2-style files."
        )
    if "token_embd.weight" not in tensor_shapes:
        raise GGUFImportError(f"{str(path)!r} has no token_embd.weight tensor.")
    padded_vocab = tensor_shapes["token_embd.weight"][0]
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens else int(metadata.get(key("vocab_size"), padded_vocab))
    attn_bias = "blk.0.attn_q.bias" in tensor_shapes
    general_name = metadata.get("general.name") or path.stem
    block_size = int(metadata.get(key("context_length"), 4096))
    n_layer = int(_require(metadata, key("block_count"), path))
    intermediate_size = int(_require(metadata, key("feed_forward_length"), path))
    family: dict[str, Any] = dict(norm_qk=arch in ("qwen3", "qwen3moe"), mlp_class_name="LLaMAMLP")
    family.update(_expert_fields(metadata, arch, tensor_shapes, intermediate_size, path))
    if arch == "phi3":  # a sliding window in every block, as transformers' Phi-3 (convert_hf.py)
        window = int(metadata.get(key("attention.sliding_window")) or 0)
        if 0 < window < block_size:
            family["sliding_window_size"] = window
    if arch in _GEMMA:
        family = _gemma_fields(metadata, arch, n_layer, n_embd, n_head, head_size, path)
    if arch == "smollm3":
        family["rope_indices"] = [int((i + 1) % _SMOLLM3_NO_ROPE_STEP != 0) for i in range(n_layer)]
    if arch == "olmo2":
        family.update(_olmo2_fields(metadata, n_layer, block_size))
    if arch == "granite":
        family.update(_granite_fields(metadata, path))
    return Config(
        name=str(general_name),
        block_size=block_size,
        vocab_size=min(vocab_size, padded_vocab),
        padded_vocab_size=padded_vocab,
        n_layer=n_layer,
        n_head=n_head,
        n_query_groups=int(n_kv),
        head_size=head_size,
        n_embd=n_embd,
        intermediate_size=intermediate_size,
        rotary_percentage=rope_dims / head_size,
        rope_base=float(metadata.get(key("rope.freq_base"), 10000.0)),
        rope_adjustments=(_longrope(metadata, arch, path, rope_factors, block_size) if rope_factors
                          else _rope_adjustments(metadata, arch, path, rope_freqs, rope_dims)),
        bias=False,
        attn_bias=attn_bias,
        tie_embeddings="output.weight" not in tensor_shapes,
        norm_class_name="RMSNorm",
        norm_eps=_decimal(metadata.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        parallel_residual=False,
        # (a qwen3/gemma3 file without attn_q_norm/attn_k_norm, or a gemma2/3 one without its post-norms, lacks
        # tensors: `_check_complete`)
        **family,
    )


def _granite_fields(metadata: dict, path: Path) -> dict[str, Any]:
    """Granite's scalings as llama.cpp's granite graph applies them: token embeddings times `embedding_scale`,
    each block's attention and MLP outputs times `residual_scale`, attention scores times `attention.scale` (0 or
    absent: 1/sqrt(head_size)), logits divided by `logit_scale`; absent (or neutral) ones are left out."""
    fields: dict[str, Any] = {}
    for key, field, neutral in (("embedding_scale", "embedding_multiplier", 1.0),
                                ("residual_scale", "residual_multiplier", 1.0),
                                ("attention.scale", "attention_scale", 0.0), ("logit_scale", "logits_scaling", 1.0)):
        value = metadata.get(f"granite.{key}")
        if value is None or float(value) == neutral:
            continue
        if not float(value) > 0:
            raise GGUFImportError(f"{str(path)!r} sets granite.{key} to {value}; it must be a positive number.")
        fields[field] = float(value)
    return fields


def _olmo2_fields(metadata: dict, n_layer: int, block_size: int) -> dict[str, Any]:
    """OLMo 2's blocks as llama.cpp's olmo2 graph runs them: norms after the attention and the MLP only
    (`post_attention_norm`, `post_ffw_norm`), query and key norms over all the heads (`attn_q_norm` of n_embd
    weights), rotate-half RoPE (LLAMA_ROPE_TYPE_NEOX: its converter leaves q/k unpermuted). An OLMo 3 file is an
    olmo2 one with `olmo2.attention.sliding_window`: llama.cpp then windows three blocks of four, every fourth global
    (`set_swa_pattern(4)`), as transformers' Olmo3Config does by default."""
    fields: dict[str, Any] = dict(norm_qk=True, norm_qk_type="all", pre_norms=False, post_attention_norm=True,
                                  post_mlp_norm=True)
    window = int(metadata.get("olmo2.attention.sliding_window") or 0)
    if 0 < window < block_size:
        fields.update(sliding_window_size=window, sliding_window_indices=[int(i % 4 < 3) for i in range(n_layer)])
    return fields


def _expert_fields(metadata: dict, arch: str, tensor_shapes: dict[str, tuple[int, ...]], intermediate_size: int,
                   path: Path) -> dict[str, Any]:
    """The Config fields of a mixture of experts (none for a dense model), as llama.cpp loads a llama (Mixtral),
    qwen2moe or qwen3moe file.

    llama.cpp routes all three with a softmax over every expert and keeps the `expert_used_count` most probable.
    Whether it renormalises their weights to sum to 1 is the `norm_w` argument of `build_moe_ffn` (src/llama-graph.cpp
    divides by the weights' sum when it is true), a literal in each graph, whatever a `{arch}.expert_weights_norm` key
    says: `true` for llama and qwen3moe (src/models/llama.cpp and src/models/qwen3moe.cpp: `LLM_FFN_SILU, true,
    hparams.expert_weights_scale, LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX`), so `moe_norm_topk` is True, as in Mixtral
    and Qwen3-30B-A3B (norm_topk_prob true); `false` for qwen2moe (src/models/qwen2moe.cpp: `LLM_FFN_SILU, false`),
    so it is False, as in transformers' Qwen2MoeConfig default (norm_topk_prob false). A Qwen3-MoE with
    norm_topk_prob false, or a Qwen2-MoE with true, would run differently in transformers than in llama.cpp (the
    converter does not write the flag for either); the import reproduces llama.cpp. (`build_moe_ffn` scales the
    weights by `expert_weights_scale` unless it is 0, its default, or 1: another value is refused.)

    Qwen2-MoE's shared expert (llama_model_qwen2moe in src/models/qwen2moe.cpp) runs on every token, on the same
    normed input, and its output is multiplied by sigmoid(`ffn_gate_inp_shexp` . x) (computed as silu(g) / g) before
    it is added to the routed experts' sum: lit's `shared_expert` and `shared_expert_gate`. Widths when the keys are
    absent or 0, as llama.cpp's loader falls back: the experts `feed_forward_length / expert_used_count` (qwen2moe,
    qwen3moe), the shared expert `feed_forward_length` (`n_ff_shexp ? n_ff_shexp : n_ff`).
    """
    def key(name: str) -> str:
        return f"{arch}.{name}"

    routed = any(n.endswith(".ffn_gate_inp.weight") for n in tensor_shapes)
    if arch not in _MOE or (arch == "llama" and not metadata.get(key("expert_count")) and not routed):
        return {}  # dense (llama.cpp reads a llama file with no or 0 experts as dense)
    n_expert = int(_require(metadata, key("expert_count"), path))
    n_used = int(_require(metadata, key("expert_used_count"), path))
    if not 1 <= n_used <= n_expert:
        raise GGUFImportError(f"{str(path)!r} has {key('expert_used_count')}={n_used}, which is not from 1 to its "
                              f"{key('expert_count')} {n_expert}.")
    # what lit_gpt's LLaMAMoE has no counterpart for: a shared expert outside qwen2moe (Granite-MoE-shared's, ...;
    # llama.cpp's llama and qwen3moe graphs have none), more than one shared expert, a scale on the routing weights,
    # another gating function than softmax (gguf.ExpertGatingFuncType: 1; 0 is unset)
    shared_fields: tuple = (("expert_shared_count", (0, 1)),) if arch == "qwen2moe" else (
        ("expert_shared_feed_forward_length", (0,)), ("expert_shared_count", (0,)))
    for name, accepted in shared_fields + (("expert_weights_scale", (0.0, 1.0)), ("expert_gating_func", (0, 1))):
        value = metadata.get(key(name))
        if value is not None and value not in accepted:
            raise GGUFImportError(f"{str(path)!r} sets {key(name)}={value}, which lit_gpt's mixture of experts "
                                  "cannot express.")
    shared = next((n for n in tensor_shapes if "_shexp." in n), None)
    if shared is not None and arch != "qwen2moe":
        raise GGUFImportError(f"{str(path)!r} has the shared-expert tensor {shared!r}, which lit_gpt's mixture of "
                              f"experts cannot express in a {arch} model.")
    fields: dict[str, Any] = dict(mlp_class_name="LLaMAMoE", n_expert=n_expert, n_expert_per_token=n_used,
                                  moe_norm_topk=arch != "qwen2moe")
    if arch in ("qwen2moe", "qwen3moe"):
        # llama.cpp's fallback without the key: n_ff / n_expert_used (load_arch_tensors of llama_model_qwen2moe and
        # llama_model_qwen3moe)
        fields["moe_intermediate_size"] = int(metadata.get(key("expert_feed_forward_length"))
                                              or intermediate_size // n_used)
    if arch == "qwen2moe":
        fields["shared_expert_intermediate_size"] = int(metadata.get(key("expert_shared_feed_forward_length"))
                                                        or intermediate_size)
    # (Mixtral's experts are feed_forward_length wide: llama.cpp's llama creates ffn_*_exps of n_ff)
    return fields


# LongRoPE's factors (Phi-3.5, Phi-4-mini, the 128K Phi-3s), folded into Config.rope_adjustments
_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def _longrope(metadata: dict, arch: str, path: Path, factors: dict[str, np.ndarray], context: int) -> dict:
    """`Config.rope_adjustments` of a file with LongRoPE factors. (llama.cpp uses the long ones for a whole session
    whose context exceeds the original; lit_gpt decides per forward call, as transformers does, which is what the
    model computes with its Hugging Face weights.)"""
    missing = [n for n in _ROPE_FACTORS if n not in factors]
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if missing or not original:
        what = ", ".join(missing) if missing else f"{arch}.rope.scaling.original_context_length"
        raise GGUFImportError(f"{str(path)!r} has LongRoPE factors but lacks {what}; convert the model to GGUF again.")
    attention = metadata.get(f"{arch}.rope.scaling.attn_factor")
    if attention is None:  # (as transformers derives it from the context's growth)
        attention = longrope_attention_factor(context / int(original), int(original))
    return dict(short_factor=[float(f) for f in factors["rope_factors_short.weight"]],
                long_factor=[float(f) for f in factors["rope_factors_long.weight"]],
                original_max_seq_len=int(original), attention_factor=_decimal(attention))


def _decimal(value: float) -> float:
    # GGUF stores such floats as float32: 1e-6 reads back as 9.99999997e-07; the shortest decimal of that float32
    # is the value the model's config.json had (and the one the HF conversion gives)
    return float(str(np.float32(value)))


# Gemma 2 and 3 sizes whose attention scale llama.cpp takes from n_embd / n_head (the 27B models): it sets its model
# type from the block count alone (`llama_model::load_hparams`, case LLM_ARCH_GEMMA2: 46 -> LLM_TYPE_27B,
# LLM_ARCH_GEMMA3: 62 -> LLM_TYPE_27B), after gemma_pytorch's config.py (query_pre_attn_scalar = 144 and 168)
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}


def gemma_attention_scores_scalar(arch: str, n_layer: int, n_embd: int, n_head: int, head_size: int) -> Optional[int]:
    """transformers' `query_pre_attn_scalar` of the scale llama.cpp gives a Gemma file's attention scores.

    llama.cpp does not read it from the file: `f_attention_scale` is 1/sqrt(n_embd / n_head) (an integer division)
    for what it takes to be a 27B model and 1/sqrt(head_dim) otherwise; Gemma 1 scales by 1/sqrt(head_dim) (None).
    """
    if arch == "gemma":
        return None
    return n_embd // n_head if n_layer == _GEMMA_27B_BLOCKS.get(arch) else head_size


def _gemma_fields(metadata: dict, arch: str, n_layer: int, n_embd: int, n_head: int, head_size: int,
                  path: Path) -> dict[str, Any]:
    """The Config fields of a gemma/gemma2/gemma3 file beyond the llama-like ones, as llama.cpp loads them."""
    def key(name: str) -> str:
        return f"{arch}.{name}"

    # llama.cpp requires the epsilon for Gemma (the generic default of 1e-5 would be wrong: Gemma's is 1e-6)
    _require(metadata, key("attention.layer_norm_rms_epsilon"), path)
    fields: dict[str, Any] = dict(
        norm_unit_offset=True, mlp_class_name="GemmaMLP", gelu_approximate="tanh", scale_embeddings=True,
        norm_qk=arch == "gemma3",
        attention_scores_scalar=gemma_attention_scores_scalar(arch, n_layer, n_embd, n_head, head_size),
    )
    if arch == "gemma":
        return fields
    fields.update(post_attention_norm=True, post_mlp_norm=True)
    if arch == "gemma2":
        # llama.cpp's defaults when the keys are absent (llama-hparams.h; its converter always writes them)
        fields.update(attention_logit_softcapping=float(metadata.get(key("attn_logit_softcapping"), 50.0)),
                      final_logit_softcapping=float(metadata.get(key("final_logit_softcapping"), 30.0)))
        window = int(metadata.get(key("attention.sliding_window"), 4096))
    else:
        # Gemma 3 has no attention soft-capping (llama.cpp ignores the key); a final one only when the file says so
        final = float(metadata.get(key("final_logit_softcapping"), 0.0))
        if final:
            fields["final_logit_softcapping"] = final
        # no window (or 0): llama.cpp runs every block with full attention
        window = int(metadata.get(key("attention.sliding_window"), 0))
    if window > 0:
        sliding = _sliding_window_blocks(metadata, arch, n_layer, path)
        if any(sliding):
            fields.update(sliding_window_size=window, sliding_window_indices=sliding)
            if arch == "gemma3":  # hard-coded by llama.cpp unless a newer file states it
                fields["rope_local_base_freq"] = float(metadata.get(key("rope.freq_base_swa"), 10000.0))
    return fields


def _sliding_window_blocks(metadata: dict, arch: str, n_layer: int, path: Path) -> list[int]:
    """1 for each block with sliding-window attention, 0 for full attention.

    llama.cpp hard-codes a period (gemma2: 2, gemma3: 6; a newer file may state one, or a bool per block, as
    `{arch}.attention.sliding_window_pattern`) and marks block i as sliding unless it is the last of its period,
    `i % period < period - 1` (llama_hparams::set_swa_pattern), so blocks 0, 2, 4.. (Gemma 2) or five in six
    (Gemma 3) slide, as in transformers' layer_types.
    """
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise GGUFImportError(
                f"{str(path)!r}: {arch}.attention.sliding_window_pattern lists {len(pattern)} blocks but the model has "
                f"{n_layer}; convert the model to GGUF again."
            )
        return [int(bool(p)) for p in pattern]
    period = int(pattern)
    return [int(period == 0 or i % period < period - 1) for i in range(n_layer)]


def _rope_adjustments(metadata: dict, arch: str, path: Path, rope_freqs: Optional[np.ndarray],
                      rope_dims: int) -> Optional[dict]:
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    if arch == "gemma3" and scaling == "linear" and factor != 1.0:
        # Gemma 3 4B+ (factor 8): llama.cpp divides the positions of the full-attention blocks by the factor and
        # leaves the sliding-window blocks unscaled (rope_freq_scale_train_swa = 1), as Config.rope_adjustments does
        return {"factor": factor}
    if scaling == "yarn" and factor != 1.0:
        return _yarn(metadata, arch, path, factor)
    if scaling not in ("none", "") and factor != 1.0:
        raise GGUFImportError(
            f"{str(path)!r} uses {scaling!r} RoPE scaling (factor {factor}); only Llama-3.1-style frequency "
            "scaling (a rope_freqs tensor), YaRN and Gemma 3's linear scaling can be imported."
        )
    if rope_freqs is None:
        return None
    return _llama3_rope_from_factors(
        np.asarray(rope_freqs, dtype=np.float64), float(metadata.get(f"{arch}.rope.freq_base", 10000.0)), rope_dims,
        int(metadata.get(f"{arch}.rope.scaling.original_context_length", 8192)), path,
    )


def _yarn(metadata: dict, arch: str, path: Path, factor: float) -> dict:
    """`Config.rope_adjustments` of a file with YaRN scaling, as ggml's rope runs it (`rope_yarn` in ggml-cpu's
    ops.cpp): each frequency blended between its own value and itself divided by the factor, along a ramp between
    the dimensions at which a frequency turns `yarn_beta_fast` (default 32) and `yarn_beta_slow` (default 1) times
    over the original context, rounded outwards (`ggml_rope_yarn_corr_dims`); cos and sin scaled by
    1 + 0.1 ln(factor). That is transformers' yarn with its defaults. The knobs llama.cpp has beyond it (DeepSeek's
    `yarn_log_multiplier`, an attention or extrapolation factor of its own) are refused rather than guessed."""
    def key(name: str) -> str:
        return f"{arch}.rope.scaling.{name}"

    original = metadata.get(key("original_context_length"))
    if not original:
        raise GGUFImportError(f"{str(path)!r} uses YaRN RoPE scaling but lacks {key('original_context_length')!r}, "
                              "the context the model was pretrained with.")
    for knob, neutral in (("yarn_log_multiplier", 0.0), ("yarn_attn_factor", 1.0), ("attn_factor", 1.0),
                          ("yarn_ext_factor", 1.0)):
        if key(knob) in metadata and float(metadata[key(knob)]) != neutral:
            raise GGUFImportError(f"{str(path)!r} sets {key(knob)!r} to {metadata[key(knob)]}, a YaRN setting the "
                                  "import does not reproduce; only plain YaRN (factor, original context, betas) can "
                                  "be imported.")
    return dict(factor=factor, original_max_seq_len=int(original),
                beta_fast=float(metadata.get(key("yarn_beta_fast"), 32.0)),
                beta_slow=float(metadata.get(key("yarn_beta_slow"), 1.0)),
                attention_factor=1.0 + 0.1 * math.log(factor))


def _llama3_rope_from_factors(factors: np.ndarray, base: float, rope_dims: int, original_len: int,
                              path: Path) -> Optional[dict]:
    """Llama-3.1 scaling parameters that reproduce llama.cpp's per-frequency `rope_freqs` divisors.

    llama.cpp stores the divisors `f_i` instead of the parameters. With `blend_i` the share of the unscaled
    frequency, `1/f_i = (1 - blend_i)/factor + blend_i` and `blend_i = (L/wavelen_i - lo)/(hi - lo)` clamped to
    [0, 1]. Only `L/(hi - lo)` and `lo/(hi - lo)` are identifiable, so `L` is fixed (to the file's original
    context length when it states one) and `lo`, `hi` are solved from the frequencies inside the blend band.
    """
    if factors.shape != (rope_dims // 2,):
        raise GGUFImportError(f"{str(path)!r}: rope_freqs has {factors.size} entries, expected {rope_dims // 2}.")
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    inv_freq = base ** (-np.arange(0, rope_dims, 2, dtype=np.float64) / rope_dims)
    wavelen = 2 * math.pi / inv_freq
    blend = (1 / factors - 1 / factor) / (1 - 1 / factor)
    inside = (blend > 1e-6) & (blend < 1 - 1e-6)
    result = None
    if inside.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[inside], blend[inside], 1)
        span = original_len / slope  # hi - lo
        lo = -intercept * span
        result = dict(factor=factor, low_freq_factor=float(lo), high_freq_factor=float(lo + span),
                      original_max_seq_len=original_len)
        predicted = np.clip((original_len / wavelen - lo) / span, 0.0, 1.0)
        if not np.allclose(1 / ((1 - predicted) / factor + predicted), factors, rtol=1e-4):
            result = None
    if result is None:
        raise GGUFImportError(
            f"{str(path)!r}: the rope_freqs tensor does not follow Llama-3.1 frequency scaling with at least two "
            "frequencies in its blend band, so it cannot be expressed as Config.rope_adjustments."
        )
    return result


# ---------------------------------------------------------------------------------------------------- weights
def dequantize(tensor, path: Path | str) -> torch.Tensor:
    """One GGUF tensor as float32 in PyTorch's layout (`(out, in)` for a linear weight)."""
    import gguf

    qtype = tensor.tensor_type
    integer_types = {gguf.GGMLQuantizationType[n] for n in ("I8", "I16", "I32", "I64")}
    if qtype in integer_types:
        raise GGUFImportError(
            f"{str(path)!r}: tensor {tensor.name!r} has integer type {qtype.name}, which is not a weight type."
        )
    try:
        array = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise GGUFImportError(
            f"{str(path)!r}: tensor {tensor.name!r} has type {qtype.name}, which the gguf package cannot dequantize."
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    if not array.flags.writeable:  # an F32 tensor is a view of the read-only memory map
        array = array.copy()
    return torch.from_numpy(array)


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleaving of a query or key projection (weight or bias)."""
    rows = weight.shape[0]
    head_size = rows // n_heads
    return (
        weight.reshape(n_heads, head_size // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _shifted(value: torch.Tensor, name: str, arch: str) -> torch.Tensor:
    # undo the +1 llama.cpp's Gemma converters add to every `*norm.weight` (GemmaModel/Gemma2Model/Gemma3Model
    # modify_tensors). They add in float32 (a bfloat16 checkpoint is upcast first), so the file holds w + 1 rounded
    # by at most 2**-24 for -1 < w < 1 (not at all for a bfloat16 w with |w| >= 2**-16): the weight comes back as
    # transformers' up to that rounding, and where w + 1 lies in [0.5, 2] the subtraction is exact, so `1 + weight`,
    # what the model computes, is exactly the scale llama.cpp multiplies by
    return value - 1 if arch in _GEMMA and name.endswith("norm.weight") else value


def iter_lit_weights(tensors: list, config: Config, arch: str, path: Path | str,
                     dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """`(lit name, tensor)` pairs from a reader's `tensors`, dequantized one tensor at a time so memory holds the
    output plus one layer."""
    path = Path(path)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for tensor in tensors:
        name = tensor.name
        if name == "rope_freqs.weight" or name in _ROPE_FACTORS:  # folded into config.rope_adjustments
            continue
        if name in _GLOBAL_TENSORS:
            if name == "output.weight" and config.tie_embeddings:
                continue
            yield _GLOBAL_TENSORS[name], _shifted(dequantize(tensor, path), name, arch).to(dtype)
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
            raise GGUFImportError(f"{str(path)!r}: tensor {name!r} has no counterpart in a {arch} GPT.")
        layer, local = int(parts[1]), parts[2]
        if layer >= config.n_layer:
            raise GGUFImportError(f"{str(path)!r}: tensor {name!r} is beyond the file's block_count {config.n_layer}.")
        prefix = f"transformer.h.{layer}."
        if arch == "phi3" and local == "attn_qkv.weight":
            yield prefix + "attn.qkv.weight", dequantize(tensor, path).to(dtype)
            continue
        if arch == "phi3" and local == "ffn_up.weight":
            gate, up = dequantize(tensor, path).to(dtype).chunk(2)
            yield prefix + "mlp.fc_1.weight", gate.clone()
            yield prefix + "mlp.fc_2.weight", up.clone()
            continue
        if config.n_expert and (local == "ffn_gate_inp.weight" or _STACKED_EXPERTS.match(local)
                                or _ONE_EXPERT.match(local)):
            yield from _expert_weights(tensor, local, prefix, config, path, dtype)
            continue
        if config.shared_expert_intermediate_size and local in _SHARED_EXPERT:
            value = dequantize(tensor, path)
            if local == "ffn_gate_inp_shexp.weight" and value.ndim == 1:  # (n_embd,): llama.cpp's shape, squeezed
                value = value[None]
            yield prefix + _SHARED_EXPERT[local], value.to(dtype)
            continue
        if config.n_expert and local in _DENSE_MLP:
            raise GGUFImportError(f"{str(path)!r}: tensor {name!r} is a dense feed-forward layer, but the file's "
                                  f"{arch}.expert_count gives every block a mixture of experts.")
        if local in _BLOCK_TENSORS and (local not in _OPTIONAL_TENSORS or getattr(config, _OPTIONAL_TENSORS[local])):
            yield prefix + _BLOCK_TENSORS[local], _shifted(dequantize(tensor, path), name, arch).to(dtype)
            continue
        stem, _, kind = local.rpartition(".")
        if stem not in _QKV or kind not in ("weight", "bias"):
            raise GGUFImportError(f"{str(path)!r}: tensor {name!r} has no counterpart in a {arch} GPT.")
        value = dequantize(tensor, path)
        if arch in _PERMUTED_QK and stem != "attn_v":
            value = unpermute_qk(value, config.n_head if stem == "attn_q" else config.n_query_groups)
        group = pending.setdefault(layer * 2 + (kind == "bias"), {})
        group[stem] = value
        if len(group) == 3:
            del pending[layer * 2 + (kind == "bias")]
            fused = torch.cat([group[s] for s in _QKV], dim=0).to(dtype)
            yield f"{prefix}attn.qkv.{kind}", fused
    if pending:
        incomplete = sorted({key // 2 for key in pending})
        raise GGUFImportError(f"{str(path)!r}: layers {incomplete} lack one of attn_q, attn_k, attn_v.")


def _expert_weights(tensor, local: str, prefix: str, config: Config, path: Path,
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The lit tensors of a block's router, stacked experts (one per expert) or single expert."""
    value = dequantize(tensor, path)
    if local == "ffn_gate_inp.weight":
        yield prefix + "mlp.gate.weight", value.to(dtype)
        return
    one = _ONE_EXPERT.match(local)
    if one is not None:
        expert = int(one[2])
        if expert >= config.n_expert:
            raise GGUFImportError(f"{str(path)!r}: tensor {tensor.name!r} is of expert {expert}, but the file has "
                                  f"{config.n_expert} experts.")
        yield f"{prefix}mlp.experts.{expert}.{_EXPERT_PARTS[one[1]]}.weight", value.to(dtype)
        return
    part = _EXPERT_PARTS[_STACKED_EXPERTS.match(local)[1]]
    if value.ndim != 3 or value.shape[0] != config.n_expert:
        raise GGUFImportError(f"{str(path)!r}: tensor {tensor.name!r} has shape {tuple(value.shape)}, not "
                              f"{config.n_expert} stacked experts.")
    for expert in range(config.n_expert):  # (a copy each: no expert keeps the whole stack alive)
        yield f"{prefix}mlp.experts.{expert}.{part}.weight", value[expert].to(dtype).clone()


# ---------------------------------------------------------------------------------------------------- tokenizer
_GPT2_GROUP = ("gpt-2", "gpt2", "default", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de",
               "jina-v2-code", "roberta-bpe", "gigachat", "mpt", "olmo", "jais", "exaone4", "trillion",
               "granite-docling")
_DIGITS_GROUP = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_GROUP = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
                 "smaug-bpe")
_QWEN2_GROUP = ("qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan", "megrez")
# Llama-3's tokenizer.json sets ignore_merges (a word that is a vocabulary entry is one token), as llama.cpp does
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe")


def _byte_level_pre_tokenizer(pre: str, path: Path):
    from tokenizers import Regex, pre_tokenizers

    # the pattern each `tokenizer.ggml.pre` names is the one in llama.cpp's llama-vocab.cpp
    if pre in _GPT2_GROUP:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_GROUP:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    for group, pattern in ((_LLAMA3_GROUP, _LLAMA3_SPLIT), (_QWEN2_GROUP, _QWEN2_SPLIT)):
        if pre in group:
            return pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
    known = sorted(_GPT2_GROUP + _DIGITS_GROUP + _LLAMA3_GROUP + _QWEN2_GROUP)
    raise GGUFImportError(
        f"{str(path)!r}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported (known: {', '.join(known)})."
    )


def _unique_vocab(tokens: list[str], path: Path) -> dict[str, int]:
    # llama.cpp (llama_vocab's load in llama-vocab.cpp) refuses a vocabulary that has a string at two ids ("duplicate
    # token in vocabulary"; older versions abort on an assertion): text could map to either. Empty strings are not
    # compared: llama.cpp renames each to "[EMPTY_<id>]", and no text encodes to one.
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token and token in vocab:
            raise GGUFImportError(
                f"{str(path)!r}: its vocabulary (tokenizer.ggml.tokens) has {token!r} at ids {vocab[token]} and {i}, "
                "which llama.cpp refuses too: convert the model to GGUF again or download another copy."
            )
        vocab.setdefault(token, i)
    return vocab


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    # llama.cpp's SentencePiece tokenizer repeatedly joins the adjacent pair whose joined piece scores highest.
    # A BPE whose merges are ranked by the score of their result does the same.
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for piece, pid in vocab.items():
        if types[pid] != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_from_gguf(metadata: dict, path: Path | str):
    """A `tokenizers.Tokenizer` equivalent to the GGUF vocabulary (byte-level BPE or SentencePiece-style)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    path = Path(path)
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFImportError(f"{str(path)!r} has no tokenizer.ggml.tokens; it does not carry its tokenizer.")
    types = list(metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))

    if model == "gpt2":
        merges = []
        for merge in metadata.get("tokenizer.ggml.merges") or []:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise GGUFImportError(f"{str(path)!r}: merge {merge!r} is not two tokens separated by a space.")
            merges.append((left, right))
        pre = metadata.get("tokenizer.ggml.pre", "default")
        tokenizer = Tokenizer(models.BPE(vocab=_unique_vocab(tokens, path), merges=merges, fuse_unk=False,
                                         byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES))
        tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre, path)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    elif model == "llama":
        scores = list(metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None else None
        tokenizer = Tokenizer(models.BPE(vocab=_unique_vocab(tokens, path), merges=_spm_merges(tokens, scores, types),
                                         unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps = [normalizers.Replace(" ", "\u2581")]
        if metadata.get("tokenizer.ggml.add_space_prefix", True):
            # llama.cpp prefixes every text fragment (the start, and the text after a special token) with a space
            steps.insert(0, normalizers.Prepend("\u2581"))
        tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if metadata.get("tokenizer.ggml.add_space_prefix", True) else [])
        )
    else:
        raise GGUFImportError(
            f"{str(path)!r}: tokenizer model tokenizer.ggml.model={model!r} is not supported (gpt2 or llama)."
        )

    # control tokens (<|im_start|>, <s>) and user-defined ones are matched whole before the model splits the text
    added = []
    for token, kind in zip(tokens, types):
        if kind == _CONTROL or (kind == _UNKNOWN and model == "llama"):
            added.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    if added:
        tokenizer.add_tokens(added)
    # what llama.cpp adds around a text, for the tokenizer.json's own users (transformers reads no add_bos_token
    # for a generic fast tokenizer; lit_gpt's Tokenizer adds BOS itself and encodes without special tokens)
    template = _special_token_template(metadata)
    if template is not None:
        steps = [tokenizer.post_processor] if tokenizer.post_processor is not None else []
        tokenizer.post_processor = processors.Sequence(steps + [template])
    return tokenizer


def _added_special_tokens(metadata: dict) -> tuple[Optional[tuple[str, int]], Optional[tuple[str, int]]]:
    """(BOS, EOS) as (token, id), each when llama.cpp adds it to every text it encodes (else None)."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    model = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre", "default")

    def token(key: str) -> Optional[tuple[str, int]]:
        i = metadata.get(f"tokenizer.ggml.{key}")
        return (tokens[int(i)], int(i)) if i is not None and 0 <= int(i) < len(tokens) else None

    # llama.cpp's defaults when the flag is absent: SentencePiece and Llama-3 vocabularies start with BOS
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", model == "llama" or pre in _LLAMA3_GROUP)
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    return (token("bos_token_id") if add_bos else None), (token("eos_token_id") if add_eos else None)


def _special_token_template(metadata: dict):
    """A `TemplateProcessing` adding BOS/EOS as llama.cpp does (None when it adds neither)."""
    from tokenizers import processors

    bos, eos = _added_special_tokens(metadata)
    if bos is None and eos is None:
        return None
    start, end = ([f"{bos[0]}:0"] if bos else []), ([f"{eos[0]}:0"] if eos else [])
    second = ([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else [])
    return processors.TemplateProcessing(
        single=" ".join(start + ["$A:0"] + end), pair=" ".join(start + ["$A:0"] + end + second),
        special_tokens=list(dict.fromkeys(t for t in (bos, eos) if t is not None)),
    )


def tokenizer_configs_from_gguf(metadata: dict, block_size: int) -> tuple[dict, dict]:
    """`(tokenizer_config.json, generation_config.json)` contents with the file's special tokens and template."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> tuple[Optional[int], Optional[str]]:
        i = metadata.get(f"tokenizer.ggml.{key}")
        if i is None or not 0 <= int(i) < len(tokens):
            return None, None
        return int(i), tokens[int(i)]

    bos_id, bos = token("bos_token_id")
    eos_id, eos = token("eos_token_id")
    eot_id, _ = token("eot_token_id")
    _, unk = token("unknown_token_id")
    pad_id, pad = token("padding_token_id")
    added_bos, added_eos = _added_special_tokens(metadata)
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": added_bos is not None,
        "add_eos_token": added_eos is not None,
        "model_max_length": block_size,
    }
    for name, value in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if value is not None:
            tokenizer_config[name] = value
    if metadata.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]

    generation_config: dict[str, Any] = {}
    if bos_id is not None:
        generation_config["bos_token_id"] = bos_id
    stop = [i for i in (eos_id, eot_id) if i is not None]
    stop = list(dict.fromkeys(stop))
    if stop:
        generation_config["eos_token_id"] = stop[0] if len(stop) == 1 else stop
    if pad_id is not None:
        generation_config["pad_token_id"] = pad_id
    return tokenizer_config, generation_config


# ---------------------------------------------------------------------------------------------------- import
def convert_gguf(gguf_path: Path | str, checkpoint_dir: Path | str, dtype: torch.dtype = torch.float32) -> Config:
    """Write `checkpoint_dir` (lit_model.pth, model_config.yaml, tokenizer files) from the GGUF file."""
    gguf_path, checkpoint_dir = Path(gguf_path), Path(checkpoint_dir)
    check_output_dir(checkpoint_dir, "--checkpoint_dir")  # before the long weight pass, not at its end
    _check_holds_no_other_model(checkpoint_dir)
    reader = open_gguf(gguf_path)
    metadata = read_metadata(reader)
    tensors = list(reader.tensors) + _other_split_tensors(gguf_path, metadata)
    expected = metadata.get("split.tensors.count")
    if expected is not None and len(tensors) != int(expected):
        raise GGUFImportError(f"the parts of the split GGUF model {str(gguf_path)!r} hold {len(tensors)} tensors, "
                              f"but its split.tensors.count says {expected}: download the parts again.")
    arch = _architecture(metadata, gguf_path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in tensors}
    rope_freqs = next((dequantize(t, gguf_path).numpy() for t in tensors if t.name == "rope_freqs.weight"), None)
    rope_factors = {t.name: dequantize(t, gguf_path).numpy() for t in tensors if t.name in _ROPE_FACTORS}
    config = config_from_gguf(metadata, shapes, gguf_path, rope_freqs=rope_freqs, rope_factors=rope_factors)
    # build the tokenizer before the long weight pass so a vocabulary problem fails fast
    tokenizer = tokenizer_from_gguf(metadata, gguf_path)
    tokenizer_config, generation_config = tokenizer_configs_from_gguf(metadata, config.block_size)

    state_dict = dict(iter_lit_weights(tensors, config, arch, gguf_path, dtype))
    _check_complete(state_dict, config, gguf_path)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # one set: a re-import stopped part way must not pair one model's weights with another's tokenizer
    with atomic_paths(*(checkpoint_dir / name for name in _IMPORT_FILES)) as (weights, config_yaml, *tokenizer_files):
        torch.save(state_dict, weights)
        config_yaml.write_text(config.to_yaml(), encoding="utf-8")
        texts = (tokenizer.to_str(), json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                 json.dumps(generation_config, indent=2) + "\n")
        for path, text in zip(tokenizer_files, texts):
            path.write_text(text, encoding="utf-8")
    return config


def _other_split_tensors(path: Path, metadata: dict) -> list:
    """The tensors of parts 2..N when `path` is part 1 of a model split by llama.cpp's `llama-gguf-split` (files
    `<name>-00001-of-0000N.gguf`, ...; `split.no` counts from 0, and only part 1 has the model's metadata)."""
    count, no = int(metadata.get("split.count", 1)), int(metadata.get("split.no", 0))
    if count <= 1:
        return []
    match = re.fullmatch(r"(.*)-(\d{5})-of-(\d{5})\.gguf", path.name)
    if match is None or int(match[3]) != count or int(match[2]) != no + 1:
        raise GGUFImportError(
            f"{str(path)!r} is part {no + 1} of {count} of a split GGUF model, but its name does not end in "
            f"-{no + 1:05d}-of-{count:05d}.gguf, so the other parts cannot be found: give the parts the names "
            "llama-gguf-split gave them, or merge them with `llama-gguf-split --merge`."
        )
    part = lambda i: path.with_name(f"{match[1]}-{i:05d}-of-{count:05d}.gguf")  # noqa: E731
    if no != 0:
        raise GGUFImportError(f"{str(path)!r} is part {no + 1} of {count} of a split GGUF model: pass the first part, "
                              f"{str(part(1))!r}, and keep the others beside it.")
    tensors = []
    for i in range(2, count + 1):
        if not part(i).is_file():
            raise GGUFImportError(f"{str(path)!r} is part 1 of {count} of a split GGUF model, but part {i}, "
                                  f"{str(part(i))!r}, is missing: put every part in the same folder.")
        other = open_gguf(part(i))
        other_no = other.fields.get("split.no")
        if other_no is None or int(other_no.contents()) != i - 1:
            raise GGUFImportError(f"{str(part(i))!r} is not part {i} of the split GGUF model {str(path)!r}; put the "
                                  "parts of one model, under the names llama-gguf-split gave them, in one folder.")
        tensors += list(other.tensors)
    return tensors


# what an import writes (a re-import replaces them); the weights first, as readers need them
_IMPORT_FILES = (WEIGHTS_FILENAME, CONFIG_FILENAME, "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _check_holds_no_other_model(checkpoint_dir: Path) -> None:
    """Refuse a folder holding another model's files that the import would not replace: its config.json (whose
    token ids an export prefers), weights, or tokenizer files (a chat_template.jinja takes priority over ours)."""
    from lit_gpt.convert_hf import HF_CONFIG_FILENAME, TOKENIZER_FILES

    if not checkpoint_dir.is_dir():
        return
    other = sorted(
        p.name for p in checkpoint_dir.iterdir()
        if p.is_file() and p.name not in _IMPORT_FILES and (
            p.name == HF_CONFIG_FILENAME or p.name in TOKENIZER_FILES or p.suffix == ".safetensors"
            or (p.name.startswith("pytorch_model") and p.suffix == ".bin"))
    )
    if other:
        raise GGUFImportError(
            f"--checkpoint_dir {str(checkpoint_dir)!r} holds another model's files ({', '.join(other)}), which would "
            "stay beside the import and be read with it: import into a new folder, or delete them first."
        )


def _check_complete(state_dict: dict, config: Config, path: Path) -> None:
    from lit_gpt.model import GPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise GGUFImportError(f"{str(path)!r} lacks tensors for {missing[:4]}{' …' if len(missing) > 4 else ''}.")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise GGUFImportError(
                f"{str(path)!r}: {name} has shape {tuple(state_dict[name].shape)} but the metadata implies {shape}."
            )
