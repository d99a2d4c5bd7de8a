import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.generate import generate, generate_stream, sample, top_p_filter

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**kw) -> Config:
    base = dict(name="tiny", n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=50, padded_vocab_size=64,
                block_size=32, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=48)
    base.update(kw)
    return Config(**base)


GPT2_LIKE = dict(pos_embedding="learned", norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True,
                 n_query_groups=4, intermediate_size=None, tie_embeddings=True)


def tiny_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw)).eval()
    with torch.no_grad():  # larger than default-init weights, so that greedy picks are far from ties
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)
    return model


def greedy_without_cache(model: GPT, prompt: torch.Tensor, n: int) -> list[int]:
    seq = prompt.tolist()
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[prompt.numel():]


@pytest.mark.parametrize("kw", [{}, GPT2_LIKE], ids=["llama", "gpt2"])
def test_kv_cache_generation_equals_full_recomputation(kw):
    model = tiny_model(**kw)
    prompt = torch.tensor([3, 14, 15, 9, 26, 5])
    expected = greedy_without_cache(model, prompt, 12)
    out = generate(model, prompt, 12, temperature=0.0)
    assert out[: prompt.numel()].tolist() == prompt.tolist()
    assert out[prompt.numel():].tolist() == expected
    assert len(set(expected)) > 2  # a degenerate repetition would hide position bugs
    assert model.transformer.h[0].attn.kv_cache is None  # freed: the model can train again


def test_top_k_1_is_greedy_at_any_temperature():
    model = tiny_model(1)
    prompt = torch.tensor([1, 2, 3])
    greedy = generate(model, prompt, 10, temperature=0.0)
    for temperature in (0.5, 1.0, 5.0):
        assert torch.equal(generate(model, prompt, 10, temperature=temperature, top_k=1), greedy)


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.3) == {1}  # the most likely token alone already holds 0.5
    assert kept(0.7) == {1, 3}
    assert kept(0.84) == {1, 3, 2}
    assert kept(0.96) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    # sampling stays inside the nucleus and renormalises it: 0.5 / 0.8 and 0.3 / 0.8
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, top_p=0.7, generator=g) for _ in range(4000)])
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.625) < 0.03


@pytest.mark.slow
def test_top_p_matches_transformers_warper():
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        ref = logits_process.TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(torch.isfinite(top_p_filter(logits, p)), torch.isfinite(ref))


