"""Benchmark lit_gpt's GPT against transformers' LlamaForCausalLM on the same random Llama (CPU by default), or
against Gemma2ForCausalLM / Gemma3ForCausalLM / MixtralForCausalLM on a random Gemma 2 / Gemma 3 / Mixtral of the
same sizes (`--model_type`).

Measures a training step (forward + backward) and greedy generation (ours `lit_gpt.generate.generate` with its KV
cache, theirs `model.generate(do_sample=False)`), with identical weights, prompt and number of new tokens. A and B
runs are interleaved (the order alternates each round) so that drift in machine load hits both alike; the medians
and the ratio ours/theirs are printed (below 1 means ours is faster); `--write_docs true` also writes them to
docs/benchmarks.md.
"""

import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import command_line, write_section  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lit_gpt import GPT  # noqa: E402
from lit_gpt.convert_hf import config_from_hf, hf_to_lit_state_dict  # noqa: E402
from lit_gpt.generate import generate  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def interleaved(ours: Callable[[], None], theirs: Callable[[], None], repeats: int) -> dict[str, list[float]]:
    """Wall-clock and process CPU seconds of each run. On a shared machine the CPU time is the steadier number:
    it does not count the time another process held the core."""
    ours(), theirs()  # warm-up: allocator, kernels, lazy initialisation
    times: dict[str, list[float]] = {"wall_ours": [], "wall_theirs": [], "cpu_ours": [], "cpu_theirs": []}
    for r in range(repeats):
        pair = ((ours, "ours"), (theirs, "theirs"))
        for fn, side in pair if r % 2 == 0 else pair[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[f"cpu_{side}"].append(time.process_time() - cpu)
            times[f"wall_{side}"].append(time.perf_counter() - wall)
    return times


def main(
    n_layer: int = 4,
    n_embd: int = 768,
    n_head: int = 12,
    n_query_groups: int = 4,
    intermediate_size: int = 2048,
    vocab_size: int = 32000,
    batch_size: int = 2,
    seq_len: int = 256,
    prompt_len: int = 32,
    new_tokens: int = 64,
    repeats: int = 5,
    threads: Optional[int] = None,
    device: str = "cpu",
    model_type: str = "llama",
    write_docs: bool = False,
) -> None:
    """Time our GPT against transformers' LlamaForCausalLM on one random Llama config.

    Args:
        n_layer: Transformer blocks.
        n_embd: Model width.
        n_head: Attention heads.
        n_query_groups: Key/value heads (grouped-query attention when fewer than n_head).
        intermediate_size: Gated MLP's hidden size.
        vocab_size: Vocabulary size.
        batch_size: Sequences per training step.
        seq_len: Tokens per sequence in the training step.
        prompt_len: Prompt tokens for generation.
        new_tokens: Tokens generated per run (both sides generate exactly this many).
        repeats: Timed runs per side and measurement (after one warm-up each).
        threads: torch intra-op threads (default: torch's choice).
        device: "cpu" or "cuda".
        model_type: "llama", or "gemma2" / "gemma3_text" for transformers' Gemma 2 / Gemma 3 (soft-capped
            attention, norms after attention and MLP, sliding windows of transformers' default size), or "mixtral"
            (Mixtral's mixture of experts: 8 experts of intermediate_size, 2 per token).
        write_docs: Replace (or add) this benchmark's section of docs/benchmarks.md with the results.
    """
    import transformers

    if threads is not None:
        torch.set_num_threads(threads)
    command = command_line()
    print(f"$ {command}")
    torch.manual_seed(0)
    if model_type not in ("llama", "gemma2", "gemma3_text", "mixtral"):
        raise ValueError(f"--model_type {model_type!r}: choose llama, gemma2, gemma3_text or mixtral.")
    sizes = dict(
        vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=intermediate_size, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_query_groups, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if model_type in ("gemma2", "gemma3_text"):  # (Gemma's default head_dim is 256 whatever the width)
        sizes.update(head_dim=n_embd // n_head)
    if model_type == "mixtral":
        sizes.update(num_local_experts=8, num_experts_per_tok=2)
    hf_config = transformers.AutoConfig.for_model(model_type, **sizes)
    # SDPA where transformers has it for the family (its Gemma 2 has only eager attention, for the soft cap)
    attention = "eager" if model_type == "gemma2" else "sdpa"
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention).to(device)
    family = type(theirs).__name__
    config = config_from_hf(hf_config.to_dict(), name=f"bench-{model_type}")
    ours = GPT(config).to(device)
    ours.load_state_dict(hf_to_lit_state_dict(theirs.state_dict(), config), strict=False)
    ours.tie_weights()

    x = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
    with torch.no_grad():
        ours.eval(), theirs.eval()
        diff = (ours(x[:1]) - theirs(x[:1]).logits).abs().max().item()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def train_step(model: torch.nn.Module, hf: bool) -> Callable[[], None]:
        def step() -> None:
            logits = model(x).logits if hf else model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
            loss.backward()
            model.zero_grad(set_to_none=True)
            sync()
        return step

    ours.train(), theirs.train()
    train = interleaved(train_step(ours, False), train_step(theirs, True), repeats)

    prompt = torch.randint(0, vocab_size, (prompt_len,), device=device)
    outputs = {}

    def gen_ours() -> None:
        outputs["ours"] = generate(ours, prompt, new_tokens, temperature=0.0, include_prompt=False)
        sync()

    def gen_theirs() -> None:
        out = theirs.generate(prompt[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        outputs["theirs"] = out[0, prompt_len:]
        sync()

    ours.eval(), theirs.eval()
    gen = interleaved(gen_ours, gen_theirs, repeats)
    same_tokens = torch.equal(outputs["ours"], outputs["theirs"])

    med = statistics.median
    rows = []
    for clock in ("wall", "cpu"):
        rows.append((f"train step (fwd+bwd), {clock} s", med(train[f"{clock}_ours"]), med(train[f"{clock}_theirs"])))
    for clock in ("wall", "cpu"):
        rows.append((f"greedy generation, tokens per {clock} s", new_tokens / med(gen[f"{clock}_ours"]),
                     new_tokens / med(gen[f"{clock}_theirs"])))
    threads_used = torch.get_num_threads()
    mlp = f"{intermediate_size}" + (" x 8 experts, 2 per token" if model_type == "mixtral" else "")
    setup = (
        f"{family} config: {n_layer} layers, width {n_embd}, {n_head} heads / {n_query_groups} KV heads, MLP "
        f"{mlp}, vocab {vocab_size}; train batch {batch_size}x{seq_len}; generation {prompt_len} prompt "
        f"+ {new_tokens} new tokens; {repeats} interleaved runs after a warm-up; {device}, {threads_used} threads"
    )
    env = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs visible (shared with other jobs)"
    )
    print(setup)
    print(env)
    print(f"max |logit difference| ours vs theirs: {diff:.2e}; same greedy tokens: {same_tokens}")
    print(f"{'measurement (median)':40} {'ours':>10} {'transformers':>13} {'ratio ours/theirs':>18}")
    for name, a, b in rows:
        print(f"{name:40} {a:10.3f} {b:13.3f} {a / b:18.3f}")
    print("(time: ratio < 1 means ours is faster; tokens/s: ratio > 1 means ours is faster)")

    if write_docs:
        table = "\n".join(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.3f} |" for name, a, b in rows)
        section = (
            f"## GPT vs transformers {family} (`bench/model.py`)\n\n"
            f"Run on {date.today().isoformat()}: `{command}`\n\n{setup}. {env}.\n\n"
            "| measurement (median) | ours | transformers | ours / transformers |\n|---|---|---|---|\n"
            f"{table}\n\nSame weights on both sides: max |logit difference| {diff:.2e}, identical greedy tokens: "
            f"{same_tokens}. Time ratio < 1 and tokens/s ratio > 1 mean ours is faster.\n\n"
            "On a machine shared with other jobs, wall-clock medians move by tens of percent between runs; the "
            "CPU-time rows (process time, which does not count the time another process held the core) are the "
            "steadier comparison, and `--threads 1` keeps a busy second core from stalling every parallel kernel. "
            "Under `torch.profiler` (a one-off profile of 2026-11-22, not recorded here) both models spent ~88% of a "
            "training step in `aten::mm` (ours issues fewer, larger matmuls: one fused QKV projection instead of "
            "three).\n"
        )
        write_section("bench/model.py" + ("" if model_type == "llama" else f" {model_type}"), section)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
