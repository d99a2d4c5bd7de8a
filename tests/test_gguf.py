"""GGUF import against references we did not write: transformers models (the original HF layout and transformers'
own GGUF loader with its own dequantization and un-permutation), SentencePiece, and the real SmolLM2 weights."""

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.gguf import GGUFImportError, convert_gguf, tokenizer_from_gguf
from lit_gpt.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
REPO_ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------ writing GGUF files
@pytest.fixture(scope="module")
def byte_level_vocab():
    """(tokens, merges) of a small byte-level BPE trained with `tokenizers`, specials first as in SmolLM2."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789", "hello world, it's me"] * 8,
                           trainer=trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, merges


def tokenizer_metadata(tokens, merges, pre="gpt-2"):
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict) -> Path:
    """`tensors`: name -> (float array in PyTorch layout, ggml type) or (raw block bytes, ggml type)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8:  # already quantized blocks
            w.add_tensor(name, array, raw_dtype=qtype)
        elif qtype is None:  # the array's own dtype (integer tensors)
            w.add_tensor(name, array)
        elif qtype == Q.F32:
            w.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what llama.cpp's convert_hf_to_gguf.py does to Llama's q_proj/k_proj rows (pairs a head's two halves)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",  # Qwen3, OLMo 2
    "post_attention_layernorm_olmo2": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",  # Phi-3's fused layers, stored as they are
}


def gguf_tensors_from_hf(hf_model, arch: str, qtypes: dict = None) -> dict:
    cfg = hf_model.config
    out = {}
    for name, value in hf_model.state_dict().items():
        array = value.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch == "olmo2" and module == "post_attention_layernorm":  # (after the attention, not before the MLP)
                module = "post_attention_layernorm_olmo2"
            gname = f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"
            if arch in ("llama", "smollm3", "granite") and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if module == "self_attn.q_proj" else cfg.num_key_value_heads
                array = llama_cpp_permute(array, heads)
        qtype = (qtypes or {}).get(gname.split(".", 2)[-1] if gname.startswith("blk.") else gname, Q.F32)
        out[gname] = (array, qtype)
    return out


def model_metadata(hf_config, arch: str) -> dict:
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.rope.freq_base": float(c.rope_parameters.get("full_attention", c.rope_parameters)["rope_theta"]),
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        f"{arch}.vocab_size": c.vocab_size,
    }


def hf_model(kind: str, vocab_size: int, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
    base.update(kw)
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base))
    elif kind == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**base))
    elif kind in ("olmo2", "olmo3"):
        config = getattr(transformers, "Olmo2Config" if kind == "olmo2" else "Olmo3Config")(
            **base, pad_token_id=0, eos_token_id=0)
        model = getattr(transformers, "Olmo2ForCausalLM" if kind == "olmo2" else "Olmo3ForCausalLM")(config)
    elif kind == "smollm3":
        model = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**base, pad_token_id=0, bos_token_id=0,
                                                                           eos_token_id=0))
    elif kind == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**base, pad_token_id=0, bos_token_id=0,
                                                                     eos_token_id=0))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**base))
    with torch.no_grad():  # HF's 0.02-std init makes every logit ~0; larger weights make the comparison mean more
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if p.ndim == 2 else 0.1)
    return model.eval()


def import_and_compare(tmp_path, hf, arch, tokenizer_meta, tensors_extra=None, seq=24, rtol=1e-5):
    tensors = gguf_tensors_from_hf(hf, arch)
    tensors.update(tensors_extra or {})
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, {**model_metadata(hf.config, arch), **tokenizer_meta}, tensors)
    config = convert_gguf(path, tmp_path / "ckpt")
    model = GPT.from_checkpoint(tmp_path / "ckpt").eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, seq))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=rtol * theirs.abs().max().item(), rtol=0)
    return config, model


# ------------------------------------------------------------------------------------------------ tiny models
@pytest.mark.slow
def test_llama_gguf_matches_the_original_hf_model(tmp_path, byte_level_vocab):
    tokens, merges = byte_level_vocab
    hf = hf_model("llama", len(tokens))
    config, _ = import_and_compare(tmp_path, hf, "llama", tokenizer_metadata(tokens, merges))
    assert (config.n_layer, config.n_embd, config.n_head, config.n_query_groups) == (2, 64, 4, 2)
    assert config.intermediate_size == 96 and config.block_size == 256
    assert config.vocab_size == len(tokens) and not config.tie_embeddings
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files


def test_gguf_with_a_head_size_other_than_width_over_heads(tmp_path, byte_level_vocab):
    """attention.key_length 24 with width 64 and 4 heads (as Mistral-Nemo's 128 with 5120 / 32)."""
    tokens, merges = byte_level_vocab
    hf = hf_model("llama", len(tokens), head_dim=24, num_hidden_layers=1)
    config, _ = import_and_compare(tmp_path, hf, "llama", tokenizer_metadata(tokens, merges))
    assert (config.n_embd, config.n_head, config.head_size, config.rope_n_elem) == (64, 4, 24, 24)


