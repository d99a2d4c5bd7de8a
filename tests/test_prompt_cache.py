"""`PromptCache`: a conversation's KV cache kept between `generate_stream` calls, each call prefilling only what its
prompt adds to the cached tokens. Every call must give what a fresh cache gives (the logits of the prompt's last
position, and the greedy answer), for whole-length caches, sliding-window rings (every block, or alternating with
global blocks), when the cache grows past the window, when a ring can no longer go back, and after an error, an
abandoned stream or a cache someone else replaced."""

from __future__ import annotations

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.generate import PromptCache, _prefill_last_logits, generate_stream
from lit_gpt.model import KVCache, RingKVCache
import test_adapters

one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors

FAMILIES = {
    "whole": dict(),
    "window": dict(sliding_window_size=8),  # (a ring in every block once the cache exceeds 8 positions)
    "local_global": dict(sliding_window_size=24, sliding_window_indices=[1, 0, 1], rope_local_base_freq=10000.0,
                         attention_logit_softcapping=50.0, final_logit_softcapping=30.0, norm_qk=True),
}


def tiny(family: str) -> GPT:
    torch.manual_seed(0)
    config = Config(name=family, n_layer=3, n_embd=32, n_head=4, n_query_groups=2, vocab_size=64,
                    padded_vocab_size=64, block_size=256, bias=False, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", intermediate_size=48, rope_base=500, **FAMILIES[family])
    return GPT(config).eval()


def greedy(model, prompt: list[int], cache=None, n: int = 10) -> list[int]:
    return list(generate_stream(model, torch.tensor(prompt), n, temperature=0, prompt_cache=cache))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kept", [10, 9, 6])  # answer tokens the next prompt keeps: all 9 fed, one fewer, fewer
def test_every_turn_answers_as_a_fresh_cache_and_computes_only_what_it_adds(family, kept):
    model, fresh = tiny(family), tiny(family)
    cache = PromptCache(model)
    g = torch.Generator().manual_seed(1)
    conversation = torch.randint(0, 64, (5,), generator=g).tolist()
    reused, shared = [], [0]  # what each turn took from the cache, and the prefix it shares with the last one's
    for _ in range(7):
        answer = greedy(model, conversation, cache)
        assert answer == greedy(fresh, conversation)
        reused.append(cache.reused)
        assert cache.tokens == conversation + answer[:-1]  # (the last answer token was never fed)
        shared.append(len(conversation) + min(kept, 9))
        conversation = conversation + answer[:kept] + torch.randint(0, 64, (4,), generator=g).tolist()
    if kept >= 9 or family == "whole":  # every later turn takes the last one's prompt and kept answer tokens
        assert reused == shared[:-1]
    elif family == "window":  # going back 3 positions: a ring past its window cannot, so every turn is whole
        assert reused == [0] * 7
    else:  # the 24-position rings can while the conversation is shorter than their window, and not after
        assert all(r in (0, s) for r, s in zip(reused, shared))
        assert reused[1] == shared[1] and reused[-1] == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_prefill_logits_equal_a_forward_over_the_whole_prompt(family):
    model = tiny(family)
    cache = PromptCache(model)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 64, (6,), generator=g)
    for _ in range(5):
        start = cache.start(prompt.tolist(), prompt.numel() + 12)
        with torch.no_grad():
            got = _prefill_last_logits(model, prompt, prompt.device, start)
            cache.tokens = prompt.tolist()
            expected = tiny(family)(prompt[None])[0, -1]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        prompt = torch.cat((prompt, torch.randint(0, 64, (9,), generator=g)))


def test_the_cache_grows_keeping_what_it_holds_and_becomes_a_ring_past_the_window():
    model = tiny("window")
    cache = PromptCache(model)
    greedy(model, list(range(3)), cache, n=2)  # 5 positions: shorter than the window, whole caches
    assert cache.capacity == 5 and type(model.transformer.h[0].attn.kv_cache) is KVCache
    answer = greedy(model, list(range(3)) + [cache.tokens[-1]] + [7, 8, 9], cache, n=6)
    assert cache.reused == 4 and cache.capacity == 13
    ring = model.transformer.h[0].attn.kv_cache
    assert type(ring) is RingKVCache and ring.k.size(2) == 8
    assert answer == greedy(tiny("window"), list(range(3)) + [cache.tokens[3]] + [7, 8, 9], n=6)


def test_after_an_error_an_abandoned_stream_or_another_cache_it_starts_over_and_stays_right(monkeypatch):
    model, fresh = tiny("local_global"), tiny("local_global")
    cache = PromptCache(model)
    prompt = list(range(1, 12))
    assert greedy(model, prompt, cache) == greedy(fresh, prompt)

    # an abandoned stream: the tokens fed so far stay usable
    stream = generate_stream(model, torch.tensor(prompt + [3, 4]), 10, temperature=0, prompt_cache=cache)
    first = [next(stream), next(stream)]
    stream.close()
    assert cache.tokens == prompt + [3, 4] + first[:1] and not cache.writing
    longer = prompt + [3, 4] + first + [5]
    assert greedy(model, longer, cache) == greedy(fresh, longer) and cache.reused == len(prompt) + 3

    # an error inside a forward: the cache is unknown, the next call prefills from 0
    block = model.transformer.h[1]
    calls = {"n": 0}
    original = type(block).forward

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(block), "forward", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        greedy(model, longer + [6], cache)
    monkeypatch.undo()
    assert cache.writing
    assert greedy(model, longer + [6], cache) == greedy(fresh, longer + [6]) and cache.reused == 0

    # generation without the PromptCache replaces the model's cache (and frees it): the next call starts over
    greedy(model, [1, 2, 3])
    assert greedy(model, longer + [6, 7], cache) == greedy(fresh, longer + [6, 7]) and cache.reused == 0

    cache.reset()
    assert all(block.attn.kv_cache is None for block in model.transformer.h)


def test_a_ring_goes_back_only_while_it_holds_the_window_before():
    model = tiny("window")
    model.set_kv_cache(batch_size=1, max_seq_length=40)
    with torch.no_grad():
        model(torch.arange(20)[None], input_pos=torch.arange(20))  # the ring holds positions 12-19
    assert not model.rewind_kv_cache(18)  # needs 11-17: 11 is gone
    ring = model.transformer.h[0].attn.kv_cache
    assert sorted(ring.columns.tolist()) == list(range(12, 20))  # (nothing forgotten)
    assert not model.rewind_kv_cache(21)  # position 20 was never written
    assert model.rewind_kv_cache(19)  # needs 12-18
    assert sorted(ring.columns.tolist()) == [-1] + list(range(12, 19))
    assert model.rewind_kv_cache(0) and ring.empty


def test_the_benchmark_runs_and_checks_both_sides_generate_alike():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/prompt_cache.py", "--n_layer", "1", "--turns", "3", "--message", "5",
                        "--answer", "4", "--repeats", "1", "--threads", "1"], cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(line.startswith("| 3 | 23 | ") for line in r.stdout.splitlines()), r.stdout
