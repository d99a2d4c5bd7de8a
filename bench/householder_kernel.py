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
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import command_line, machine, sync, write_section  # noqa: E402
from lit_gpt.adapters import cpu_kernel, gpu_kernel  # noqa: E402
from lit_gpt.adapters.ether import ETHER_COEFS, ETHERPLUS_COEFS, HouseholderTransform  # noqa: E402


def main(
    tokens: int = 1024,
    width: int = 1024,
    nb: int = 32,
    repeats: int = 25,
    threads: Optional[int] = 1,
    device: str = "cpu",
    dtype: str = "float32",
    sweep: bool = False,
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
        sweep: GPU only: also time the Triton kernels alone (CUDA-graph replays, so no launch overhead) for
            several tile sizes and backward settings (`gpu_kernel.TILE_ELEMENTS`, `gpu_kernel.BACKWARD`).
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
             f"{repeats} interleaved timings, medians; torch {torch.__version__}, {machine()}")
    print(setup)
    inner = 10 if device.startswith("cuda") else 1  # GPU calls are queued back to back, then synchronised once
    act = z.numel() * z.element_size()
    moved = {"forward": 2 * act, "forward + backward": 5 * act}
    lines = ["| update | pass | kernel ms | eager ms | eager / kernel | kernel GB/s |", "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for name, coefs in (("ether", ETHER_COEFS), ("etherplus", ETHERPLUS_COEFS)):
        # the adapter module as a layer uses it: its parameters normalised every call, gradients back to them
        transform = HouseholderTransform(width, nb, coefs, device=device, dtype=torch_dtype)

        def forward() -> None:
            with torch.no_grad():
                transform(z)

        def both() -> None:
            zz = z.detach().requires_grad_()
            transform(zz).backward(g)
            transform.zero_grad(set_to_none=True)

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
    swept = sweep_gpu_tiles(z, g, nb) if sweep and device.startswith("cuda") else []
    if write:
        kind = "GPU (Triton)" if device.startswith("cuda") else "CPU"
        write_section("bench/householder_kernel.py" + (" cuda" if device.startswith("cuda") else ""), (
            f"## The ETHER family's update: fused {kind} kernel vs eager (`bench/householder_kernel.py`)\n\n"
            f"Run on {date.today().isoformat()}: `{command}`\n\n{setup}.\n\n" + "\n".join(lines) + "\n\n"
            "The update alone (a `HouseholderTransform` module, forward with no autograd graph; forward + backward "
            "with the input and parameter gradients). Its effect on a whole training step is the `eager` rows of "
            "`bench/adapters.py`." + ("\n\nThe kernels alone (ETHER+, CUDA-graph replays: no launch overhead), per "
                                     "tile and grid setting of `gpu_kernel`:\n\n" + "\n".join(swept) if swept else "")
        ))


def sweep_gpu_tiles(z: torch.Tensor, g: torch.Tensor, nb: int) -> list[str]:
    """Kernel-only times of ETHER+'s update (two vectors) for a few tile and grid settings, and the bandwidth they
    reach (printed and returned as table lines); the settings of `gpu_kernel` are restored afterwards."""
    from triton.testing import do_bench_cudagraph

    params = [torch.randn(nb, z.shape[1] // nb, device=z.device, dtype=z.dtype) for _ in range(2)]
    coefs = ETHERPLUS_COEFS
    act = z.numel() * z.element_size()
    kind = gpu_kernel.backward_kind(z.shape[1] // nb)
    saved_tile, saved_backward = gpu_kernel.TILE_ELEMENTS, dict(gpu_kernel.BACKWARD[kind])
    out = ["| kernel | tile elements | waves | warps | 2-D sums | µs | GB/s |", "|---|---|---|---|---|---|---|"]
    print("\n".join(out))

    def row(line: str) -> None:
        out.append(line)
        print(line)

    try:
        for tile in (4096, 8192, 16384):
            gpu_kernel.TILE_ELEMENTS = tile
            ms = do_bench_cudagraph(lambda: gpu_kernel.forward_raw(z, params, None, coefs, 1e-12))
            row(f"| forward | {tile} | - | 4 | - | {1e3 * ms:.1f} | {2 * act / ms / 1e6:.0f} |")
        gpu_kernel.TILE_ELEMENTS = saved_tile
        _, c = gpu_kernel.forward_raw(z, params, None, coefs, 1e-12)
        gz = torch.empty_like(g)
        for acc2d in (False, True):
            for warps in (4, 8):
                for tile in (2048, 4096, 8192):
                    for waves in (4, 16):
                        gpu_kernel.BACKWARD[kind] = dict(tile=tile, waves=waves, acc2d=acc2d, warps=warps)
                        ms = do_bench_cudagraph(
                            lambda: gpu_kernel.backward_raw(g, z, params, None, coefs, 1e-12, c, gz, True))
                        row(f"| backward + finish | {tile} | {waves} | {warps} | {'yes' if acc2d else 'no'} | "
                            f"{1e3 * ms:.1f} | {3 * act / ms / 1e6:.0f} |")
    finally:
        gpu_kernel.TILE_ELEMENTS, gpu_kernel.BACKWARD[kind] = saved_tile, saved_backward
    return out


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
