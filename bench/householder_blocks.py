"""The CPU kernel's Householder update per block size: its explicit vector code against the plain loops it replaced
(`cpu_kernel.VECTOR_CODE`), on the widths of the models users train.

With `nb` blocks per transform a width's block size is `width / nb`: 18 and 48 for SmolLM2-135M (576, 1536) at
nb 32, 30 and 80 for SmolLM2-360M, 32 and 86 for `bench/adapters.py`'s small Llama, 128 and 344 for Llama-2-7B.
For each width, ETHER (one vector per block) and ETHER+ (two), times the forward (in place), the backward with
the input given as rows, and the backward from a kept output (`OutputRows`, ETHER+HH's output side), the two
codes interleaved; prints nanoseconds per number (medians) and plain / vector (above 1: the vector code is
faster; at the block sizes compiled as constants the backward takes the plain loops either way). Each tensor
is about `--mib` MiB, so with the default it stays in the last-level cache and the arithmetic shows rather than
the memory. Example:

    python bench/householder_blocks.py --threads 1
"""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import command_line, interleaved_ms, machine, patched, write_section  # noqa: E402
from lit_gpt.adapters import cpu_kernel  # noqa: E402
from lit_gpt.adapters.ether import ETHER_COEFS, ETHERPLUS_COEFS  # noqa: E402

WIDTHS = [576, 1536, 960, 2560, 1024, 2752, 4096, 11008]


def main(
    widths: list[int] = WIDTHS,
    nb: int = 32,
    mib: float = 4.0,
    threads: int = 1,
    repeats: int = 15,
    write: bool = False,
) -> None:
    """Time the CPU kernel's ETHER/ETHER+ update per block size: ns per number, vector code vs plain loops.

    Args:
        widths: Transform widths (each must be a multiple of nb).
        nb: Blocks per transform.
        mib: About how large each activation tensor is (rows = mib MiB / width).
        threads: torch threads (the kernel uses as many).
        repeats: Interleaved timings per code; medians are printed.
        write: Replace (or add) this benchmark's section of docs/benchmarks.md with the results.
    """
    if not cpu_kernel.available():
        print("needs the CPU kernel (a C compiler)")
        return
    bad = [w for w in widths if w % nb]
    if bad:
        raise SystemExit(f"--widths {bad}: each width must be a multiple of --nb {nb}.")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    command = command_line()
    setup = (f"float32, nb {nb}, about {mib:g} MiB per tensor, {threads} threads, {repeats} interleaved timings, "
             f"medians; torch {torch.__version__}, {machine()}")
    print(f"$ {command}\n{setup}")
    lines = ["| width | block | update | pass | plain ns/number | vector ns/number | plain / vector |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for width in widths:
        k = width // nb
        tokens = max(64, int(mib * 2**20 / 4 / width))
        n = tokens * width
        z, g, gz = torch.randn(tokens, width), torch.randn(tokens, width), torch.empty(tokens, width)
        for name, coefs in (("ether", ETHER_COEFS), ("etherplus", ETHERPLUS_COEFS)):
            vecs = F.normalize(torch.randn(len(coefs), nb, k), dim=-1)
            out, c = cpu_kernel.forward(z, vecs, coefs)
            passes = {
                "forward": lambda: cpu_kernel.forward(out, vecs, coefs, out=out),
                "backward": lambda: cpu_kernel.backward(g, z, vecs, coefs, c, gz, True),
                "backward from output": lambda: cpu_kernel.backward(
                    g, cpu_kernel.OutputRows(out, None), vecs, coefs, c, gz, True),
            }
            for label, fn in passes.items():
                plain, vector = interleaved_ms([with_code(False, fn), with_code(True, fn)], repeats)
                lines.append(f"| {width} | {k} | {name} | {label} | {plain * 1e6 / n:.3f} | "
                             f"{vector * 1e6 / n:.3f} | {plain / vector:.2f} |")
                print(lines[-1])
    if write:
        write_section("bench/householder_blocks.py", (
            "## The CPU kernel per block size: explicit vector code vs plain loops (`bench/householder_blocks.py`)"
            f"\n\nRun on {date.today().isoformat()}: `{command}`\n\n{setup}.\n\n" + "\n".join(lines) + "\n\n"
            "The plain loops are the kernel's code before the vector code (`cpu_kernel.VECTOR_CODE = False`): a "
            "loop per block for each dot product and update, which the compiler vectorises with a reduction, "
            "a remainder and alignment handling per loop. The vector code covers a block with whole vectors and, "
            "where the vector length (8 float32 numbers) does not divide the block size, one more vector ending at "
            "the block's end that overlaps the one before it, its overlapping lanes masked off; the vector "
            "gradient's partial sums keep that last vector apart, so no store overlaps another. Block sizes 16, "
            "32, 64 and 128 are compiled as constants (the compiler unrolls a block's loops completely); at those "
            "sizes the backward runs the plain loops in both columns, since the vector code measured no faster there "
            "when that choice was made (a run of 2026-11-23, not recorded here), and the forward the vector code. "
            "The tensors fit the last-level cache here: "
            "inside a training step, where they come from memory, the difference is smaller (`bench/ab_step.py "
            "--b lit_gpt.adapters.cpu_kernel:VECTOR_CODE=False` measures it)."
        ))


def with_code(vector: bool, fn):
    """`fn` run with `cpu_kernel.VECTOR_CODE` set to `vector`."""

    def run() -> None:
        with patched(cpu_kernel, "VECTOR_CODE", vector):
            fn()

    return run


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    run_cli(main)
