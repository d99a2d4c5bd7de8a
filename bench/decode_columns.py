"""Decoding with `input_pos_maxp1` (attention reads the KV cache up to the newest token) against reading the whole
cache every step (what lit_gpt did before, and litgpt without the argument): tokens per second of greedy `generate`
on random weights in a named model's shape, for a short prompt and several numbers of new tokens (the cache is
prompt + new tokens long). Both sides generate the same tokens (checked); runs alternate, medians and ratios are
printed. Example:

    python bench/decode_columns.py --model_name SmolLM2-135M-Instruct --new 128,512 --threads 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import interleaved_ms, machine, patched, report_table  # noqa: E402

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.generate import generate  # noqa: E402


def main(
    model_name: str = "SmolLM2-135M-Instruct",
    n_layer: int = 0,
    prompt: int = 40,
    new: str = "128,512",
    dtype: str = "float32",
    device: str = "cpu",
    threads: int = 2,
    repeats: int = 5,
    write: bool = False,
) -> None:
    """Time greedy generation reading the cache up to the newest token, and reading all of it.

    Args:
        model_name: A named config (random weights in its shape).
        n_layer: Fewer blocks than the named model (0: all of them).
        prompt: Prompt tokens.
        new: Comma-separated numbers of new tokens.
        dtype: "float32" or "bfloat16".
        device: "cpu" or "cuda".
        threads: torch threads on the CPU.
        repeats: Interleaved runs per side; medians are printed.
        write: Record the table in docs/benchmarks.md.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Config.from_name(model_name, **({"n_layer": n_layer} if n_layer else {}))
    model = GPT(config).to(device=device, dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(0, config.vocab_size, (prompt,), device=device)

    def run(n: int, limited: bool) -> torch.Tensor:
        if limited:
            return generate(model, ids, n, temperature=0.0)
        with patched(GPT, "_limit_kv_caches", lambda self, input_pos, maxp1: None):
            return generate(model, ids, n, temperature=0.0)

    table = ["| new tokens | up to the newest: tokens/s | whole cache: tokens/s | ratio |", "|---|---|---|---|"]
    for n in (int(x) for x in new.split(",")):
        assert torch.equal(run(n, True), run(n, False)), "the two ways generated other tokens"
        ms = interleaved_ms([lambda: run(n, True), lambda: run(n, False)], repeats, device=device)
        rate = [n / (t / 1e3) for t in ms]
        table.append(f"| {n} | {rate[0]:.1f} | {rate[1]:.1f} | {rate[0] / rate[1]:.2f} |")
    setup = (f"{model_name}{f' ({n_layer} blocks)' if n_layer else ''}, random weights; a {prompt}-token prompt, "
             f"greedy; tokens/s include the prefill; {dtype} on {device}, {threads} threads; {repeats} interleaved "
             f"runs, medians; torch {torch.__version__}, {machine()}")
    report_table(f"bench/decode_columns.py {device} {dtype}",
                 "Decoding reads the KV cache up to the newest token (`bench/decode_columns.py`)", setup, table, write)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