def test_sampling_follows_the_tempered_softmax():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    g = torch.Generator().manual_seed(0)
    for temperature in (0.7, 2.0):
        draws = sample(logits.expand(20000, 4), temperature, generator=g)
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        torch.testing.assert_close(freq, torch.softmax(logits / temperature, -1), atol=0.015, rtol=0)
    draws = sample(logits.expand(5000, 4), 1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {0, 1}


def first_occurrence(seq: list[int], pattern: list[int]) -> int:
    return next(i for i in range(len(seq)) if seq[i:i + len(pattern)] == pattern)


def test_stop_sequences_and_eos_end_generation_without_being_returned():
    model = tiny_model(2)
    prompt = torch.tensor([7, 8, 9])
    free = generate(model, prompt, 16, temperature=0.0, include_prompt=False).tolist()
    assert len(free) == 16

    def run(**kw):
        out = generate(model, prompt, 16, temperature=0.0, include_prompt=False, **kw).tolist()
        assert list(generate_stream(model, prompt, 16, temperature=0.0, **kw)) == out
        return out

    # EOS (an int or a list of ids) stops at its first occurrence
    assert run(eos_id=free[4]) == free[: free.index(free[4])]
    assert run(eos_id=[999, free[6]]) == free[: free.index(free[6])]
    # a two-token stop sequence
    pair = free[5:7]
    assert run(stop_tokens=[pair]) == free[: first_occurrence(free, pair)]
    # a sequence whose first token occurs but whose second never follows: held-back tokens come out in full
    assert run(stop_tokens=[(free[3], 10_000)]) == free
    # the stop sequence may begin in the very first generated token
    assert run(stop_tokens=[free[:3]]) == []


def test_stream_is_held_back_only_while_a_stop_sequence_may_be_starting():
    model = tiny_model(2)
    prompt = torch.tensor([7, 8, 9])
    free = generate(model, prompt, 16, temperature=0.0, include_prompt=False).tolist()
    assert free[2] not in free[:2]
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    calls_at_yield = []
    for token in generate_stream(model, prompt, 5, temperature=0.0, stop_tokens=[(free[2], 10_000)]):
        calls_at_yield.append(len(forwards))
    # token i is sampled from the logits of forward i + 1 and normally comes out before the next forward; free[2]
    # could start the stop sequence, so it waits until free[3] shows that it does not
    assert calls_at_yield == [1, 2, 4, 4, 5]


def test_streaming_yields_what_generate_returns_when_sampling():
    model = tiny_model(3)
    prompt = torch.tensor([4, 5])
    kw = dict(temperature=1.3, top_k=20, top_p=0.9)
    streamed = list(generate_stream(model, prompt, 12, generator=torch.Generator().manual_seed(7), **kw))
    returned = generate(model, prompt, 12, generator=torch.Generator().manual_seed(7), include_prompt=False, **kw)
    assert streamed == returned.tolist() and len(streamed) == 12


def test_max_new_tokens_is_capped_by_block_size():
    model = tiny_model(4, block_size=16)
    prompt = torch.arange(1, 11)
    out = generate(model, prompt, 50, temperature=0.0)
    assert out.numel() == 16
    assert out[10:].tolist() == greedy_without_cache(model, prompt, 6)
    with pytest.raises(ValueError, match="block_size 16 leaves no room"):
        generate(model, torch.arange(16), 4)
    with pytest.raises(ValueError, match="1-D prompt"):
        generate(model, prompt[None], 4)
    assert generate(model, prompt, 0).tolist() == prompt.tolist()


def test_bad_sampling_arguments_are_clear_errors():
    logits = torch.zeros(5)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample(logits, 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be"):
        sample(logits, 1.0, top_k=0)
    with pytest.raises(ValueError, match="temperature must be"):
        sample(logits, -1.0)


def write_tiny_checkpoint(folder: Path) -> GPT:
    """A tiny random model with a byte-level BPE tokenizer (EOS `<eos>`, no BOS) saved as a lit checkpoint in
    `folder`; returns the model."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lit_gpt.utils import save_model_weights

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the llama eats grass and hay in the field"] * 5, trainer=trainer)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "add_bos_token": False}))
    vocab = hf.get_vocab_size()
    model = tiny_model(5, vocab_size=vocab, padded_vocab_size=vocab, block_size=256)
    model.config.save(folder)
    save_model_weights(model, folder)
    return model


@pytest.mark.slow
def test_generate_script_streams_the_greedy_answer(tmp_path):
    """scripts/generate.py on a tiny checkpoint: stdout is the decoded greedy continuation, tokens/s on stderr."""
    from lit_gpt.tokenizer import Tokenizer

    model = write_tiny_checkpoint(tmp_path)
    tok = Tokenizer(tmp_path)
    prompt = "the llama eats"
    expected = generate(model, tok.encode(prompt), 10, temperature=0.0, eos_id=tok.stop_ids, include_prompt=False)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "generate.py"), "--checkpoint_dir", str(tmp_path),
         "--prompt", prompt, "--max_new_tokens", "10", "--temperature", "0"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == tok.decode(expected) + "\n"
    assert "tokens/s" in result.stderr

    # a merged fine-tune's prompt_style.yaml formats the prompt as the model was trained
    from lit_gpt.data.prompts import prompt_style_from_name

    (tmp_path / "prompt_style.yaml").write_text("prompt_style: alpaca\n")
    formatted = tok.encode(prompt_style_from_name("alpaca").apply(prompt))
    expected = generate(model, formatted, 10, temperature=0.0, eos_id=tok.stop_ids, include_prompt=False)
    run = lambda *flags: subprocess.run(  # noqa: E731
        [sys.executable, str(REPO_ROOT / "scripts" / "generate.py"), "--checkpoint_dir", str(tmp_path),
         "--prompt", prompt, "--max_new_tokens", "10", "--temperature", "0", *flags],
        capture_output=True, text=True, cwd=tmp_path,
    )
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout == tok.decode(expected) + "\n"
    assert f"prompt of {formatted.numel()} tokens" in result.stderr
    for flags, message in [(("--max_new_tokens", "0"), "--max_new_tokens must be at least 1"),
                           (("--chat_template", "false", "--system_prompt", "be brief"), "--system_prompt needs"),
                           (("--system_prompt", "be brief"), "--system_prompt cannot be used with the 'alpaca'"),
                           (("--prompt", "caf\udce9"), "--prompt is not valid UTF-8 (byte 0xe9 at character 3")]:
        result = run(*flags)
        assert result.returncode == 1 and result.stderr.startswith("error: " + message), result.stderr
    # the precision flag chat/base.py and eval take; the greedy answer is the same
    result = run("--precision", "32-true")
    assert result.returncode == 0 and result.stdout == tok.decode(expected) + "\n", result.stderr
    assert "cpu, float32" in result.stderr
    # a reader that closes the pipe early (`| head -c 3`) ends the script quietly
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "generate.py"), "--checkpoint_dir", str(tmp_path),
         "--prompt", prompt, "--max_new_tokens", "200", "--temperature", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    proc.stdout.read(1)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err, err


def test_model_trains_after_generating():
    """Generation runs under inference_mode; nothing it caches on the model (KV cache, RoPE tables) may leak into
    a later training step."""
    model = tiny_model(6)
    generate(model, torch.tensor([1, 2, 3]), 5, temperature=0.0)
    model.train()
    x = torch.randint(0, 50, (2, 12))
    model(x, labels=x).backward()
    assert model.transformer.wte.weight.grad is not None


def _load_generate_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_script", REPO_ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_num_samples_prints_that_many_seeded_answers(tmp_path, capsys):
    """--num_samples N: N answers from one seeded generator, the first the same as --num_samples 1 gives, all of
    them again for the same seed; with greedy decoding they are identical (and a note says so)."""
    import re

    write_tiny_checkpoint(tmp_path)
    script = _load_generate_script()
    settings = dict(checkpoint_dir=tmp_path, prompt="the llama eats", max_new_tokens=12, temperature=1.5,
                    top_k=None, device="cpu", seed=42)

    def run(**kw) -> tuple[str, str]:
        script.main(**{**settings, **kw})
        captured = capsys.readouterr()
        return captured.out, captured.err

    def split(out: str, n: int) -> list[str]:
        parts = re.split(r"(?:^|\n\n)--- sample (\d+) of (\d+) ---\n", out)
        assert parts[0] == "" and len(parts) == 1 + 3 * n, out
        assert [(int(i), int(total)) for i, total in zip(parts[1::3], parts[2::3])] == [(i, n) for i in range(1, n + 1)]
        return [answer.removesuffix("\n") for answer in parts[3::3]]

    one, err = run()
    assert "--- sample" not in one and err.count("tokens/s") == 1
    out, err = run(num_samples=3)
    samples = split(out, 3)
    assert samples[0] + "\n" == one  # the same first draws
    assert len(set(samples)) == 3 and all(samples)  # one generator, seeded once: the draws go on
    assert err.count("tokens/s") == 3 and "greedy" not in err
    # the samples after the first prefill only the prompt's last token (`PromptCache`)
    prompt_tokens = int(re.search(r"prompt of (\d+) tokens", err)[1])
    assert re.findall(r"(\d+) of them cached", err) == ["0"] + [str(prompt_tokens - 1)] * 2
    assert run(num_samples=3)[0] == out  # reproducible
    assert run(num_samples=3, seed=43)[0] != out

    out, err = run(num_samples=2, temperature=0.0)
    greedy = split(out, 2)
    assert greedy[0] == greedy[1] and err.count("greedy decoding") == 1
    with pytest.raises(ValueError, match=r"^--num_samples must be at least 1, got 0\.$"):
        run(num_samples=0)
