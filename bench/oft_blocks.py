"""OFT's blocks per step: the exact Cayley transform as an inverse with a two-product backward against a solve that
autograd differentiates (`lit_gpt.adapters.oft.CAYLEY_BY_INVERSE`).

Every step builds each adapted layer's `k x k` blocks `(I + S)(I - S)^-1` from its parameters and takes their
gradient. This builds all of a model's blocks (the shape of `bench/adapters.py`, OFT with block size `k` on every
linear layer, upper-triangle storage as PEFT's) and backpropagates a loss of them, the forms interleaved, and
prints the median milliseconds per step and their ratios. The inverse is an elimination without pivoting, in C on
the CPU (`cpu_kernel.cayley`) and a Triton program per block on a GPU (`gpu_kernel.cayley`, for blocks up to
`gpu_kernel.CAYLEY_MAX_BLOCK`; there also timed with `torch.linalg.inv_ex`), also timed alone against
`torch.linalg.inv_ex`. Example:

    python bench/oft_blocks.py --threads 1
"""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from adapters import llama_config  # noqa: E402
from common import command_line, interleaved_ms, machine, patched, write_section  # noqa: E402
from lit_gpt import GPT  # noqa: E402
from lit_gpt.adapters import AdapterConfig, apply_adapters, cpu_kernel, gpu_kernel, oft  # noqa: E402


def main(
    shape: str = "small",
    n_layer: int = 4,
    block_size: int = 32,
    neumann_terms: int = 0,
    targets: str = "all-linear",
    device: str = "cpu",
    threads: int = 1,
    repeats: int = 21,
    write: bool = False,
) -> None:
    """Print the milliseconds per step of building and differentiating every OFT block, both ways.

    Args:
        shape: A shape of `bench/adapters.py` ("small", "llama2-7b", "smollm2-135m", "tiny").
        n_layer: Layers.
        block_size: OFT block size `k`.
        neumann_terms: With terms, time the Cayley-Neumann series instead: the GPU kernels
            (`gpu_kernel.neumann_forward`) against PyTorch's products and autograd (`gpu_kernel.NEUMANN_MAX_BLOCK=0`).
        targets: Comma-separated adapter targets.
        device: "cpu" or "cuda".
        threads: torch threads.
        repeats: Interleaved timings per form; medians are printed.
        write: Replace (or add) this benchmark's section of docs/benchmarks.md with the results.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(llama_config(shape, n_layer, 256))
    cfg = AdapterConfig(method="oft", block_size=block_size, upper_triangle=True, targets=targets.split(","),
                        neumann_terms=neumann_terms)
    model = apply_adapters(model, cfg)
    transforms = [m for m in model.modules() if isinstance(m, oft.OFTTransform)]
    params = [torch.nn.Parameter(torch.randn(t.R_upper.shape, device=device) * 0.05) for t in transforms]
    for t, p in zip(transforms, params):
        t.R_upper = p  # only the transforms are needed: the model's weights stay on the meta device
    n_blocks = sum(t.nb for t in transforms)

    # (label in the table, name in the summary, CAYLEY_BY_INVERSE, the kernels' block limit or None: unchanged)
    forms = [("inverse, two-product backward (default)", "inverse", True, None),
             ("solve, autograd backward (`CAYLEY_BY_INVERSE=False`)", "solve", False, None)]
    if device != "cpu":  # the inverse by the Triton kernel (the default for small blocks) and by inv_ex
        forms.insert(1, ("inverse by `torch.linalg.inv_ex` (`gpu_kernel.CAYLEY_MAX_BLOCK=0`)", "inv_ex", True, 0))
    switch = "CAYLEY_MAX_BLOCK"
    if neumann_terms:
        forms = [(f"Cayley-Neumann to S^{neumann_terms} (default)", "kernels", True, None),
                 ("the same by PyTorch's products and autograd (`gpu_kernel.NEUMANN_MAX_BLOCK=0`)", "PyTorch", True, 0)]
        switch = "NEUMANN_MAX_BLOCK"

    def step(by_inverse: bool, max_block):
        def run() -> None:
            with patched(oft, "CAYLEY_BY_INVERSE", by_inverse), patched(
                gpu_kernel, switch, getattr(gpu_kernel, switch) if max_block is None else max_block
            ):
                sum(t.blocks().sum() for t in transforms).backward()
            for p in params:
                p.grad = None

        return run

    times = interleaved_ms([step(*form[2:]) for form in forms], repeats, device=device)
    alone, kernel = None, None
    if not neumann_terms:  # the inverses alone, all blocks as one batch
        with torch.no_grad():
            S = torch.cat([t.skew() for t in transforms]).contiguous()
        if device == "cpu" and cpu_kernel.available():
            kernel = cpu_kernel
        elif device != "cpu" and gpu_kernel.cayley_usable(S):
            kernel = gpu_kernel
        if kernel is not None:
            eye = torch.eye(block_size, device=device)
            alone = interleaved_ms([lambda: kernel.cayley(S), lambda: torch.linalg.inv_ex(eye - S)], repeats,
                                   device=device)
    command = command_line()
    series = f" neumann{neumann_terms}" if neumann_terms else ""
    setup = (f"{shape} shape, {n_layer} layers, OFT b{block_size}{series} on {targets}: {len(transforms)} transforms, "
             f"{n_blocks} blocks of {block_size} x {block_size} a step; float32 on {device}, {threads} threads, "
             f"{repeats} interleaved timings, medians; torch {torch.__version__}, {machine()}")
    table = ["| form | ms per step (forward + backward) |", "|---|---|"]
    table += [f"| {form[0]} | {ms:.2f} |" for form, ms in zip(forms, times)]
    summary = "; ".join(f"{form[1]} / {forms[0][1]}: {ms / times[0]:.2f}x" for form, ms in zip(forms[1:], times[1:]))
    if alone is not None:
        us = [1e3 * ms / n_blocks for ms in alone]
        name = kernel.__name__.split(".")[-1]
        summary += (f"; the inverses alone: `{name}.cayley` {us[0]:.2f} us per block, `torch.linalg.inv_ex` "
                    f"{us[1]:.2f} us")
    print(f"$ {command}\n{setup}\n" + "\n".join(table) + f"\n{summary}")
    if write:
        title = "Cayley-Neumann blocks per step: kernels vs PyTorch" if series else "blocks per step: inverse vs solve"
        write_section(
            f"bench/oft_blocks.py {device}{series}",
            f"## OFT's {title} (`bench/oft_blocks.py`)\n\nRun on {date.today()}: "
            f"`{command}`\n\n{setup}\n\n" + "\n".join(table) + f"\n\n{summary}\n",
        )


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
