"""The Householder update alone: the fused CPU kernel (lit_gpt/adapters/cpu_kernel.py) against the eager path.

Times forward and forward + backward of `_BlockRankUpdate` (ETHER: one vector per block, ETHER+: two) on a
`(tokens, width)` float32 activation, the two paths interleaved, and prints medians and their ratio. The step-level
effect is `bench/adapters.py`'s `eager` rows; this isolates the update.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jsonargparse import CLI  # noqa: E402

from common import command_line, write_section  # noqa: E402
from lit_gpt.adapters import cpu_kernel  # noqa: E402
from lit_gpt.adapters.ether import _BlockRankUpdate  # noqa: E402


def main(
    tokens: int = 1024,
    width: int = 1024,
    nb: int = 32,
    repeats: int = 25,
    threads: Optional[int] = 1,
    write: bool = False,
) -> None:
    """Time the ETHER / ETHER+ activation update with and without the fused CPU kernel.

    Args:
        tokens: Rows of the activation (batch x sequence).
        width: Features per row.
        nb: Blocks per row (width / nb numbers each).
        repeats: Interleaved timings per path; medians are reported.
        threads: torch intra-op threads (the kernel uses as many); None keeps torch's choice.
        write: Replace (or add) this benchmark's section of docs/benchmarks.md with the results.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    command = command_line()
    print(f"$ {command}")
    if not cpu_kernel.available():
        print("the fused kernel could not be built here (no C compiler?): nothing to compare")
        return
    torch.manual_seed(0)
    z = torch.randn(tokens, width)
    g = torch.randn(tokens, width)
    setup = (f"{tokens} x {width} float32, nb {nb} (blocks of {width // nb}), {torch.get_num_threads()} threads, "
             f"{repeats} interleaved timings, medians; torch {torch.__version__}, {platform.machine()}")
    print(setup)
    lines = ["| update | pass | kernel ms | eager ms | eager / kernel |", "|---|---|---|---|---|"]
    print("\n".join(lines))
    for name, coefs in (("ether", (-2.0,)), ("etherplus", (-1.0, 1.0))):
        vecs = F.normalize(torch.randn(len(coefs), nb, width // nb), dim=-1).requires_grad_()

        def forward() -> None:
            with torch.no_grad():
                _BlockRankUpdate.apply(z, vecs, coefs)

        def both() -> None:
            zz = z.detach().requires_grad_()
            _BlockRankUpdate.apply(zz, vecs, coefs).backward(g)

        for label, fn in (("forward", forward), ("forward + backward", both)):
            times = {"kernel": [], "eager": []}
            for r in range(repeats + 1):
                for path in ("kernel", "eager") if r % 2 else ("eager", "kernel"):
                    with cpu_kernel.disabled() if path == "eager" else contextlib.nullcontext():
                        t0 = time.perf_counter()
                        fn()
                        if r:  # the first round warms up
                            times[path].append(time.perf_counter() - t0)
            k, e = (1e3 * statistics.median(times[p]) for p in ("kernel", "eager"))
            lines.append(f"| {name} | {label} | {k:.2f} | {e:.2f} | {e / k:.2f} |")
            print(lines[-1])
    if write:
        write_section("bench/householder_kernel.py", (
            f"## The ETHER family's update: fused CPU kernel vs eager (`bench/householder_kernel.py`)\n\n"
            f"Run on {date.today().isoformat()}: `{command}`\n\n{setup}.\n\n" + "\n".join(lines) + "\n\n"
            "The update alone (`_BlockRankUpdate`, forward with no autograd graph; forward + backward with the input "
            "and vector gradients). Its effect on a whole training step is the `eager` rows of `bench/adapters.py`."
        ))


if __name__ == "__main__":
    CLI(main, as_positional=False)
