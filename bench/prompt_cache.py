"""A multi-turn conversation with the KV cache kept between turns (`PromptCache`, what chat/base.py does) against a
fresh cache every turn (what it did before, and what litgpt's chat does): the time to the first token of each turn,
whose prompt is the whole conversation so far, and the time of the whole conversation.

Random weights in a named model's shape; each turn adds a user message of `--message` random tokens, and the answer
is `--answer` greedy tokens (no end of turn), so both sides generate the same tokens (checked). Whole conversations
alternate between the two sides; medians and ratios (kept / fresh) are printed. Example:

    python bench/prompt_cache.py --model_name SmolLM2-135M-Instruct --turns 6 --threads 2
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import machine, report_table, sync  # noqa: E402

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.generate import PromptCache, generate_stream  # noqa: E402


def main(
    model_name: str = "SmolLM2-135M-Instruct",
    n_layer: int = 0,
    turns: int = 6,
    message: int = 60,
    answer: int = 40,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int = 2,
    repeats: int = 5,
    write: bool = False,
) -> None:
    """Time a conversation's turns with the KV cache kept between them, and with a fresh one each turn.

    Args:
        model_name: A named config (random weights in its shape).
        n_layer: Fewer blocks than the named model (0: all of them).
        turns: Turns of the conversation.
        message: Tokens of each user message.
        answer: Tokens of each answer.
        dtype: "float32" or "bfloat16".
        device: "cpu" or "cuda".
        threads: torch threads on the CPU.
        repeats: Interleaved conversations per side; medians are printed.
        write: Record the table in docs/benchmarks.md.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Config.from_name(model_name, **({"n_layer": n_layer} if n_layer else {}))
    model = GPT(config).to(device=device, dtype=getattr(torch, dtype)).eval()
    messages = [torch.randint(0, config.vocab_size, (message,), device=device) for _ in range(turns)]

    def conversation(kept: bool) -> tuple[list[float], float, list[list[int]]]:
        """Each turn's time to first token (ms), the whole conversation's time (ms), and the answers."""
        cache = PromptCache(model) if kept else None
        history = torch.empty(0, dtype=torch.long, device=device)
        firsts, answers = [], []
        sync(device)
        start = time.perf_counter()
        for m in messages:
            prompt = torch.cat((history, m))
            t0 = time.perf_counter()
            tokens = []
            for token in generate_stream(model, prompt, answer, temperature=0.0, prompt_cache=cache):
                if not tokens:
                    sync(device)
                    firsts.append((time.perf_counter() - t0) * 1e3)
                tokens.append(token)
            answers.append(tokens)
            history = torch.cat((prompt, torch.tensor(tokens, dtype=torch.long, device=device)))
        sync(device)
        total = (time.perf_counter() - start) * 1e3
        if cache is not None:
            cache.reset()
        return firsts, total, answers

    kept_runs, fresh_runs = [conversation(True)], [conversation(False)]  # (warm-up)
    assert kept_runs[0][2] == fresh_runs[0][2], "the two ways generated other tokens"
    kept_runs, fresh_runs = [], []
    for _ in range(repeats):
        kept_runs.append(conversation(True))
        fresh_runs.append(conversation(False))

    def median_turn(runs, i: int) -> float:
        return statistics.median(r[0][i] for r in runs)

    table = ["| turn | prompt tokens | fresh cache: first token (ms) | kept cache: first token (ms) | ratio |",
             "|---|---|---|---|---|"]
    for i in range(turns):
        fresh, kept = median_turn(fresh_runs, i), median_turn(kept_runs, i)
        table.append(f"| {i + 1} | {(i + 1) * message + i * answer} | {fresh:.1f} | {kept:.1f} | "
                     f"{kept / fresh:.2f} |")
    fresh_total = statistics.median(r[1] for r in fresh_runs)
    kept_total = statistics.median(r[1] for r in kept_runs)
    table.append(f"| whole conversation | | {fresh_total:.0f} | {kept_total:.0f} | {kept_total / fresh_total:.2f} |")
    setup = (f"{model_name}{f' ({n_layer} blocks)' if n_layer else ''}, random weights; {turns} turns of a "
             f"{message}-token message and a {answer}-token greedy answer; {dtype} on {device}, {threads} threads; "
             f"{repeats} interleaved conversations, medians; torch {torch.__version__}, {machine()}")
    report_table(f"bench/prompt_cache.py {device} {dtype}",
                 "Chat keeps the KV cache between turns (`bench/prompt_cache.py`)", setup, table, write)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
