"""Host time per call of the ETHER family's GPU pieces at a size where the GPU waits on the host (CUDA only).

A 7B step at micro-batch 1 (256 tokens) keeps an H100 busy for only a few milliseconds: its time is the host's,
issuing kernels from Python. This prints, per call and without synchronising in between (so the GPU never holds
the host up), the host microseconds of: one small PyTorch operation, one Triton launch of the forward kernel, the
kernel wrappers `forward_raw`/`backward_raw`, and the forward of the fused QKV projection with q+v adapted
(`_GroupedLinear`: two transforms, three GEMMs) against the frozen projection's one GEMM. (Backward is left out: a
`.backward()` per call would time the autograd engine's start, which a training step pays once.) Example:

    python bench/launch_overhead.py --tokens 256 --width 4096
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import sync  # noqa: E402  (also puts the repository on the path)
from lit_gpt.adapters import gpu_kernel  # noqa: E402
from lit_gpt.adapters.ether import ETHERPLUS_COEFS, NORM_EPS, HouseholderTransform  # noqa: E402


def host_us(fn, calls: int) -> float:
    """The host time per call of `calls` back-to-back calls, synchronised only before and after."""
    sync("cuda")
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    sync("cuda")
    return us


def main(tokens: int = 256, width: int = 4096, nb: int = 32, calls: int = 200, repeats: int = 9) -> None:
    """CUDA only: host microseconds per call of the ETHER family's Triton kernels, their wrappers, an adapted QKV.

    Args:
        tokens: Rows of the activation (micro-batch x sequence).
        width: Model width (the QKV projection is `3 * width` rows, as Llama-2-7B's).
        nb: Blocks per transform.
        calls: Calls per timing.
        repeats: Interleaved rounds (every call timed once per round); medians are printed.
    """
    if not torch.cuda.is_available() or not gpu_kernel.available():
        raise SystemExit("error: bench/launch_overhead.py is CUDA only: it needs a CUDA GPU and Triton (which ships "
                         "with PyTorch's CUDA builds); run it on a GPU machine.")
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(tokens, width, device=dev, dtype=dt)
    W = torch.randn(3 * width, width, device=dev, dtype=dt) / width**0.5
    ts = [HouseholderTransform(width, nb, ETHERPLUS_COEFS, device=dev, dtype=dt) for _ in range(2)]
    params = ts[0].vector_params()
    out, c = gpu_kernel.forward_raw(x, params, None, ETHERPLUS_COEFS, NORM_EPS)
    gz = torch.empty_like(x)
    fwd = gpu_kernel._load()[0]
    bt, bk = gpu_kernel._tiles(width // nb, gpu_kernel.TILE_ELEMENTS)
    grid = (-(-tokens // bt), nb)

    def bare_launch():
        fwd[grid](x, width, params[0], params[1], c, c, out, width, c, tokens, nb, width // nb, NORM_EPS,
                  S0=-1.0, S1=1.0, J=2, NORMALIZE=True, HAS_KEEP=False, BETA=0, BT=bt, BK=bk)

    parts = [(0, width, ts[0]), (width, 2 * width, None), (2 * width, 3 * width, ts[1])]
    xg = x.clone().requires_grad_()

    rows = [
        ("torch.add (one PyTorch kernel)", lambda: torch.add(x, 1.0)),
        ("Triton forward kernel, bare launch", bare_launch),
        ("gpu_kernel.forward_raw", lambda: gpu_kernel.forward_raw(x, params, None, ETHERPLUS_COEFS, NORM_EPS)),
        ("gpu_kernel.backward_raw (2 kernels)",
         lambda: gpu_kernel.backward_raw(x, x, params, None, ETHERPLUS_COEFS, NORM_EPS, c, gz, True)),
        ("frozen QKV projection, forward", lambda: F.linear(xg, W)),
        ("q+v adapted QKV (_GroupedLinear), forward", lambda: HouseholderTransform.linear_groups(xg, W, None, parts)),
    ]
    for _, fn in rows:
        fn()  # compile / warm up
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            times[name].append(host_us(fn, calls))
    print(f"{tokens} tokens, width {width}, nb {nb}, bfloat16, {torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}; host microseconds per call, median of {repeats} interleaved rounds of {calls} calls")
    print("| call | host µs |\n|---|---|")
    for name, _ in rows:
        print(f"| {name} | {statistics.median(times[name]):.1f} |")


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    run_cli(main)
