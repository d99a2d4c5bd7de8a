"""Two settings of one adapter configuration, step against step: which is faster in a whole training step.

A setting is a class or module attribute of `lit_gpt` given as `module:Name.attr=value` (a Python literal), e.g.
`lit_gpt.adapters.ether:HouseholderTransform.merge_output_spans=False`; "-" leaves everything as it is. Each round
times a frozen floor step, A, a floor step, B, a floor step (the order of A and B alternates between rounds, since
the step after a floor step runs in a different cache and allocator state than the one after an adapted step), and
divides each adapted step by the mean of the floor steps around it. Prints the median ratios and their spread.
Example (the Llama shape of `bench/adapters.py`):

    python bench/ab_step.py --method etherplusHH --a - \\
        --b lit_gpt.adapters.ether:HouseholderTransform.merge_output_spans=False --rounds 9
"""

from __future__ import annotations

import ast
import importlib
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from adapters import llama_config, lit_model, make_step  # noqa: E402
from common import patched  # noqa: E402
from lit_gpt import GPT  # noqa: E402
from lit_gpt.adapters import AdapterConfig, apply_adapters  # noqa: E402


@contextmanager
def setting(spec: str):
    """Set `module:Name.attr=value` for the duration of the block ("-": nothing)."""
    if spec == "-":
        yield
        return
    try:
        target, value = spec.split("=", 1)
        module, path = target.split(":", 1)
        *owners, attr = path.split(".")
        obj = importlib.import_module(module)
        for name in owners:
            obj = getattr(obj, name)
        getattr(obj, attr)
    except (ValueError, ImportError, AttributeError) as e:
        raise SystemExit(f"--a/--b {spec!r}: expected module:Name.attr=value naming an existing attribute ({e}).")
    with patched(obj, attr, ast.literal_eval(value)):
        yield


def main(
    a: str = "-",
    b: str = "-",
    method: str = "etherplusHH",
    targets: str = "all-linear",
    nb: int = 32,
    block_size: int = 32,
    r: int = 8,
    shape: str = "small",
    n_layer: int = 4,
    seq_len: int = 256,
    batch_size: int = 4,
    rounds: int = 9,
    threads: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    """Step time of setting A and of setting B, each divided by the floor's (the same model, no adapter): medians.

    Args:
        a: Setting A, `module:Name.attr=value` or "-".
        b: Setting B, likewise.
        method: Adapter method (`ether`, `etherplus`, `etherplusHH`, `oft`, `lora`).
        targets: Comma-separated adapter targets.
        nb: Blocks per transform (ETHER family).
        block_size: OFT block size.
        r: LoRA rank.
        shape: A shape of `bench/adapters.py` ("small", "llama2-7b", "smollm2-135m", "tiny").
        n_layer: Layers.
        seq_len: Tokens per sequence.
        batch_size: Sequences per step.
        rounds: Rounds (each times A and B once).
        threads: torch threads.
        device: "cpu" or "cuda".
        dtype: "float32" or "bfloat16" (weights and activations).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = llama_config(shape, n_layer, seq_len)
    with torch.device(device):
        state = GPT(config).to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]).state_dict()
    kw = {"oft": dict(block_size=block_size), "lora": dict(r=r, alpha=2 * r)}.get(method, dict(nb=nb))
    cfg = AdapterConfig(method=method, targets=targets.split(","), **kw)
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    steps = {"floor": make_step(lit_model(config, state, device), False, x, y, device)}
    for name in ("A", "B"):  # make_step waits for the device at the end of a step
        steps[name] = make_step(apply_adapters(lit_model(config, state, device), cfg).to(device), False, x, y, device)
    specs = {"floor": "-", "A": a, "B": b}

    def timed(name: str) -> float:
        with setting(specs[name]):
            t0 = time.perf_counter()
            steps[name]()
            return time.perf_counter() - t0

    for name in steps:  # warm-up
        timed(name)
        timed(name)
    ratios: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(rounds):
        before = timed("floor")
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            t = timed(name)
            after = timed("floor")
            ratios[name].append(t / ((before + after) / 2))
            before = after
    print(f"{method} on {targets}, {shape} shape, {n_layer} layers, {batch_size} x {seq_len} tokens, "
          f"{dtype} on {device}, {threads} threads; {rounds} rounds; torch {torch.__version__}")
    print("| setting | step / floor (median) | min | max |")
    print("|---|---|---|---|")
    for name, spec in (("A", a), ("B", b)):
        v = ratios[name]
        print(f"| {name}: `{spec}` | {statistics.median(v):.4f} | {min(v):.4f} | {max(v):.4f} |")


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
