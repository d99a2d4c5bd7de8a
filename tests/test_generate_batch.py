"""Batched, left-padded generation (`generate_batch`, `GPT.forward(..., pad_lengths=...)`) against each prompt alone
and against transformers' own left-padded batch forward."""

import pytest
import torch

from lit_gpt import GPT
from lit_gpt.generate import generate, generate_batch
from tests.test_generate import GPT2_LIKE, greedy_without_cache, tiny_model

PROMPTS = [[3, 14, 15, 9, 26, 5], [7], [40, 2, 33], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
# Gemma 2/3 style: sliding windows shorter than the prompts, soft-capped scores and logits, a second RoPE base
GEMMA_LIKE = dict(mlp_class_name="GemmaMLP", gelu_approximate="tanh", norm_unit_offset=True, scale_embeddings=True,
                  post_attention_norm=True, post_mlp_norm=True, attention_scores_scalar=24, norm_qk=True,
                  attention_logit_softcapping=5.0, final_logit_softcapping=4.0, sliding_window_size=3,
                  sliding_window_indices=[1, 0], rope_local_base_freq=100.0, rope_adjustments=dict(factor=2.0))
ARCHS = [{}, GPT2_LIKE, dict(rotary_percentage=0.5, parallel_residual=True, shared_attention_norm=True), GEMMA_LIKE]
ARCH_IDS = ["llama", "gpt2", "partial-rope-parallel", "gemma-windows"]


def _left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    idx = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    return idx, torch.tensor([longest - len(p) for p in prompts])


@pytest.mark.parametrize("kw", ARCHS, ids=ARCH_IDS)
def test_each_row_of_a_padded_prefill_has_the_logits_of_its_prompt_alone(kw):
    model = tiny_model(**kw)
    idx, pads = _left_padded(PROMPTS, pad_id=49)
    longest = idx.size(1)
    with torch.inference_mode():
        model.set_kv_cache(len(PROMPTS), longest + 1)
        batched = model(idx, torch.arange(longest), pad_lengths=pads)
        # one decode step against the padded cache
        nxt = torch.tensor([[1], [2], [3], [4]])
        step = model(nxt, torch.tensor([longest]), pad_lengths=pads)
        model.clear_kv_cache()
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt + [row + 1]]))[0]
            torch.testing.assert_close(batched[row, pads[row]:], alone[:-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[row, 0], alone[-1], rtol=1e-5, atol=1e-5)
            assert torch.isfinite(batched[row]).all()  # padding positions too: NaN there would poison the cache


@pytest.mark.parametrize("kw", ARCHS, ids=ARCH_IDS)
def test_greedy_batch_equals_each_prompt_generated_alone(kw):
    model = tiny_model(**kw)
    prompts = [torch.tensor(p) for p in PROMPTS]
    out = generate_batch(model, prompts, 12, temperature=0.0, include_prompt=False)
    for prompt, tokens in zip(prompts, out):
        assert tokens.tolist() == greedy_without_cache(model, prompt, 12)
        assert tokens.tolist() == generate(model, prompt, 12, temperature=0.0, include_prompt=False).tolist()
    assert model.transformer.h[0].attn.kv_cache is None


def test_rows_stop_independently_at_eos_and_stop_sequences():
    model = tiny_model()
    prompts = [torch.tensor(p) for p in PROMPTS]
    free = [t.tolist() for t in generate_batch(model, prompts, 12, temperature=0.0, include_prompt=False)]
    # stop each row somewhere different: an EOS id for row 0, a two-token sequence for row 2
    eos = free[0][3]
    seq = tuple(free[2][5:7])
    out = generate_batch(model, prompts, 12, temperature=0.0, include_prompt=False, eos_id=eos, stop_tokens=[seq])
    for prompt, tokens in zip(prompts, out):
        alone = generate(model, prompt, 12, temperature=0.0, include_prompt=False, eos_id=eos, stop_tokens=[seq])
        assert tokens.tolist() == alone.tolist()
    assert out[0].tolist() == free[0][: free[0].index(eos)]
    assert len(out[2]) <= 5
    assert any(len(t) == 12 for t in out)  # the others went on after the finished rows left the batch


def test_stop_check_ends_a_row_keeping_its_tokens():
    model = tiny_model()
    prompts = [torch.tensor(p) for p in PROMPTS]
    free = generate_batch(model, prompts, 10, temperature=0.0, include_prompt=False)
    out = generate_batch(model, prompts, 10, temperature=0.0, include_prompt=False,
                         stop_check=lambda i, toks: i == 1 and len(toks) == 4)
    assert out[1].tolist() == free[1][:4].tolist()
    for i in (0, 2, 3):
        assert out[i].tolist() == free[i].tolist()


def test_sampled_batch_is_valid_and_reproducible():
    model = tiny_model()
    prompts = [torch.tensor(p) for p in PROMPTS]
    kw = dict(temperature=1.0, top_k=5, top_p=0.9, include_prompt=True)
    a = generate_batch(model, prompts, 8, generator=torch.Generator().manual_seed(1), **kw)
    b = generate_batch(model, prompts, 8, generator=torch.Generator().manual_seed(1), **kw)
    for prompt, x, y in zip(prompts, a, b):
        assert x.tolist() == y.tolist()
        assert x[: len(prompt)].tolist() == prompt.tolist() and len(x) == len(prompt) + 8
        assert (x < model.config.vocab_size + 14).all()


def test_block_size_limits_every_row_by_the_longest_prompt():
    model = tiny_model()  # block_size 32
    prompts = [torch.arange(1, 29), torch.tensor([5, 6])]
    out = generate_batch(model, prompts, 50, temperature=0.0, include_prompt=False)
    assert [len(t) for t in out] == [4, 4]
    with pytest.raises(ValueError, match="block_size"):
        generate_batch(model, [torch.arange(32)], 1)
    with pytest.raises(ValueError, match="prompt 1"):
        generate_batch(model, [torch.tensor([1]), torch.tensor([], dtype=torch.long)], 1)
    assert generate_batch(model, [], 3) == []


@pytest.mark.slow  # importing transformers alone takes seconds
def test_padded_batch_matches_transformers_left_padded_forward():
    """transformers' Llama on a left-padded batch with its attention mask and position ids is the reference."""
    transformers = pytest.importorskip("transformers")
    from lit_gpt.convert_hf import config_to_hf, lit_to_hf_state_dict

    model = tiny_model()
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(model.config))
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    missing, unexpected = hf_model.load_state_dict(lit_to_hf_state_dict(model.state_dict(), model.config), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    idx, pads = _left_padded(PROMPTS, pad_id=49)
    longest = idx.size(1)
    real = torch.arange(longest)[None, :] >= pads[:, None]
    with torch.inference_mode():
        expected = hf_model(idx, attention_mask=real.long(),
                            position_ids=(torch.arange(longest)[None] - pads[:, None]).clamp(min=0)).logits
        model.set_kv_cache(len(PROMPTS), longest)
        ours = model(idx, torch.arange(longest), pad_lengths=pads)
        model.clear_kv_cache()
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-5, atol=1e-5)