def test_phi3_gguf_with_its_fused_layers_partial_rope_and_a_sliding_window(tmp_path, byte_level_vocab):
    """llama.cpp keeps Phi-3's qkv_proj and gate_up_proj whole (attn_qkv, ffn_up) and its rotate-half RoPE; its
    sliding window (8 tokens here, against 32-token inputs) stays one, as in transformers."""
    tokens, merges = byte_level_vocab
    hf = hf_model("phi3", len(tokens), num_hidden_layers=1, partial_rotary_factor=0.5, sliding_window=8)
    rope = {"phi3.rope.dimension_count": 8, "phi3.attention.sliding_window": 8}
    tensors = gguf_tensors_from_hf(hf, "phi3")
    path = write_gguf(tmp_path / "phi3.gguf", "phi3", {**model_metadata(hf.config, "phi3"), **rope,
                                                       **tokenizer_metadata(tokens, merges)}, tensors)
    config = convert_gguf(path, tmp_path / "ckpt")
    assert (config.rope_n_elem, config.head_size, config.sliding_window_size) == (8, 16, 8)
    assert config.block_size == hf.config.max_position_embeddings > 32
    model = GPT.from_checkpoint(tmp_path / "ckpt").eval()
    idx = torch.randint(0, len(tokens), (2, 32))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=0)


def test_long_context_phi3_gguf_with_longrope_factors(tmp_path, byte_level_vocab):
    """A 128K Phi-3 / Phi-3.5 / Phi-4-mini file: llama.cpp stores LongRoPE's factors as rope_factors_long/short and
    the original context and attention factor as metadata; imported, the model computes transformers' logits past
    the original context (16 here). A file without its short factors is refused in one sentence."""
    tokens, merges = byte_level_vocab
    g = torch.Generator().manual_seed(0)
    short, long = 1 + torch.rand(4, generator=g), 1 + 4 * torch.rand(4, generator=g)
    hf = hf_model("phi3", len(tokens), num_hidden_layers=1, partial_rotary_factor=0.5, max_position_embeddings=64,
                  original_max_position_embeddings=16,
                  rope_scaling=dict(type="longrope", short_factor=short.tolist(), long_factor=long.tolist()))
    metadata = {**model_metadata(hf.config, "phi3"), "phi3.rope.dimension_count": 8,
                "phi3.rope.scaling.original_context_length": 16,
                "phi3.rope.scaling.attn_factor": math.sqrt(1 + math.log(64 / 16) / math.log(16)),
                **tokenizer_metadata(tokens, merges)}
    factors = {"rope_factors_long.weight": (long.numpy(), Q.F32), "rope_factors_short.weight": (short.numpy(), Q.F32)}
    tensors = gguf_tensors_from_hf(hf, "phi3")
    path = write_gguf(tmp_path / "phi3.gguf", "phi3", metadata, {**tensors, **factors})
    config = convert_gguf(path, tmp_path / "ckpt")
    assert config.rope_adjustments["original_max_seq_len"] == 16 and config.block_size == 64
    model = GPT.from_checkpoint(tmp_path / "ckpt").eval()
    idx = torch.randint(0, len(tokens), (2, 30), generator=g)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=0)
    incomplete = write_gguf(tmp_path / "long.gguf", "phi3", metadata,
                            {**tensors, "rope_factors_long.weight": factors["rope_factors_long.weight"]})
    with pytest.raises(GGUFImportError, match=r"long\.gguf' has LongRoPE factors but lacks rope_factors_short"):
        convert_gguf(incomplete, tmp_path / "out")


@pytest.mark.slow
def test_smollm3_gguf_skips_rope_in_every_fourth_block_as_llama_cpp_does(tmp_path, byte_level_vocab):
    """llama.cpp's converter permutes SmolLM3's q/k rows as Llama's, and its graph leaves RoPE out of blocks 4, 8, ...
    (a step of 4 no GGUF key states): transformers' SmolLM3 with its default no_rope_layer_interval of 4."""
    tokens, merges = byte_level_vocab
    hf = hf_model("smollm3", len(tokens), num_hidden_layers=5, tie_word_embeddings=True)
    assert hf.config.no_rope_layers == [1, 1, 1, 0, 1]
    config, _ = import_and_compare(tmp_path, hf, "smollm3", tokenizer_metadata(tokens, merges))
    assert config.rope_indices == [1, 1, 1, 0, 1] and config.tie_embeddings


