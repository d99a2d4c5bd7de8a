"""The sliding-window blocks' ring caches (`RingKVCache`): only the window's last positions are kept, and every
logit and greedy token is the one a whole-length cache (`set_kv_cache(..., ring=False)`) and a forward without any
cache give, for prompts and generations longer than the window, a prompt fed in chunks, and left-padded batches."""

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.generate import generate, generate_batch
from lit_gpt.model import KVCache, RingKVCache
from tests.test_generate import greedy_without_cache, tiny_model
from tests.test_generate_batch import GEMMA_LIKE, _left_padded

# Mistral v0.1: a window in every block; Gemma 2/3: in some blocks, with soft caps and a second RoPE base
ARCHS = {"mistral-like": dict(sliding_window_size=4), "gemma-like": GEMMA_LIKE}
PROMPT = [3, 14, 15, 9, 26, 5, 7, 40, 2, 33, 11]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_windowed_blocks_keep_only_the_window(arch):
    model = tiny_model(**ARCHS[arch])
    model.set_kv_cache(2, 20)
    for block in model.transformer.h:
        cache = block.attn.kv_cache
        if block.attn.window is None:
            assert type(cache) is KVCache and cache.k.shape[2] == 20
        else:
            assert type(cache) is RingKVCache and cache.k.shape[2] == block.attn.window < 20
    model.set_kv_cache(2, 20, ring=False)
    assert all(type(b.attn.kv_cache) is KVCache and b.attn.kv_cache.k.shape[2] == 20 for b in model.transformer.h)
    model.set_kv_cache(2, 3)  # no longer than the window: a plain cache
    assert all(type(b.attn.kv_cache) is KVCache for b in model.transformer.h)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_past_the_window_equals_a_whole_cache_and_no_cache(arch):
    model = tiny_model(**ARCHS[arch])
    prompt = torch.tensor(PROMPT)
    expected = greedy_without_cache(model, prompt, 15)
    assert len(set(expected)) > 3
    assert generate(model, prompt, 15, temperature=0.0, include_prompt=False).tolist() == expected
    with torch.inference_mode():  # every decoded position's logits, against a whole-length cache
        logits = {}
        for ring in (True, False):
            model.set_kv_cache(1, len(PROMPT) + len(expected), ring=ring)
            out = [model(prompt[None], torch.arange(len(PROMPT)))[0]]
            for i, token in enumerate(expected):
                out.append(model(torch.tensor([[token]]), torch.tensor([len(PROMPT) + i]))[0])
            logits[ring] = torch.cat(out)
        model.clear_kv_cache()
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunks", [(5, 1, 3, 2), (1,) * 11, (2, 9)], ids=["mixed", "ones", "longer-than-window"])
def test_a_prompt_fed_in_chunks_gives_the_logits_of_one_forward(arch, chunks):
    model = tiny_model(**ARCHS[arch])
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        whole = model(prompt)[0]
        model.set_kv_cache(1, 16)
        start, parts = 0, []
        for n in chunks:
            parts.append(model(prompt[:, start:start + n], torch.arange(start, start + n))[0])
            start += n
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_padded_batch_past_the_window_equals_each_prompt_alone(arch):
    model = tiny_model(**ARCHS[arch])
    prompts = [[3, 14, 15, 9, 26, 5], [7], [40, 2, 33], PROMPT]
    idx, pads = _left_padded(prompts, pad_id=49)
    longest = idx.size(1)
    with torch.inference_mode():
        model.set_kv_cache(len(prompts), longest + 1)
        assert any(isinstance(b.attn.kv_cache, RingKVCache) for b in model.transformer.h)
        batched = model(idx, torch.arange(longest), pad_lengths=pads)
        step = model(torch.tensor([[1], [2], [3], [4]]), torch.tensor([longest]), pad_lengths=pads)
        model.clear_kv_cache()
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + [row + 1]]))[0]
            torch.testing.assert_close(batched[row, pads[row]:], alone[:-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[row, 0], alone[-1], rtol=1e-5, atol=1e-5)
    out = generate_batch(model, [torch.tensor(p) for p in prompts], 12, temperature=0.0, include_prompt=False)
    for prompt, tokens in zip(prompts, out):
        assert tokens.tolist() == greedy_without_cache(model, torch.tensor(prompt), 12)


@pytest.mark.parametrize("name,share", [("Mistral-7B-v0.1", 4096 / 32768), ("gemma-3-4b-it", None)])
def test_the_cache_of_a_long_context_takes_the_windows_share(name, share):
    """At 32K positions Mistral-7B-v0.1's cache (a 4096 window everywhere) takes an eighth of the whole-length
    cache's bytes; Gemma 3's (1024-token windows in five blocks of six) under a fifth."""
    config = Config.from_name(name)
    with torch.device("meta"):
        model = GPT(config)
    sizes = {}
    for ring in (True, False):
        model.set_kv_cache(1, 32768, device="meta", ring=ring)
        sizes[ring] = sum(b.attn.kv_cache.k.numel() + b.attn.kv_cache.v.numel() for b in model.transformer.h)
    if share is None:
        windowed = sum(config.sliding_window(i) is not None for i in range(config.n_layer))
        share = (config.n_layer - windowed + windowed * config.sliding_window_size / 32768) / config.n_layer
        assert share < 0.2
    assert sizes[True] / sizes[False] == pytest.approx(share)


def test_the_benchmark_runs_and_checks_both_sides_generate_alike():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/window_cache.py", "--arch", "gemma3", "--prompt", "48", "--new", "6",
                        "--window", "16", "--repeats", "1", "--threads", "1"], cwd=repo, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ratio = next(line for line in r.stdout.splitlines() if line.startswith("| ring / whole |"))
    # 5 blocks of 6 keep 16 of 54 positions
    assert ratio.rstrip(" |").endswith(f"{(1 + 5 * 16 / 54) / 6:.3f}"), r.stdout
    r = subprocess.run([sys.executable, "bench/window_cache.py", "--arch", "llama"], cwd=repo, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and r.stderr == "error: --arch 'llama': choose one of mistral, gemma3.\n"


@pytest.mark.parametrize("arch", [{}, ARCHS["gemma-like"]], ids=["llama", "gemma-like"])
def test_input_pos_maxp1_reads_only_the_written_columns_and_changes_nothing(arch):
    """`input_pos_maxp1` (litgpt's argument): attention reads the cache up to the newest token; the logits are those
    of reading all of it, for a prefill and each decoded token, alone and in a left-padded batch."""
    model = tiny_model(**arch)
    prompt, steps = torch.tensor([PROMPT]), [7, 1, 30, 2]
    with torch.inference_mode():
        out = {}
        for limited in (True, False):
            model.set_kv_cache(1, 20)
            kw = dict(input_pos_maxp1=len(PROMPT)) if limited else {}
            logits = [model(prompt, torch.arange(len(PROMPT)), **kw)[0]]
            for i, token in enumerate(steps):
                kw = dict(input_pos_maxp1=len(PROMPT) + i + 1) if limited else {}
                logits.append(model(torch.tensor([[token]]), torch.tensor([len(PROMPT) + i]), **kw)[0])
            out[limited] = torch.cat(logits)
        torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
        idx, pads = _left_padded([[3, 14, 15], PROMPT], pad_id=49)
        batched = {}
        for limited in (True, False):
            model.set_kv_cache(2, 20)
            kw = dict(input_pos_maxp1=idx.size(1)) if limited else {}
            batched[limited] = model(idx, torch.arange(idx.size(1)), pad_lengths=pads, **kw)
        torch.testing.assert_close(batched[True], batched[False], rtol=1e-5, atol=1e-5)
        caches = [b.attn.kv_cache for b in model.transformer.h if type(b.attn.kv_cache) is KVCache]
        assert caches and all(c.limit is None for c in caches)  # (set for one call only)
        for bad in (0, 21, 3.0, True):
            with pytest.raises(ValueError, match=rf"input_pos_maxp1 must be an int from 1 to the KV cache's 20 "
                                                 rf"positions, got {bad!r}\."):
                model(prompt, torch.arange(len(PROMPT)), input_pos_maxp1=bad)
        model.clear_kv_cache()
        with pytest.raises(ValueError, match="input_pos_maxp1 needs input_pos and a KV cache"):
            model(prompt, input_pos_maxp1=5)


def test_the_decode_columns_benchmark_runs_and_checks_both_sides_generate_alike():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/decode_columns.py", "--n_layer", "1", "--prompt", "8", "--new", "6",
                        "--repeats", "1", "--threads", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(line.startswith("| 6 | ") for line in r.stdout.splitlines()), r.stdout
