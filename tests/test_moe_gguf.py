"""GGUF import of mixtures of experts against transformers: tiny random Mixtral, Qwen3-MoE and Qwen2-MoE models
written as llama.cpp's converter writes them (Mixtral as a `llama` file with permuted q/k rows, Qwen3-MoE as
`qwen3moe`, Qwen2-MoE as `qwen2moe` with its shared expert's `_shexp` tensors; each block's experts stacked into one
3-D tensor per projection, or, in Mixtral files from before that, one tensor per expert), imported, and compared with
the HF conversion of the same checkpoint and with transformers' logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lit_gpt import GPT  # noqa: E402
from lit_gpt.convert_hf import config_from_hf, hf_to_lit_state_dict  # noqa: E402
from lit_gpt.gguf import GGUFImportError, convert_gguf  # noqa: E402
from lit_gpt.utils import WEIGHTS_FILENAME  # noqa: E402
from test_convert_hf import make_hf_model  # noqa: E402
from test_gguf import (  # noqa: E402, F401 (byte_level_vocab is a fixture)
    HF_TO_GGUF, byte_level_vocab, llama_cpp_permute, model_metadata, tokenizer_metadata, write_gguf,
)

Q = gguf.GGMLQuantizationType
# every width different (32 wide, experts 48 or 24 wide, 4 or 6 experts) so a swapped axis cannot go unnoticed
MIXTRAL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
               tie_word_embeddings=False)
QWEN3_MOE = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=3,
                 norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False)
# llama.cpp implies norm_topk_prob false (its qwen2moe graph does not renormalise), as Qwen1.5-MoE-A2.7B has it;
# the shared expert (40 wide) differs from the routed ones (24) and from feed_forward_length (64)
QWEN2_MOE = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                 num_experts_per_tok=2, norm_topk_prob=False, qkv_bias=True, max_position_embeddings=64,
                 tie_word_embeddings=False)
# the HF checkpoint's expert projections, as llama.cpp's converter names their GGUF tensors
EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# Qwen2-MoE's shared expert and its gate, as gguf-py's tensor_mapping.py names them (MODEL_TENSOR.FFN_*_SHEXP)
SHARED_EXPERT = {"mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
                 "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
MOE_FIELDS = ("n_expert", "n_expert_per_token", "moe_intermediate_size", "moe_norm_topk", "norm_qk", "mlp_class_name",
              "intermediate_size", "n_layer", "n_head", "n_query_groups", "head_size", "rope_base", "norm_eps",
              "tie_embeddings", "shared_expert_intermediate_size", "attn_bias", "bias")


def hf_checkpoint(hf, tmp_path) -> dict:
    """The model's tensors as its saved checkpoint holds them (one tensor per expert), which is what llama.cpp's
    converter reads (transformers 5 fuses the experts in memory)."""
    hf.save_pretrained(tmp_path / "hf")
    return safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")


def gguf_tensors(checkpoint: dict, hf_config, arch: str, stacked: bool = True, squeeze: bool = False) -> dict:
    """What convert_hf_to_gguf.py writes: the router as `ffn_gate_inp`, the experts `torch.stack(..., dim=0)`-ed into
    `ffn_{gate,up,down}_exps` (numpy shape (n_expert, out, in)), or as `ffn_{gate,up,down}.E` in older files; a
    shared expert as `ffn_{gate,up,down}_shexp` and its gate as `ffn_gate_inp_shexp`, (1, n_embd) as HF stores it,
    or (n_embd,) with `squeeze` (older converters squeezed every tensor: `data_torch.squeeze().numpy()`)."""
    out, experts = {}, {}
    for name, value in checkpoint.items():
        array = value.float().numpy()
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            out[{"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}[name]] = (array, Q.F32)
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        parts = module.split(".")
        if module in SHARED_EXPERT:
            out[f"blk.{layer}.{SHARED_EXPERT[module]}.{kind}"] = (array.squeeze() if squeeze else array, Q.F32)
        elif parts[0] in ("block_sparse_moe", "mlp") and parts[1] == "gate":
            out[f"blk.{layer}.ffn_gate_inp.{kind}"] = (array, Q.F32)
        elif parts[0] in ("block_sparse_moe", "mlp") and parts[1] == "experts":
            projection = EXPERT_PARTS[parts[3]]
            if stacked:
                experts.setdefault((layer, projection), {})[int(parts[2])] = array
            else:
                out[f"blk.{layer}.ffn_{projection}.{parts[2]}.{kind}"] = (array, Q.F32)
        else:
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = hf_config.num_attention_heads if module == "self_attn.q_proj" else hf_config.num_key_value_heads
                array = llama_cpp_permute(array, heads)
            out[f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"] = (array, Q.F32)
    for (layer, projection), by_expert in experts.items():
        out[f"blk.{layer}.ffn_{projection}_exps.weight"] = (np.stack([by_expert[e] for e in sorted(by_expert)]), Q.F32)
    return out


def moe_metadata(hf_config, arch: str) -> dict:
    meta = model_metadata(hf_config, arch)
    # (the converter's expert count: find_hparam(["num_local_experts", "num_experts"]))
    meta.update({f"{arch}.expert_count": getattr(hf_config, "num_local_experts", None) or hf_config.num_experts,
                 f"{arch}.expert_used_count": hf_config.num_experts_per_tok})
    if arch in ("qwen2moe", "qwen3moe"):  # Qwen2MoeModel.set_gguf_parameters (Qwen3MoeModel inherits it)
        meta[f"{arch}.expert_feed_forward_length"] = hf_config.moe_intermediate_size
    if arch == "qwen2moe":
        meta[f"{arch}.expert_shared_feed_forward_length"] = hf_config.shared_expert_intermediate_size
    return meta


def import_and_compare(tmp_path, hf, arch: str, vocab, stacked: bool = True, squeeze: bool = False):
    checkpoint = hf_checkpoint(hf, tmp_path)
    tensors = gguf_tensors(checkpoint, hf.config, arch, stacked, squeeze)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, {**moe_metadata(hf.config, arch), **tokenizer_metadata(*vocab)},
                      tensors)
    config = convert_gguf(path, tmp_path / "ckpt")

    expected_config = config_from_hf(hf.config.to_dict())
    for field in MOE_FIELDS:
        assert getattr(config, field) == getattr(expected_config, field), field
    expected = hf_to_lit_state_dict(checkpoint, expected_config)
    ours = torch.load(tmp_path / "ckpt" / WEIGHTS_FILENAME)
    assert sorted(ours) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(ours[k], v), k

    model = GPT.from_checkpoint(tmp_path / "ckpt").eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(idx), hf(idx).logits
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    return config, path


def test_mixtral_gguf_with_stacked_experts(tmp_path, byte_level_vocab):
    hf = make_hf_model("mixtral", **MIXTRAL, vocab_size=len(byte_level_vocab[0]))
    config, path = import_and_compare(tmp_path, hf, "llama", byte_level_vocab)
    assert (config.n_expert, config.n_expert_per_token, config.moe_norm_topk) == (4, 2, True)
    assert config.moe_intermediate_size is None and config.expert_intermediate_size == 48
    # the axis order: GGUF's ne is (in, out, n_expert); the reader's numpy data is the reverse, (n_expert, out, in)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    gate, down = tensors["blk.0.ffn_gate_exps.weight"], tensors["blk.0.ffn_down_exps.weight"]
    assert (tuple(gate.shape.tolist()), gate.data.shape) == ((32, 48, 4), (4, 48, 32))
    assert (tuple(down.shape.tolist()), down.data.shape) == ((48, 32, 4), (4, 32, 48))


def test_mixtral_gguf_with_one_tensor_per_expert(tmp_path, byte_level_vocab):
    """The layout of Mixtral files from before llama.cpp stacked the experts: blk.N.ffn_gate.E and so on."""
    hf = make_hf_model("mixtral", **MIXTRAL, vocab_size=len(byte_level_vocab[0]), seed=1)
    _, path = import_and_compare(tmp_path, hf, "llama", byte_level_vocab, stacked=False)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "blk.1.ffn_down.3.weight" in names and not any("_exps" in n for n in names)


def test_qwen3_moe_gguf_with_qk_norms_and_narrow_experts(tmp_path, byte_level_vocab):
    hf = make_hf_model("qwen3_moe", **QWEN3_MOE, vocab_size=len(byte_level_vocab[0]))
    config, _ = import_and_compare(tmp_path, hf, "qwen3moe", byte_level_vocab)
    assert (config.n_expert, config.n_expert_per_token, config.moe_intermediate_size) == (6, 3, 24)
    assert config.norm_qk and config.moe_norm_topk and config.intermediate_size == 64


@pytest.mark.parametrize("gate_shape", ["(1, n_embd)", "(n_embd,)"])
def test_qwen2_moe_gguf_with_shared_expert_and_qkv_bias(tmp_path, byte_level_vocab, gate_shape):
    """A qwen2moe file: stacked experts, the shared expert's `_shexp` tensors and its sigmoid gate (stored (1, n_embd)
    by the current converter, (n_embd,) by older ones), q/k/v biases, neox rope (rows not permuted); llama.cpp does not
    renormalise the chosen experts' weights (norm_topk_prob false)."""
    hf = make_hf_model("qwen2_moe", **QWEN2_MOE, vocab_size=len(byte_level_vocab[0]))
    config, path = import_and_compare(tmp_path, hf, "qwen2moe", byte_level_vocab, squeeze=gate_shape == "(n_embd,)")
    assert (config.n_expert, config.n_expert_per_token, config.moe_intermediate_size) == (4, 2, 24)
    assert config.shared_expert_intermediate_size == 40 and config.intermediate_size == 64
    assert not config.moe_norm_topk and config.attn_bias and not config.norm_qk
    gate = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.1.ffn_gate_inp_shexp.weight"]
    assert gate.data.shape == ((32,) if gate_shape == "(n_embd,)" else (1, 32))