@pytest.mark.parametrize("kind", ["olmo2", "olmo3"])
def test_olmo2_gguf_with_post_norms_whole_width_qk_norms_and_olmo3_windows(kind, tmp_path, byte_level_vocab):
    """An olmo2 GGUF file (unpermuted q/k, rotate-half RoPE); OLMo 3 is one with a sliding window, which llama.cpp
    gives three blocks of four, as transformers' Olmo3 does."""
    tokens, merges = byte_level_vocab
    extra = dict(sliding_window=8, num_hidden_layers=4) if kind == "olmo3" else {}
    hf = hf_model(kind, len(tokens), **extra)
    meta = {"olmo2.attention.sliding_window": 8} if kind == "olmo3" else {}
    config, _ = import_and_compare(tmp_path, hf, "olmo2", {**tokenizer_metadata(tokens, merges), **meta})
    assert (config.pre_norms, config.norm_qk_type) == (False, "all")
    assert config.sliding_window_indices == ([1, 1, 1, 0] if kind == "olmo3" else None)


def test_granite_gguf_with_its_four_scalings(tmp_path, byte_level_vocab):
    """A granite file: llama.cpp's converter permutes q/k as Llama's and renames the multipliers to embedding_scale,
    residual_scale, attention.scale and logit_scale; transformers' Granite with the same values."""
    tokens, merges = byte_level_vocab
    scalings = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                    logits_scaling=8.0)
    hf = hf_model("granite", len(tokens), **scalings)
    meta = {"granite.embedding_scale": 12.0, "granite.residual_scale": 0.22, "granite.attention.scale": 0.0625,
            "granite.logit_scale": 8.0}
    config, _ = import_and_compare(tmp_path, hf, "granite", {**tokenizer_metadata(tokens, merges), **meta})
    assert (config.embedding_multiplier, config.residual_multiplier, config.attention_scale,
            config.logits_scaling) == pytest.approx((12.0, 0.22, 0.0625, 8.0))  # (float32 in the file)


def test_yarn_scaled_qwen2_gguf_matches_transformers_past_the_original_context(tmp_path, byte_level_vocab):
    """A qwen2 file with YaRN scaling (type, factor, original context: what llama.cpp's converter writes for
    Qwen's long-context setting): transformers' yarn logits over 48 tokens grown from 16."""
    tokens, merges = byte_level_vocab
    hf = hf_model("qwen2", len(tokens), rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1000.0,
                                                         "original_max_position_embeddings": 16})
    meta = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 16, "qwen2.rope.freq_base": 1000.0}
    tensors = gguf_tensors_from_hf(hf, "qwen2")
    path = write_gguf(tmp_path / "yarn.gguf", "qwen2", {**model_metadata(hf.config, "qwen2"),
                                                       **tokenizer_metadata(tokens, merges), **meta}, tensors)
    config = convert_gguf(path, tmp_path / "ckpt")
    assert config.rope_adjustments["factor"] == 4.0 and config.rope_adjustments["original_max_seq_len"] == 16
    model = GPT.from_checkpoint(tmp_path / "ckpt").eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 48))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=0)
    # DeepSeek's log multiplier is a knob the import does not reproduce: refused, naming it
    path = write_gguf(tmp_path / "deepseek.gguf", "qwen2", {**model_metadata(hf.config, "qwen2"), **meta,
                                                           **tokenizer_metadata(tokens, merges),
                                                           "qwen2.rope.scaling.yarn_log_multiplier": 0.1}, tensors)
    with pytest.raises(GGUFImportError, match="sets 'qwen2.rope.scaling.yarn_log_multiplier' to 0.1"):
        convert_gguf(path, tmp_path / "ckpt2")


