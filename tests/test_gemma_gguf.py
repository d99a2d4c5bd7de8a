"""GGUF import of Gemma, Gemma 2 and Gemma 3 (text) files against transformers: tiny random models written as
llama.cpp's converter writes them (every `*norm.weight` plus 1, no q/k permutation, tensor names from the gguf
package's own map), imported, and compared with the HF conversion of the same model and with its logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from lit_gpt import GPT  # noqa: E402
from lit_gpt.convert_hf import config_from_hf, hf_to_lit_state_dict  # noqa: E402
from lit_gpt.gguf import GGUFImportError, config_from_gguf, convert_gguf, gemma_attention_scores_scalar  # noqa: E402
from lit_gpt.tokenizer import Tokenizer  # noqa: E402
from test_convert_hf import make_hf_model  # noqa: E402
from test_gguf import sentencepiece_gguf, write_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
# 16-wide heads in a 32-wide model of 4 heads (head_dim != n_embd / n_head, as in every Gemma)
TINY = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6)
SEQ = 12
ARCH = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}


@pytest.fixture(scope="module")
def spm_vocab():
    """Gemma's kind of vocabulary: SentencePiece with byte fallback, no space prefix, BOS 1 / EOS 2."""
    lines = ["the quick brown fox jumps over the lazy dog", "hello world, hello gemma", "numbers 123 and 4567"] * 4
    _, metadata = sentencepiece_gguf(lines, vocab_size=300)
    return {**metadata, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_space_prefix": False}


def gemma_tensors(hf, arch: str) -> dict:
    """The tensors llama.cpp's Gemma converters write: gguf's name map, norms plus 1, no lm_head (tied)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf.config.num_hidden_layers)
    out = {}
    for name, value in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        base, _, kind = name.rpartition(".")
        array = value.detach().float().numpy()
        if name.endswith("norm.weight"):
            array = array + np.float32(1)
        out[f"{names.get_name(base)}.{kind}"] = (array, Q.F32)
    return out


def gemma_metadata(hf, arch: str, **extra) -> dict:
    """What the converter's set_gguf_parameters writes (Gemma 1/2 write no RoPE base: llama.cpp's default 10000)."""
    c = hf.config
    meta = {
        f"{arch}.context_length": c.max_position_embeddings, f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_hidden_layers, f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        f"{arch}.attention.key_length": c.head_dim, f"{arch}.attention.value_length": c.head_dim,
    }
    if arch == "gemma2":
        meta.update({f"{arch}.attn_logit_softcapping": float(c.attn_logit_softcapping),
                     f"{arch}.final_logit_softcapping": float(c.final_logit_softcapping),
                     f"{arch}.attention.sliding_window": c.sliding_window})
    if arch == "gemma3":
        full = c.rope_parameters["full_attention"]
        meta.update({f"{arch}.rope.freq_base": float(full["rope_theta"]),
                     f"{arch}.attention.sliding_window": c.sliding_window})
        if full.get("rope_type") == "linear":
            meta.update({f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": float(full["factor"])})
    meta.update(extra)
    return meta


def import_and_compare(tmp_path, hf, model_type: str, vocab: dict):
    """Import the GGUF form of `hf`; its lit weights must be the HF conversion's, its logits transformers'."""
    arch = ARCH[model_type]
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, {**gemma_metadata(hf, arch), **vocab}, gemma_tensors(hf, arch))
    config = convert_gguf(path, tmp_path / "ckpt")
    model = GPT.from_checkpoint(tmp_path / "ckpt").eval()

    expected_config = config_from_hf(hf.config.to_dict())
    for field in ("n_layer", "n_head", "n_query_groups", "head_size", "norm_eps", "norm_unit_offset", "norm_qk",
                  "mlp_class_name", "gelu_approximate", "scale_embeddings", "post_attention_norm", "post_mlp_norm",
                  "attention_scores_scalar", "attention_logit_softcapping", "final_logit_softcapping",
                  "sliding_window_size", "sliding_window_indices", "rope_base", "rope_local_base_freq",
                  "rope_adjustments", "tie_embeddings"):
        assert getattr(config, field) == getattr(expected_config, field), field
    expected = hf_to_lit_state_dict(hf.state_dict(), expected_config)
    ours = model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as every Gemma file llama.cpp writes
    assert sorted(ours) == sorted([*expected, "lm_head.weight"])
    for k, v in expected.items():
        if "norm" in k or k == "transformer.ln_f.weight":  # norm_1, norm_2, post_*_norm, norm_q/norm_k, ln_f
            # the file holds w + 1 in float32, so w comes back up to that rounding; the scale 1 + w the model
            # computes is the file's, which transformers' float32 `1 + w` rounds to the same value
            torch.testing.assert_close(ours[k], v, atol=2.0 ** -23, rtol=0, msg=k)
        else:
            assert torch.equal(ours[k], v), k
    idx = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(idx), hf(idx).logits
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    return config


def test_gemma_gguf_equals_the_hf_conversion_and_adds_bos(tmp_path, spm_vocab):
    vocab_size = len(spm_vocab["tokenizer.ggml.tokens"])
    hf = make_hf_model("gemma", **TINY, num_hidden_layers=2, vocab_size=vocab_size)
    config = import_and_compare(tmp_path, hf, "gemma", spm_vocab)
    assert config.attention_scores_scalar is None and config.rope_base == 10000.0
    # Gemma needs BOS: llama.cpp adds it to a SentencePiece vocabulary that does not say otherwise
    tokenizer = Tokenizer(tmp_path / "ckpt")
    assert tokenizer.encode("hello world").tolist()[0] == 1


def test_gemma2_gguf_with_sliding_windows_and_soft_caps(tmp_path, spm_vocab):
    """A window of 4 in a 12-token sequence and caps small enough to bind; query_pre_attn_scalar is the head size,
    which llama.cpp uses for every Gemma 2 but the 27B."""
    vocab_size = len(spm_vocab["tokenizer.ggml.tokens"])
    hf = make_hf_model("gemma2", **TINY, num_hidden_layers=4, vocab_size=vocab_size, sliding_window=4,
                       query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    config = import_and_compare(tmp_path, hf, "gemma2", spm_vocab)
    assert config.sliding_window_indices == [1, 0, 1, 0] and config.sliding_window_size == 4
    assert (config.attention_logit_softcapping, config.final_logit_softcapping) == (5.0, 3.0)


def test_gemma3_27b_layout_gguf_with_qk_norms_linear_rope_and_local_base(tmp_path, spm_vocab):
    """62 blocks, the count llama.cpp takes for Gemma 3 27B, so the attention scale is 1/sqrt(n_embd / n_head)
    (query_pre_attn_scalar 8 here, not the head size 16); five in six blocks slide with base 10000, the others use
    base 1e6 with linear scaling by 4."""
    vocab_size = len(spm_vocab["tokenizer.ggml.tokens"])
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    hf = make_hf_model("gemma3_text", **TINY, num_hidden_layers=62, vocab_size=vocab_size, sliding_window=4,
                       query_pre_attn_scalar=8, sliding_window_pattern=6, rope_parameters=rope)
    config = import_and_compare(tmp_path, hf, "gemma3_text", spm_vocab)
    assert config.attention_scores_scalar == 8 and config.norm_qk
    assert config.sliding_window_indices == [int((i + 1) % 6 != 0) for i in range(62)]
    assert (config.rope_adjustments, config.rope_base, config.rope_local_base_freq) == ({"factor": 4.0}, 1e6, 1e4)


def test_gemma_rules_llama_cpp_hard_codes():
    """The attention scale follows the block count (27B: 46 Gemma 2 / 62 Gemma 3 blocks); a file's own
    sliding_window_pattern (a period or one bool per block) wins over the hard-coded period; a Gemma 3 file without
    a window has full attention everywhere."""
    assert gemma_attention_scores_scalar("gemma2", 46, 4608, 32, 128) == 144  # gemma-2-27b's query_pre_attn_scalar
    assert gemma_attention_scores_scalar("gemma2", 42, 3584, 16, 256) == 256
    assert gemma_attention_scores_scalar("gemma3", 62, 5376, 32, 128) == 168  # gemma-3-27b's
    assert gemma_attention_scores_scalar("gemma3", 26, 1152, 4, 256) == 256   # gemma-3-1b: not 288
    assert gemma_attention_scores_scalar("gemma", 28, 3072, 16, 256) is None

    meta = {"gemma3.embedding_length": 32, "gemma3.attention.head_count": 4, "gemma3.attention.key_length": 16,
            "gemma3.block_count": 4, "gemma3.feed_forward_length": 48, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
            "gemma3.attention.sliding_window": 8, "general.architecture": "gemma3"}
    shapes = {"token_embd.weight": (64, 32)}
    assert config_from_gguf(meta, shapes, "g.gguf").sliding_window_indices == [1, 1, 1, 1]
    period = config_from_gguf({**meta, "gemma3.attention.sliding_window_pattern": 2}, shapes, "g.gguf")
    assert period.sliding_window_indices == [1, 0, 1, 0]
    per_block = {**meta, "gemma3.attention.sliding_window_pattern": [False, True, True, False]}
    assert config_from_gguf(per_block, shapes, "g.gguf").sliding_window_indices == [0, 1, 1, 0]
    no_window = config_from_gguf({k: v for k, v in meta.items() if "sliding" not in k}, shapes, "g.gguf")
    assert (no_window.sliding_window_size, no_window.rope_local_base_freq) == (None, None)


def test_gemma2_file_without_its_norm_epsilon_is_refused(tmp_path, spm_vocab):
    vocab_size = len(spm_vocab["tokenizer.ggml.tokens"])
    hf = make_hf_model("gemma2", **TINY, num_hidden_layers=2, vocab_size=vocab_size, query_pre_attn_scalar=16)
    meta = {k: v for k, v in gemma_metadata(hf, "gemma2").items() if "epsilon" not in k}
    path = write_gguf(tmp_path / "g2.gguf", "gemma2", {**meta, **spm_vocab}, gemma_tensors(hf, "gemma2"))
    with pytest.raises(GGUFImportError, match=r"g2\.gguf' lacks the metadata key "
                                              r"'gemma2\.attention\.layer_norm_rms_epsilon', which the import needs\."):
        convert_gguf(path, tmp_path / "ckpt")