@pytest.mark.parametrize("case", ["shared experts", "shared-expert tensor", "no expert_count"])
def test_moe_gguf_that_cannot_be_imported_is_refused(tmp_path, byte_level_vocab, case):
    if case == "shared experts":  # llama.cpp's qwen3moe graph has no shared expert (only qwen2moe's has one)
        hf = make_hf_model("qwen3_moe", **QWEN3_MOE, vocab_size=len(byte_level_vocab[0]))
        arch, drop, extra = "qwen3moe", None, {"qwen3moe.expert_shared_feed_forward_length": 24}
        message = r"moe\.gguf' sets qwen3moe\.expert_shared_feed_forward_length=24, which lit_gpt's mixture of " \
                  r"experts cannot express\.$"
    elif case == "shared-expert tensor":  # nor has its llama graph (Mixtral): a Qwen2-MoE gate in a llama file
        hf = make_hf_model("mixtral", **MIXTRAL, vocab_size=len(byte_level_vocab[0]))
        arch, drop, extra = "llama", None, {}
        message = r"moe\.gguf' has the shared-expert tensor 'blk\.0\.ffn_gate_inp_shexp\.weight', which lit_gpt's " \
                  r"mixture of experts cannot express in a llama model\.$"
    else:  # a Mixtral file whose metadata lost llama.expert_count
        hf = make_hf_model("mixtral", **MIXTRAL, vocab_size=len(byte_level_vocab[0]))
        arch, drop, extra = "llama", "llama.expert_count", {}
        message = r"moe\.gguf' lacks the metadata key 'llama\.expert_count', which the import needs\.$"
    meta = {k: v for k, v in moe_metadata(hf.config, arch).items() if k != drop}
    tensors = gguf_tensors(hf_checkpoint(hf, tmp_path), hf.config, arch)
    if case == "shared-expert tensor":
        tensors = {"blk.0.ffn_gate_inp_shexp.weight": (np.ones((1, 32), np.float32), Q.F32), **tensors}
    path = write_gguf(tmp_path / "moe.gguf", arch, {**meta, **extra, **tokenizer_metadata(*byte_level_vocab)}, tensors)
    with pytest.raises(GGUFImportError, match=message):
        convert_gguf(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_expert_metadata_rules():
    """Without expert_feed_forward_length a qwen3moe or qwen2moe file's experts are feed_forward_length /
    expert_used_count wide, and without expert_shared_feed_forward_length a qwen2moe file's shared expert is
    feed_forward_length wide (llama.cpp's fallbacks); qwen2moe never renormalises, whatever expert_weights_norm says
    (its graph passes norm_w false); a llama file whose expert_count is 0 is dense; a routing-weight scale and a second
    shared expert are refused."""
    from lit_gpt.gguf import config_from_gguf

    def meta(arch, **extra):
        return {"general.architecture": arch, f"{arch}.embedding_length": 32, f"{arch}.attention.head_count": 4,
                f"{arch}.block_count": 2, f"{arch}.feed_forward_length": 96,
                **{f"{arch}.{k}": v for k, v in extra.items()}}

    shapes = {"token_embd.weight": (64, 32)}
    config = config_from_gguf(meta("qwen3moe", expert_count=8, expert_used_count=4), shapes, "q.gguf")
    assert (config.mlp_class_name, config.n_expert, config.moe_intermediate_size, config.norm_qk) == (
        "LLaMAMoE", 8, 24, True)
    config = config_from_gguf(meta("qwen2moe", expert_count=8, expert_used_count=4, expert_weights_norm=True),
                              shapes, "q2.gguf")
    assert (config.moe_intermediate_size, config.shared_expert_intermediate_size, config.moe_norm_topk) == (
        24, 96, False)
    assert config_from_gguf(meta("llama", expert_count=0), shapes, "l.gguf").mlp_class_name == "LLaMAMLP"
    with pytest.raises(GGUFImportError, match=r"'s\.gguf' sets qwen2moe\.expert_shared_count=2, which"):
        config_from_gguf(meta("qwen2moe", expert_count=8, expert_used_count=2, expert_shared_count=2), shapes, "s.gguf")
    with pytest.raises(GGUFImportError, match=r"'m\.gguf' sets llama\.expert_weights_scale=2\.5, which"):
        config_from_gguf(meta("llama", expert_count=8, expert_used_count=2, expert_weights_scale=2.5), shapes, "m.gguf")