def test_qwen2_gguf_with_biases_and_tied_embeddings(tmp_path, byte_level_vocab):
    tokens, merges = byte_level_vocab
    hf = hf_model("qwen2", len(tokens), tie_word_embeddings=True)
    config, model = import_and_compare(tmp_path, hf, "qwen2", tokenizer_metadata(tokens, merges, pre="qwen2"))
    assert config.attn_bias and not config.bias and config.tie_embeddings
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.slow
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, byte_level_vocab):
    tokens, merges = byte_level_vocab
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=4096, rope_theta=500000.0)
    hf = hf_model("llama", len(tokens), hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=8192, rope_parameters=rope)
    # the divisors llama.cpp's converter stores for Llama-3.1 scaling (generate_extra_tensors in LlamaModel)
    dim = 64
    freqs = 1.0 / (500000.0 ** (np.arange(0, dim, 2) / dim))
    low_wavelen, high_wavelen = 4096 / 1.0, 4096 / 4.0
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(8.0)
        else:
            smooth = (4096 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    config, _ = import_and_compare(
        tmp_path, hf, "llama", tokenizer_metadata(tokens, merges),
        tensors_extra={"rope_freqs.weight": (np.array(factors, dtype=np.float32), Q.F32)}, seq=40,
    )
    assert config.rope_adjustments["factor"] == 8.0


def k_quant_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random but valid Q4_K / Q6_K blocks (the gguf package cannot quantize to these types)."""
    n_blocks = cols // 256
    if qtype == Q.Q4_K:  # fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit values
        head = np.empty((rows, n_blocks, 2), dtype=np.float16)
        head[..., 0], head[..., 1] = 2e-3, 1e-3
        body = rng.integers(0, 256, (rows, n_blocks, 140), dtype=np.uint8)
        blocks = np.concatenate([head.view(np.uint8), body], axis=-1)
    else:  # Q6_K: 128 bytes low bits, 64 bytes high bits, 16 int8 scales, fp16 d
        body = rng.integers(0, 256, (rows, n_blocks, 208), dtype=np.uint8)
        d = np.full((rows, n_blocks, 1), 3e-4, dtype=np.float16)
        blocks = np.concatenate([body, d.view(np.uint8)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(rows, -1))


@pytest.mark.slow
def test_quantized_types_match_transformers_gguf_loader(tmp_path, byte_level_vocab):
    """F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K: transformers dequantizes (with its own torch code) and un-permutes the same
    file; our checkpoint must give its logits."""
    transformers = pytest.importorskip("transformers")
    tokens, merges = byte_level_vocab
    hf = hf_model("llama", len(tokens), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    tensors = gguf_tensors_from_hf(hf, "llama", qtypes={
        "token_embd.weight": Q.Q8_0, "output.weight": Q.Q4_1, "attn_v.weight": Q.Q4_0, "attn_output.weight": Q.Q8_0,
        "ffn_gate.weight": Q.BF16, "ffn_up.weight": Q.F16, "ffn_down.weight": Q.Q4_0,
    })
    for name, qtype in (("blk.0.attn_q.weight", Q.Q4_K), ("blk.0.attn_k.weight", Q.Q6_K)):
        rows, cols = tensors[name][0].shape
        tensors[name] = (k_quant_blocks(qtype, rows, cols, rng), qtype)
    meta = {**model_metadata(hf.config, "llama"), **tokenizer_metadata(tokens, merges)}
    path = write_gguf(tmp_path / "quant.gguf", "llama", meta, tensors)
    convert_gguf(path, tmp_path / "ckpt")
    ours = GPT.from_checkpoint(tmp_path / "ckpt").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="quant.gguf",
                                                            dtype=torch.float32).eval()
    idx = torch.randint(0, len(tokens), (1, 16))
    with torch.no_grad():
        a, b = ours(idx), ref(idx).logits
    torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("add_bos", [False, True])  # SmolLM2's vocabulary; Llama-3's (BOS before every text)
def test_byte_level_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, byte_level_vocab, add_bos):
    transformers = pytest.importorskip("transformers")
    tokens, merges = byte_level_vocab
    hf = hf_model("llama", len(tokens), num_hidden_layers=1)
    metadata = {**tokenizer_metadata(tokens, merges), "tokenizer.ggml.add_bos_token": add_bos}
    path = write_gguf(tmp_path / "tok.gguf", "llama", {**model_metadata(hf.config, "llama"), **metadata},
                      gguf_tensors_from_hf(hf, "llama"))
    convert_gguf(path, tmp_path / "ckpt")
    ours = Tokenizer(tmp_path / "ckpt")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    # the imported folder as transformers reads it (and as the HF export carries it): the same ids, BOS included
    folder = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    for text in ["the quick brown fox", "It's  hello\n\nworld!", "<|im_start|>user\nhé 日本<|im_end|>", "ab 12 3"]:
        assert ours.encode(text, bos=False).tolist() == ref.encode(text, add_special_tokens=False)
        assert folder.encode(text) == ref.encode(text)
        expected = ref.encode(text)
        if add_bos and expected[:2] == [1, 1]:  # the text starts with BOS (<|im_start|> here): ours adds no second
            expected = expected[1:]
        assert ours.encode(text).tolist() == expected
        assert expected[0] == 1 or not add_bos
        assert ours.decode(ours.encode(text, bos=False)) == text
    assert (ours.bos_id, ours.eos_id, ours.use_bos) == (1, 2, add_bos)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)


def test_end_of_turn_token_stops_generation_and_llama3_vocabularies_add_bos_by_default(tmp_path, byte_level_vocab):
    """llama.cpp's defaults (llama-vocab.cpp), written here as data: generation ends at any end-of-generation token,
    EOT as well as EOS (a chat model's <|im_end|> next to <|endoftext|>); a Llama-3 pre-tokenizer (llama-bpe, ...)
    starts every text with BOS when the file does not say add_bos_token."""
    tokens, merges = byte_level_vocab
    hf = hf_model("llama", len(tokens), num_hidden_layers=1)
    metadata = {**tokenizer_metadata(tokens, merges, pre="llama-bpe"), "tokenizer.ggml.eos_token_id": 0,
                "tokenizer.ggml.eot_token_id": 2}
    del metadata["tokenizer.ggml.add_bos_token"]
    path = write_gguf(tmp_path / "chat.gguf", "llama", {**model_metadata(hf.config, "llama"), **metadata},
                      gguf_tensors_from_hf(hf, "llama"))
    convert_gguf(path, tmp_path / "ckpt")
    tok = Tokenizer(tmp_path / "ckpt")
    assert tok.stop_ids == [0, 2] and tok.eos_id == 0
    assert json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())["eos_token_id"] == [0, 2]
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert tok.use_bos and tok.encode("the fox").tolist()[0] == 1


def sentencepiece_gguf(lines: list[str], vocab_size: int):
    """A SentencePiece BPE model trained on `lines` (byte fallback, as Llama's tokenizer.model) and the
    `tokenizer.ggml.model = llama` metadata llama.cpp's converter stores for it (pieces + scores + types)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2, normalization_rule_name="identity",
                                   # as in Llama's tokenizer.model: llama.cpp has no normalizer
                                   remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()

    def piece_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 1

    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [piece_type(i) for i in range(n)],
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return sp, metadata


def test_sentencepiece_style_vocabulary_matches_sentencepiece():
    """A `tokenizer.ggml.model = llama` vocabulary (pieces + scores, as llama.cpp's converter stores a SentencePiece
    model) tokenizes like SentencePiece itself."""
    lines = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer", "numbers 123 and 4567"] * 4
    sp, metadata = sentencepiece_gguf(lines, vocab_size=330)
    tok = tokenizer_from_gguf(metadata, "spm.gguf")
    for text in ["hello the fox", "the lazy dog jumps", "numbers 1234 héllo 日本", "  two  spaces", "brownfox"]:
        assert tok.encode(text).ids == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode("</s>hello").ids == [2] + sp.encode("hello")
    # with a BOS token, which llama.cpp adds to such vocabularies' texts by default: tokenizer.json adds it too
    tok = tokenizer_from_gguf({**metadata, "tokenizer.ggml.bos_token_id": 1}, "spm.gguf")
    assert tok.encode("hello the fox").ids == [1] + sp.encode("hello the fox")
    assert tok.encode("hello the fox", add_special_tokens=False).ids == sp.encode("hello the fox")


def test_sentencepiece_merges_are_ranked_by_score_as_sentencepiece_ranks_them():
    """Words that share pieces ('the', 'her', 'er' in brother, weather, whether, together) can be joined in several
    orders: SentencePiece and llama.cpp join first the pair whose piece scores highest. Joined the other way round,
    'hello' came out as '▁', 'h', 'el', 'lo' (the test above's vocabulary is too small to show it)."""
    lines = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer", "numbers 123 and 4567",
             "there then these those other brother together weather whether", "another theory in the theatre"] * 4
    sp, metadata = sentencepiece_gguf(lines, vocab_size=400)
    tok = tokenizer_from_gguf(metadata, "spm.gguf")
    for text in ["hello", "hello the fox", "brotherhood of weather", "the other theatre", "whethertogether",
                 "thereby another theory"]:
        assert tok.encode(text).ids == sp.encode(text), text


def test_user_defined_tokens_are_matched_whole_and_kept_when_special_tokens_are_skipped(tmp_path, byte_level_vocab):
    """A USER_DEFINED vocabulary entry (token type 4: Qwen's <think>, tool-call tags) is matched whole, as llama.cpp
    matches it, but it is text, not a control token: decoding with skip_special_tokens (lm-eval's generate_until
    answers) keeps it, as transformers' GGUF tokenizer does on the same file; an answer's <think> vanished."""
    transformers = pytest.importorskip("transformers")
    tokens, merges = byte_level_vocab
    tokens = tokens + ["<think>"]
    types = [3 if t in SPECIALS else 1 for t in tokens[:-1]] + [4]
    path = tiny_llama_gguf(tmp_path, (tokens, merges), metadata={"tokenizer.ggml.token_type": types})
    convert_gguf(path, tmp_path / "ckpt")
    ours = Tokenizer(tmp_path / "ckpt")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "<think>hello world<|im_end|>"
    ids = ours.encode(text, bos=False).tolist()
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ids[0] == len(tokens) - 1 and ids[-1] == 2
    kept = ours.decode(ids, skip_special_tokens=True)
    assert kept == ref.decode(ids, skip_special_tokens=True) == "<think>hello world"
    assert ours.decode(ids) == text


# ------------------------------------------------------------------------------------------------ clear errors
def tiny_llama_gguf(tmp_path, byte_level_vocab, arch="llama", replace=None, name="m.gguf", drop=(),
                    metadata=None):
    """A random one-layer llama GGUF (width 64, 4 heads, 2 KV heads, MLP 96) with `replace`d tensors and `metadata`
    over the tokenizer's."""
    tokens, merges = byte_level_vocab
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), 64), "output_norm.weight": (64,), "output.weight": (len(tokens), 64),
              "blk.0.attn_norm.weight": (64,), "blk.0.ffn_norm.weight": (64,), "blk.0.attn_q.weight": (64, 64),
              "blk.0.attn_k.weight": (32, 64), "blk.0.attn_v.weight": (32, 64), "blk.0.attn_output.weight": (64, 64),
              "blk.0.ffn_gate.weight": (96, 64), "blk.0.ffn_up.weight": (96, 64), "blk.0.ffn_down.weight": (64, 96)}
    tensors = {k: (rng.standard_normal(shape).astype(np.float32), Q.F32) for k, shape in shapes.items()}
    tensors.update(replace or {})
    for key in drop:
        del tensors[key]
    meta = {"block_count": 1, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
            "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5}
    meta = {f"{arch}.{k}": v for k, v in meta.items()}
    return write_gguf(tmp_path / name, arch, {**meta, **tokenizer_metadata(tokens, merges), **(metadata or {})},
                      tensors)


def test_unsupported_architecture_is_a_clear_error(tmp_path, byte_level_vocab):
    path = tiny_llama_gguf(tmp_path, byte_level_vocab, arch="mamba")
    with pytest.raises(GGUFImportError, match=r"m\.gguf.*'mamba' model; only llama, qwen2"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out" / "lit_model.pth").exists()


@pytest.mark.parametrize("qtype", ["I32", "Q8_K"])
def test_unsupported_tensor_type_is_a_clear_error(tmp_path, byte_level_vocab, qtype):
    if qtype == "I32":
        bad = (np.zeros((96, 64), dtype=np.int32), None)
    else:  # Q8_K is llama.cpp's internal dot-product type; gguf cannot dequantize it
        bad = (np.zeros((96, 292), dtype=np.uint8), Q.Q8_K)
    path = tiny_llama_gguf(tmp_path, byte_level_vocab, replace={"blk.0.ffn_up.weight": bad})
    with pytest.raises(GGUFImportError, match=rf"m\.gguf.*'blk\.0\.ffn_up\.weight'.*{qtype}"):
        convert_gguf(path, tmp_path / "out")


def test_unknown_tensor_and_pre_tokenizer_and_bad_file_are_clear_errors(tmp_path, byte_level_vocab):
    path = tiny_llama_gguf(tmp_path, byte_level_vocab,
                           replace={"blk.0.ffn_gate_exps.weight": (np.zeros((2, 32), np.float32), Q.F32)})
    with pytest.raises(GGUFImportError, match="'blk.0.ffn_gate_exps.weight' has no counterpart"):
        convert_gguf(path, tmp_path / "out")
    tokens, merges = byte_level_vocab
    with pytest.raises(GGUFImportError, match="tokenizer.ggml.pre='mystery' is not supported"):
        tokenizer_from_gguf(tokenizer_metadata(tokens, merges, pre="mystery"), "x.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFImportError, match="junk.gguf' is not a readable GGUF file"):
        convert_gguf(junk, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.gguf' does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_a_vocabulary_string_at_two_ids_is_refused_as_llama_cpp_refuses_it(tmp_path, byte_level_vocab):
    """llama.cpp's vocabulary loader (llama_vocab's load, llama-vocab.cpp) stops at a string that has two ids
    ("duplicate token in vocabulary"): text could be encoded to either, so the import would pick one that no
    reference agrees on (transformers' GGUF tokenizer keeps the last). It stops before the weights are read, in one
    sentence naming the file, the string and both ids. Empty strings, which llama.cpp renames and no text encodes
    to, are not compared."""
    tokens, merges = byte_level_vocab
    n = len(tokens)
    path = tiny_llama_gguf(tmp_path, (tokens + [tokens[300]], merges))
    with pytest.raises(GGUFImportError, match=rf"^'.*m\.gguf': its vocabulary \(tokenizer\.ggml\.tokens\) has "
                                              rf"{re.escape(repr(tokens[300]))} at ids 300 and {n}, which llama\.cpp "
                                              r"refuses too: convert the model to GGUF again or download another "
                                              r"copy\.$"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a SentencePiece-style vocabulary likewise
    spm = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "b", "ab", "ab"],
           "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0],
           "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1], "tokenizer.ggml.unknown_token_id": 0}
    with pytest.raises(GGUFImportError, match="has 'ab' at ids 5 and 6"):
        tokenizer_from_gguf(spm, "spm.gguf")
    # empty strings (llama.cpp: "[EMPTY_<id>]") are not duplicates
    tok = tokenizer_from_gguf(tokenizer_metadata(tokens + ["", ""], merges), "empty.gguf")
    assert tok.decode(tok.encode("the quick fox").ids) == "the quick fox"


def write_split_gguf(whole: Path, folder: Path, parts: list[slice]) -> Path:
    """`whole` split as llama-gguf-split writes it, into `folder`/m-0000i-of-0000N.gguf: part i holds the tensors
    `parts[i]` picks (by position), part 1 the metadata too; every part has its `split.no` (counted from 0),
    `split.count` and `split.tensors.count` (the tensors of all parts together). Returns part 1."""
    reader = gguf.GGUFReader(whole)
    metadata = {k: f.contents() for k, f in reader.fields.items()
                if not k.startswith("GGUF.") and k != "general.architecture"}
    tensors = {t.name: (np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))), Q.F32) for t in reader.tensors}
    names, n = list(tensors), len(parts)
    folder.mkdir()
    for i, part in enumerate(parts):
        meta = {**(metadata if i == 0 else {}), "split.no": i, "split.count": n, "split.tensors.count": len(names)}
        write_gguf(folder / f"m-{i + 1:05d}-of-{n:05d}.gguf", "llama", meta, {k: tensors[k] for k in names[part]})
    return folder / f"m-00001-of-{n:05d}.gguf"


def test_split_gguf_is_imported_from_its_first_part(tmp_path, byte_level_vocab):
    """Models over the Hub's file size limit come split by llama-gguf-split: `-00001-of-0000N.gguf` holds the
    metadata and some tensors, the others just tensors and their `split.no` (counted from 0)."""
    from lit_gpt.utils import load_file

    whole = tiny_llama_gguf(tmp_path, byte_level_vocab)
    split = write_split_gguf(whole, tmp_path / "split", [slice(0, 5), slice(5, 9), slice(9, None)]).parent
    convert_gguf(whole, tmp_path / "whole")
    convert_gguf(split / "m-00001-of-00003.gguf", tmp_path / "from_split")
    expected = load_file(tmp_path / "whole" / "lit_model.pth")
    got = load_file(tmp_path / "from_split" / "lit_model.pth")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)

    with pytest.raises(GGUFImportError, match=r"is part 2 of 3 of a split GGUF model: pass the first part, .*"
                                              r"m-00001-of-00003\.gguf"):
        convert_gguf(split / "m-00002-of-00003.gguf", tmp_path / "out")
    (split / "m-00003-of-00003.gguf").rename(split / "elsewhere.gguf")
    with pytest.raises(GGUFImportError, match=r"part 3, .*m-00003-of-00003\.gguf', is missing"):
        convert_gguf(split / "m-00001-of-00003.gguf", tmp_path / "out")
    (split / "m-00001-of-00003.gguf").rename(split / "renamed.gguf")
    with pytest.raises(GGUFImportError, match="is part 1 of 3 .* its name does not end in -00001-of-00003.gguf"):
        convert_gguf(split / "renamed.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("last_part, held", [(slice(8, None), 13), (slice(9, -1), 11)],
                         ids=["repeats_a_tensor", "lacks_a_tensor"])
