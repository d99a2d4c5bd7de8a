"""The Householder update alone: the fused kernel (C on the CPU, `cpu_kernel.py`; Triton on a GPU, `gpu_kernel.py`)
against the eager path.

Times forward and forward + backward of `_BlockRankUpdate` (ETHER: one vector per block, ETHER+: two) on a
`(tokens, width)` activation, the two paths interleaved, and prints medians, their ratio and the kernel's effective
bandwidth (the fewest bytes the update must move: forward reads and writes the activation once; backward reads
the gradient and the kept input and writes the input gradient). The step-level effect is `bench/adapters.py`'s
`eager` rows; this isolates the update. On a GPU: `--device cuda --dtype bfloat16 --tokens 4096 --width 4096`.
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

from common import command_line, sync, write_section  # noqa: E402
from lit_gpt.adapters import cpu_kernel, gpu_kernel  # noqa: E402
from lit_gpt.adapters.ether import _BlockRankUpdate  # noqa: E402


def main(
    tokens: int = 1024,
    width: int = 1024,
    nb: int = 32,
    repeats: int = 25,
    threads: Optional[int] = 1,
    device: str = "cpu",
    dtype: str = "float32",
    write: bool = False,
) -> None:
    """Time the ETHER / ETHER+ activation update with and without the fused kernel.

    Args:
        tokens: Rows of the activation (batch x sequence).
        width: Features per row.
        nb: Blocks per row (width / nb numbers each).
        repeats: Interleaved timings per path; medians are reported.
        threads: torch intra-op threads (the CPU kernel uses as many); None keeps torch's choice.
        device: "cpu" or "cuda".
        dtype: "float32" (or "float64" on the CPU, "bfloat16" on a GPU).
        write: Replace (or add) this benchmark's section of docs/benchmarks.md with the results.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    command = command_line()
    print(f"$ {command}")
    kernel = cpu_kernel if device == "cpu" else gpu_kernel
    if not kernel.available():
        print("the fused kernel is not available here (no C compiler, or no Triton): nothing to compare")
        return
    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    z = torch.randn(tokens, width, device=device, dtype=torch_dtype)
    g = torch.randn(tokens, width, device=device, dtype=torch_dtype)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    setup = (f"{tokens} x {width} {dtype} on {device}, nb {nb} (blocks of {width // nb}), {where}, "
             f"{repeats} interleaved timings, medians; torch {torch.__version__}, {platform.machine()}")
    print(setup)
    inner = 10 if device.startswith("cuda") else 1  # GPU calls are queued back to back, then synchronised once
    act = z.numel() * z.element_size()
    moved = {"forward": 2 * act, "forward + backward": 5 * act}
    lines = ["| update | pass | kernel ms | eager ms | eager / kernel | kernel GB/s |", "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for name, coefs in (("ether", (-2.0,)), ("etherplus", (-1.0, 1.0))):
        vecs = F.normalize(torch.randn(len(coefs), nb, width // nb, device=device), dim=-1)
        vecs = vecs.to(torch_dtype).requires_grad_()

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
                    with kernel.disabled() if path == "eager" else contextlib.nullcontext():
                        sync(device)
                        t0 = time.perf_counter()
                        for _ in range(inner):
                            fn()
                        sync(device)
                        if r:  # the first round warms up
                            times[path].append((time.perf_counter() - t0) / inner)
            k, e = (1e3 * statistics.median(times[p]) for p in ("kernel", "eager"))
            lines.append(f"| {name} | {label} | {k:.3f} | {e:.3f} | {e / k:.2f} | {moved[label] / k / 1e6:.0f} |")
            print(lines[-1])
    if write:
        kind = "GPU (Triton)" if device.startswith("cuda") else "CPU"
        write_section("bench/householder_kernel.py" + (" cuda" if device.startswith("cuda") else ""), (
            f"## The ETHER family's update: fused {kind} kernel vs eager (`bench/householder_kernel.py`)\n\n"
            f"Run on {date.today().isoformat()}: `{command}`\n\n{setup}.\n\n" + "\n".join(lines) + "\n\n"
            "The update alone (`_BlockRankUpdate`, forward with no autograd graph; forward + backward with the input "
            "and vector gradients). Its effect on a whole training step is the `eager` rows of `bench/adapters.py`."
        ))


if __name__ == "__main__":
    CLI(main, as_positional=False)
