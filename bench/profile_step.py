"""Where one training step's time goes: torch.profiler's table for one adapter method on a Llama-shaped `GPT`.

The benchmarks in this folder say *how much* a method costs against the frozen floor; this says *which
operations* cost it (and how many kernels a step launches, which is what small GPU steps pay for). Example:

    python bench/profile_step.py --device cuda --dtype bfloat16 --shape llama2-7b --method etherplusHH

prints the operations sorted by device time (CPU time on the CPU) for `--steps` profiled steps after a warm-up.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jsonargparse import CLI  # noqa: E402

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
) -> None:
    """Profile forward + backward of one method (or `floor`: no adapter) and print the costliest operations.

    Args:
        method: floor, ether, etherplus, etherplusHH, oft or lora.
        device: "cpu" or "cuda".
        dtype: "float32" or "bfloat16".
        shape: A shape of bench/adapters.py: small, llama2-7b or tiny.
        n_layer: Transformer blocks.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        targets: Adapter targets of a lit_gpt.GPT (query, key, value, projection, mlp, all-linear).
        nb: Blocks of the ETHER family and OFT.
        steps: Profiled steps (after two warm-up steps).
        rows: Rows of the printed table.
        trace: Also write a Chrome trace to this file.
        sort: "device" (time on the GPU; the CPU's time on the CPU) or "cpu" (the host's time, which bounds a step
            whose GPU waits on kernel launches: small batches on a fast GPU).
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

    def step() -> None:
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x.reshape(-1)).backward()
        model.zero_grad(set_to_none=True)
        sync(device)

    for _ in range(2):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    key = "self_device_time_total" if device.startswith("cuda") and sort == "device" else "self_cpu_time_total"
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


if __name__ == "__main__":
    CLI(main, as_positional=False)
