"""ETHER+HH's output side on a fused QKV output, on the CPU kernel: one strided pass per span (query, key, value
rows, each a column slice of the output) against one pass over whole rows with the spans' blocks side by side (what
`HouseholderTransform.linear_groups` runs when the spans have one block size).

Times the forward update (in place) and the backward (`OutputRows`: the input made from the kept output), the two
forms interleaved, and prints medians and their ratio (above 1: the single pass is faster). Example:

    python bench/output_spans.py --threads 1 --tokens 1024 --width 1024
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import interleaved_ms  # noqa: E402  (also puts the repository on the path)
from lit_gpt.adapters import cpu_kernel  # noqa: E402
from lit_gpt.adapters.ether import ETHERPLUS_COEFS  # noqa: E402


def main(tokens: int = 1024, width: int = 1024, nb: int = 32, threads: int = 1, repeats: int = 25) -> None:
    """Time ETHER+HH's output side on a fused QKV output: ms per call, one pass per span vs whole rows.

    Args:
        tokens: Rows of the activation (micro-batch x sequence).
        width: Rows of each of the three spans (the QKV output is `3 * width` wide, no GQA).
        nb: Blocks per span.
        threads: torch threads (the kernel uses as many).
        repeats: Interleaved timings per form; medians are printed.
    """
    if not cpu_kernel.available():
        print("needs the CPU kernel (a C compiler)")
        return
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    coefs, k = ETHERPLUS_COEFS, width // nb
    y, g = torch.randn(tokens, 3 * width), torch.randn(tokens, 3 * width)
    gy = torch.empty_like(g)
    vecs = [F.normalize(torch.randn(len(coefs), nb, k), dim=-1) for _ in range(3)]
    merged = torch.cat(vecs, dim=1)
    spans = [slice(i * width, (i + 1) * width) for i in range(3)]
    cs = [cpu_kernel.forward(y[:, s], v, coefs)[1] for s, v in zip(spans, vecs)]
    c_all = cpu_kernel.forward(y, merged, coefs)[1]

    def fwd_spans():
        for s, v in zip(spans, vecs):
            cpu_kernel.forward(y[:, s], v, coefs, out=y[:, s])

    def fwd_rows():
        cpu_kernel.forward(y, merged, coefs, out=y)

    def bwd_spans():
        for s, v, c in zip(spans, vecs, cs):
            cpu_kernel.backward(g[:, s], cpu_kernel.OutputRows(y[:, s], None), v, coefs, c, gy[:, s], True)

    def bwd_rows():
        cpu_kernel.backward(g, cpu_kernel.OutputRows(y, None), merged, coefs, c_all, gy, True)

    print(f"{tokens} tokens, 3 spans of {width} rows, nb {nb}, ETHER+ vectors, float32, {threads} threads; "
          f"{repeats} interleaved timings, median ms; torch {torch.__version__}")
    print("| pass | one per span ms | whole rows ms | spans / rows |")
    print("|---|---|---|---|")
    for name, a, b in (("forward", fwd_spans, fwd_rows), ("backward", bwd_spans, bwd_rows)):
        ma, mb = interleaved_ms([a, b], repeats)
        print(f"| {name} | {ma:.3f} | {mb:.3f} | {ma / mb:.2f} |")


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    run_cli(main)