def test_split_gguf_whose_parts_come_from_different_splits_is_refused(tmp_path, byte_level_vocab, last_part, held):
    """A part downloaded again from another split of the model (the same file names, other split points) repeats a
    tensor or lacks one: the parts then disagree with split.tensors.count, and the import stops in one sentence that
    names the files and the fix. Without that check a repeated tensor went through without a word, and a lost one
    was named without the parts as its cause."""
    whole = tiny_llama_gguf(tmp_path, byte_level_vocab)
    first = write_split_gguf(whole, tmp_path / "split", [slice(0, 5), slice(5, 9), last_part])
    with pytest.raises(GGUFImportError, match=rf"^the parts of the split GGUF model '.*m-00001-of-00003\.gguf' hold "
                                              rf"{held} tensors, but its split\.tensors\.count says 12: download the "
                                              r"parts again\.$"):
        convert_gguf(first, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_into_a_folder_of_another_model_is_refused(tmp_path, byte_level_vocab):
    """Another model's config.json (whose token ids an export prefers), weights or chat_template.jinja (which takes
    priority over ours) would be read with the import; a re-import into the import's own folder is fine."""
    path = tiny_llama_gguf(tmp_path, byte_level_vocab)
    out = tmp_path / "out"
    convert_gguf(path, out)
    convert_gguf(path, out)  # a second run over its own files
    (out / "prepared-data").mkdir()  # folders inside are the user's (prepared datasets)
    convert_gguf(path, out)
    for name in ("config.json", "model.safetensors", "chat_template.jinja"):
        (out / name).write_text("{}")
    with pytest.raises(GGUFImportError, match=r"holds another model's files \(chat_template\.jinja, config\.json, "
                                              r"model\.safetensors\), .*: import into a new folder"):
        convert_gguf(path, out)


@pytest.mark.slow
def test_cli_prints_one_line_error_without_traceback(tmp_path, byte_level_vocab):
    path = tiny_llama_gguf(tmp_path, byte_level_vocab, arch="mamba")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_gguf_checkpoint.py"), "--gguf_path", str(path),
         "--checkpoint_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "'mamba' model" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ real SmolLM2
@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    """transformers' tokenizer and float32 model loaded from the same GGUF file (slow: dequantizes every tensor)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.mark.slow
def test_smollm2_config_matches_the_named_config(smollm2_checkpoint):
    ours = Config.from_checkpoint(smollm2_checkpoint)
    named = Config.from_name("SmolLM2-135M-Instruct")
    for field in ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size", "vocab_size",
                  "padded_vocab_size", "rope_base", "tie_embeddings", "norm_class_name", "mlp_class_name",
                  "block_size", "bias", "attn_bias", "rotary_percentage"):
        assert getattr(ours, field) == getattr(named, field), field
    assert ours.norm_eps == pytest.approx(named.norm_eps)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_checkpoint, smollm2_reference):
    ref, _ = smollm2_reference
    tok = Tokenizer(smollm2_checkpoint)
    texts = [
        "Hello, world! The capital of France is Paris.",
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
        "naïve café, Grüße, 日本語のテキスト, emoji 🙂👍🏽",
        "def f(x):\n\treturn x ** 2  # comment\n\n\n   trailing   ",
        "<|endoftext|><repo_name>org/repo<file_sep>main.py",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids.tolist() == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>").tolist() == [2]
    assert (tok.eos_id, tok.stop_ids, tok.use_bos, tok.vocab_size) == (2, [2], False, 49152)
    messages = [{"role": "user", "content": "Name a colour."}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)


@pytest.mark.slow
def test_smollm2_logits_and_greedy_generation_match_transformers(smollm2_checkpoint, smollm2_reference):
    from lit_gpt.generate import generate, generate_stream

    _, ref = smollm2_reference
    tok = Tokenizer(smollm2_checkpoint)
    model = GPT.from_checkpoint(smollm2_checkpoint, dtype=torch.float32).eval()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    with torch.no_grad():
        ours, theirs = model(prompt[None]), ref(prompt[None]).logits
    scale = theirs.abs().max().item()
    # the same float32 weights and arithmetic: equal here; 1e-4 leaves room for another BLAS's summation order and
    # still catches a real slip (a default 1e-6 instead of the file's RMSNorm epsilon moves them by 8e-4 of scale)
    assert (ours - theirs).abs().max().item() <= 1e-4 * scale
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))

    new = generate(model, prompt, 24, temperature=0.0, eos_id=tok.stop_ids, include_prompt=False)
    expected = ref.generate(prompt[None], max_new_tokens=24, do_sample=False, eos_token_id=tok.stop_ids,
                            pad_token_id=tok.eos_id)[0, prompt.numel():].tolist()
    if expected and expected[-1] in tok.stop_ids:  # transformers returns the EOS; we stop before it
        expected = expected[:-1]
    assert new.tolist() == expected
    assert "Paris" in tok.decode(new)
    streamed = "".join(tok.decode_stream(generate_stream(model, prompt, 24, temperature=0.0, eos_id=tok.stop_ids)))
    assert streamed == tok.decode(new)


def test_dtype_option_and_tied_output(tmp_path, byte_level_vocab):
    from lit_gpt.utils import load_file

    path = tiny_llama_gguf(tmp_path, byte_level_vocab)
    config = convert_gguf(path, tmp_path / "bf16", dtype=torch.bfloat16)
    sd = load_file(tmp_path / "bf16" / "lit_model.pth")
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert not config.tie_embeddings and "lm_head.weight" in sd
    reference = torch.from_numpy(gguf.GGUFReader(path).tensors[0].data.copy())  # token_embd, F32 as written
    torch.testing.assert_close(sd["transformer.wte.weight"], reference.to(torch.bfloat16))
    # without output.weight the output projection is the embedding (tied), and nothing extra is saved
    tied = convert_gguf(tiny_llama_gguf(tmp_path, byte_level_vocab, name="tied.gguf", drop=("output.weight",)),
                        tmp_path / "tied")
    assert tied.tie_embeddings and "lm_head.weight" not in load_file(tmp_path / "tied" / "lit_model.pth")
    model = GPT.from_checkpoint(tmp_path / "tied")
    assert model.lm_head.weight is model.transformer.wte.weight
