"""Where one training step's time goes: torch.profiler's table for one adapter method on a Llama-shaped `GPT`.

The benchmarks in this folder say *how much* a method costs against the frozen floor; this says *which
operations* cost it (and how many kernels a step launches, which is what small GPU steps pay for). Example:

    python bench/profile_step.py --device cuda --dtype bfloat16 --shape llama2-7b --method etherplusHH

prints the operations sorted by device time (CPU time on the CPU) for `--steps` profiled steps after a warm-up.
With `--against_floor true` it profiles the method and the frozen floor in turns (one step each, the order
swapped every round) and prints each operation's time per step in both and the difference, largest first: where
a method's overhead over the floor goes, e.g.

    OMP_NUM_THREADS=1 python bench/profile_step.py --method etherplusHH --n_layer 4 --against_floor true --steps 4
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from adapters import lit_model, llama_config  # noqa: E402
from common import sync  # noqa: E402
from lit_gpt import GPT  # noqa: E402
from lit_gpt.adapters import AdapterConfig, apply_adapters  # noqa: E402


def main(
    method: str = "ether",
    device: str = "cpu",
    dtype: str = "float32",
    shape: str = "small",
    n_layer: int = 2,
    batch_size: int = 4,
    seq_len: int = 256,
    targets: list[str] = ["all-linear"],
    nb: int = 32,
    steps: int = 3,
    rows: int = 25,
    trace: Optional[str] = None,
    sort: str = "device",
    against_floor: bool = False,
) -> None:
    """Profile forward + backward of one method (or `floor`: no adapter) and print the costliest operations.

    Args:
        method: floor, ether, etherplus, etherplusHH, oft or lora.
        device: "cpu" or "cuda".
        dtype: "float32" or "bfloat16".
        shape: A shape of bench/adapters.py: small (width 1024), llama2-7b (width 4096), smollm2-135m (width 576,
            grouped queries) or tiny (width 64, a smoke test).
        n_layer: Transformer blocks.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        targets: Adapter targets of a lit_gpt.GPT (query, key, value, projection, mlp, head, all-linear).
        nb: Blocks of the ETHER family and OFT.
        steps: Profiled steps (after two warm-up steps).
        rows: Rows of the printed table.
        trace: Also write a Chrome trace to this file.
        sort: "device" (time on the GPU; the CPU's time on the CPU) or "cpu" (the host's time, which bounds a step
            whose GPU waits on kernel launches: small batches on a fast GPU).
        against_floor: Profile the method and the floor in turns and print the per-operation difference.
    """
    torch.manual_seed(0)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = llama_config(shape, n_layer, seq_len)
    with torch.device(device):
        state = GPT(config).to(torch_dtype).state_dict()
    model = lit_model(config, state, device)
    if method != "floor":
        extra = dict(r=8, alpha=16) if method == "lora" else dict(nb=nb)
        apply_adapters(model, AdapterConfig(method=method, targets=targets, **extra))
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)

    def make_step(model: torch.nn.Module):
        def step() -> None:
            logits = model(x)
            F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x.reshape(-1)).backward()
            model.zero_grad(set_to_none=True)
            sync(device)

        return step

    step = make_step(model)
    for _ in range(2):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    key = "self_device_time_total" if device.startswith("cuda") and sort == "device" else "self_cpu_time_total"
    if against_floor:
        floor_step = make_step(lit_model(config, state, device))
        for _ in range(2):
            floor_step()
        compare(method, {method: step, "floor": floor_step}, steps, activities, key, rows)
        return
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    averages = prof.key_averages()
    print(f"{method} on {n_layer} {shape} layers, {dtype} {device}, batch {batch_size} x {seq_len}, "
          f"targets {','.join(targets)}: {steps} steps")
    print(averages.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    if device.startswith("cuda"):
        kernels = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        kernels_only = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in kernels_only) / 1e3 / steps
        print(f"per step: {kernels / steps:.0f} device kernels and copies, {total:.2f} ms of device time")
    if trace:
        prof.export_chrome_trace(trace)


def compare(method: str, steps_of: dict, steps: int, activities, key: str, rows: int = 25) -> None:
    """Profile one step of each in turns, `steps` rounds, and print per-operation ms per step and the difference."""
    per_op = {name: {} for name in steps_of}
    wall = {name: [] for name in steps_of}
    names = list(steps_of)
    for r in range(steps):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            with torch.profiler.profile(activities=activities) as prof:
                steps_of[name]()
            wall[name].append(time.perf_counter() - start)
            for e in prof.key_averages():
                per_op[name][e.key] = per_op[name].get(e.key, 0.0) + getattr(e, key) / 1e3 / steps
    a, b = per_op[method], per_op["floor"]
    print(f"{method} against the floor, {steps} profiled steps each in turns; ms per step (self time)")
    print(f"{'operation':60s} {'floor':>9s} {method:>12s} {'difference':>11s}")
    order = sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0.0) - b.get(k, 0.0)))
    for k in order[:rows]:
        print(f"{k[:60]:60s} {b.get(k, 0.0):9.2f} {a.get(k, 0.0):12.2f} {a.get(k, 0.0) - b.get(k, 0.0):11.2f}")
    total_a, total_b = sum(a.values()), sum(b.values())
    print(f"{'all operations':60s} {total_b:9.2f} {total_a:12.2f} {total_a - total_b:11.2f}")
    wa, wb = statistics.median(wall[method]) * 1e3, statistics.median(wall["floor"]) * 1e3
    print(f"{'wall time per step (median, profiled)':60s} {wb:9.2f} {wa:12.2f} {wa - wb:11.2f}")


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
