"""The small products of LoRA's backward, taken two ways: as written (`gs B`, `gsᵀ C`) and transposed
(`(Bᵀ gsᵀ)ᵀ`, `(Cᵀ gs)ᵀ`), the form `_LoRALinear` and `_AddSliceProducts` use.

`gs` is the output gradient of one adapted span (a column slice of a fused QKV gradient, or a whole layer's), `B`
the span's `(out, r)` factor and `C = x Aᵀ` the `(tokens, r)` product kept from forward. Both forms do the same
multiply-adds; CPU BLAS libraries pick very different code for a tall and narrow result than for a short and wide
one. Interleaved timings, medians, and the ratio as written / transposed (above 1: the transposed form is faster).
Example:

    python bench/lora_shapes.py --threads 1 --tokens 1024
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import interleaved_ms  # noqa: E402  (also puts the repository on the path)


def main(
    tokens: int = 1024,
    r: int = 8,
    device: str = "cpu",
    threads: int = 1,
    calls: int = 5,
    repeats: int = 21,
) -> None:
    """Time LoRA's small backward products as written and transposed: ms per product for a few span shapes.

    Args:
        tokens: Rows of the activation (micro-batch x sequence).
        r: LoRA rank.
        device: "cpu" or "cuda".
        threads: torch threads on the CPU.
        calls: Calls per timing.
        repeats: Interleaved rounds; medians are printed.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    # (label, width of the whole gradient, span within it)
    spans = [
        ("qkv 3072, value span 1024", 3072, (2048, 3072)),
        ("layer 1024", 1024, (0, 1024)),
        ("layer 2752", 2752, (0, 2752)),
        ("layer 4096", 4096, (0, 4096)),
    ]
    print(f"{tokens} tokens, r {r}, float32 on {device}, {threads} threads; {repeats} interleaved rounds of "
          f"{calls} calls, median ms per call; torch {torch.__version__}")
    print("| span | product | as written ms | transposed ms | written / transposed |")
    print("|---|---|---|---|---|")
    for label, width, (lo, hi) in spans:
        g2 = torch.randn(tokens, width, device=dev)
        gs = g2[:, lo:hi]
        B = torch.randn(hi - lo, r, device=dev)
        C = torch.randn(tokens, r, device=dev)
        pairs = {
            "gC = gs B": (lambda: gs @ B, lambda: (B.t() @ gs.t()).t()),
            "gB = gsᵀ C": (lambda: gs.t() @ C, lambda: (C.t() @ gs).t()),
        }
        for name, (a, b) in pairs.items():
            torch.testing.assert_close(a(), b(), rtol=1e-4, atol=1e-3)
            ma, mb = interleaved_ms([a, b], repeats, calls, device)
            print(f"| {label} | {name} | {ma:.3f} | {mb:.3f} | {ma / mb:.2f} |")


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
