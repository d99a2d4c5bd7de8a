"""Tokens/s and memory of a whole training step (forward, backward, AdamW) for every method on one model.

Each method runs exactly what `lit_gpt.training.fit` runs per micro-batch (`model(x, labels=y)` with the chunked
loss, backward, optimizer step), on one random Llama-shaped `GPT` whose weights all variants share. The reference
is the frozen step: forward + backward to the activations, no trainable weight (what any adapter pays at least).
Variants are interleaved (each once per round, order alternating) and ratios are taken per round, then the median.

CPU (default): width 1024, 4 layers, seq 256. GPU: `--shape 7b --device cuda --dtype bfloat16` is Llama-2-7B
(32 layers, width 4096) in bf16, where also the peak allocated memory and MFU are reported. MFU counts the FLOPs a
frozen model must do (forward + input gradients: 4 × frozen linear parameters × tokens, plus attention) plus the
weight gradients of trainable parameters, over `--peak_tflops` (H100 SXM bf16 dense: 989).

A method name ending in `+f32` (`etherplusHH+f32`) keeps that adapter's weights, and so AdamW's state, in float32
while the model is `--dtype`, as `finetune/*.py --adapter_float32 true` does under bf16-true: its cost is the row
next to the plain method's.
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import command_line, machine, saved_bytes, sync, write_section  # noqa: E402
from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.adapters import AdapterConfig, apply_adapters  # noqa: E402
from lit_gpt.training import cast_trainable_float32  # noqa: E402
from lit_gpt.utils import num_parameters  # noqa: E402

SHAPES = {
    "small": dict(n_layer=4, n_embd=1024, n_head=16, n_query_groups=16, intermediate_size=2816),
    "7b": dict(n_layer=32, n_embd=4096, n_head=32, n_query_groups=32, intermediate_size=11008),
    "tiny": dict(n_layer=1, n_embd=128, n_head=4, n_query_groups=4, intermediate_size=256),  # the smoke test's
}
FLOAT32_SUFFIX = "+f32"


def method_config(method: str, targets: list[str]) -> Optional[AdapterConfig]:
    if method in ("frozen", "full"):
        return None
    if method == "lora":
        return AdapterConfig(method="lora", r=8, alpha=16, targets=targets)
    if method == "oft":
        return AdapterConfig(method="oft", nb=32, targets=targets)  # nb 32: block size 128 at width 4096, 32 at 1024
    return AdapterConfig(method=method, nb=32, targets=targets)


def build(method: str, base: dict, config: Config, targets: list[str], device: str, dtype: torch.dtype) -> GPT:
    float32 = method.endswith(FLOAT32_SUFFIX)
    method = method.removesuffix(FLOAT32_SUFFIX)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(base, assign=True)  # the same tensors for every variant: one copy of the weights
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method == "frozen":
        # backward must still reach the activations: the embedding output requires grad, the table stays frozen
        model.transformer.wte.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_())
    adapter = method_config(method, targets)
    if adapter is not None:
        apply_adapters(model, adapter)
        model.to(device=device, dtype=dtype)
        if float32:  # what lit_gpt.training's precision plugin does for --adapter_float32
            cast_trainable_float32(model)
    return model.train()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def optimizer_state_bytes(opt: Optional[torch.optim.Optimizer]) -> int:
    if opt is None:
        return 0
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def frozen_flops_per_token(config: Config, seq_len: int, trainable: int, full: bool) -> float:
    linear = config.n_layer * (
        config.n_embd * (config.n_head + 2 * config.n_query_groups) * config.head_size
        + config.n_head * config.head_size * config.n_embd
        + 3 * config.n_embd * config.intermediate_size
    ) + config.n_embd * config.padded_vocab_size
    attention = config.n_layer * 2 * 2 * seq_len * config.n_head * config.head_size  # QK^T and AV, causal ~half, ×2 bwd
    weight_grads = 2 * (linear if full else trainable)
    return 4 * linear + 2 * attention + weight_grads


def main(
    device: str = "cpu",
    dtype: str = "float32",
    shape: str = "small",
    seq_len: int = 256,
    micro_batch_size: int = 1,
    methods: str = "frozen,ether,etherplus,etherplusHH,oft,lora,full",
    targets: str = "query,value",
    repeats: int = 5,
    warmup: int = 1,
    threads: Optional[int] = None,
    peak_tflops: float = 989.0,
    write: bool = False,
) -> None:
    """Benchmark a whole training step of each method side by side.

    Args:
        device: `cpu` or `cuda`.
        dtype: Weight and activation dtype (`float32`, `bfloat16`).
        shape: `small` (width 1024, 4 layers), `7b` (Llama-2-7B) or `tiny` (width 128, 1 layer: a smoke test).
        seq_len: Tokens per sample.
        micro_batch_size: Samples per step.
        methods: Comma-separated: frozen, ether, etherplus, etherplusHH, oft, lora, full; an adapter's name
            with `+f32` appended keeps its weights float32 (`--adapter_float32`).
        targets: Comma-separated adapter targets (query, key, value, projection, mlp, head), or all-linear (every
            linear layer but the output head).
        repeats: Interleaved rounds; medians are reported.
        warmup: Untimed rounds first.
        threads: torch CPU threads (default: torch's).
        peak_tflops: The device's dense peak for MFU (GPU only).
        write: Replace this benchmark's section of docs/benchmarks.md with the result.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if "frozen" not in names:
        names.insert(0, "frozen")
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    config = Config.from_name("Llama-2-7b-hf", **SHAPES[shape], vocab_size=32000)
    with torch.device(device):
        base = {k: v.to(torch_dtype) for k, v in GPT(config).state_dict().items()}
    x = torch.randint(0, config.vocab_size, (micro_batch_size, seq_len), device=device)
    y = x.clone()
    y[:, : seq_len // 2] = -100  # the prompt half carries no loss, as in instruction tuning

    models, optimizers, steps = {}, {}, {}
    for name in names:
        model = build(name, base, config, target_list, device, torch_dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable) if trainable else None
        models[name], optimizers[name] = model, opt

        def step(model=model, opt=opt) -> None:
            model(x, labels=y).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync(device)

        steps[name] = step

    # a method that does not fit (full fine-tuning of a large model, say) is reported as such, not a crash
    out_of_memory = []
    for name in list(names):
        try:
            steps[name]()
        except torch.OutOfMemoryError:
            if name == "frozen":
                raise
            names.remove(name)
            out_of_memory.append(name)
            del models[name], optimizers[name], steps[name]
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else reversed(names):
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)

    tokens = micro_batch_size * seq_len
    rows = []
    for name in names:
        model = models[name]
        trainable = num_parameters(model, requires_grad=True)
        ratio = statistics.median(t / f for t, f in zip(times[name], times["frozen"]))
        activ = saved_bytes(model, lambda m=model: m(x, labels=y))
        opt_state = optimizer_state_bytes(optimizers[name])  # AdamW's two moments, in the parameters' dtype
        row = dict(method=name, trainable=trainable, step=statistics.median(times[name]), ratio=ratio,
                   tok_s=tokens / statistics.median(times[name]), memory=(activ + opt_state) / 2**20)
        if device.startswith("cuda"):
            # the method alone, as if it were the only model on the GPU: the weights and its own optimizer state
            # plus what its step allocates on top (other variants' optimizer states are resident too, not counted)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resting = torch.cuda.memory_allocated()
            steps[name]()
            own = weight_bytes(model) + optimizer_state_bytes(optimizers[name])
            row["peak_gib"] = (own + torch.cuda.max_memory_allocated() - resting) / 2**30
            flops = frozen_flops_per_token(config, seq_len, trainable, name == "full") * tokens
            row["mfu"] = flops / row["step"] / (peak_tflops * 1e12)
        rows.append(row)

    header = ["method", "trainable", "step (s)", "tokens/s", "step / frozen", "backward+optimizer memory MiB"]
    if device.startswith("cuda"):
        header += ["peak GiB (weights + optimizer + step)", "MFU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"], f"{r['trainable']:,}", f"{r['step']:.4f}", f"{r['tok_s']:.0f}", f"{r['ratio']:.3f}",
                 f"{r['memory']:.1f}"]
        if "peak_gib" in r:
            cells += [f"{r['peak_gib']:.2f}", f"{r['mfu']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    for name in out_of_memory:
        lines.append(f"| {name} | | out of memory | | | |" + (" | |" if device.startswith("cuda") else ""))
    table = "\n".join(lines)
    where = f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    summary = (f"{shape} shape ({config.n_layer} layers, width {config.n_embd}), {dtype}, {device}, seq {seq_len}, "
               f"micro-batch {micro_batch_size}, targets {','.join(target_list)}, {repeats} interleaved rounds; "
               f"{where}")
    print(summary)
    print(table)
    if write:
        section = (f"## Training step per method (`bench/train.py`), {date.today()}\n\n`{command_line()}`\n\n"
                   f"{summary}.\n\n{table}\n\n"
                   "`step / frozen` is the median per-round ratio to the frozen step (forward + backward to the "
                   "activations). Memory is what the step adds beyond the weights: tensors saved for backward, "
                   "trainable gradients and AdamW's two moments.")
        # one section per device and shape, and per micro-batch size and targets other than the defaults
        key = f"bench/train.py {device} {shape}" + (f" mb{micro_batch_size}" if micro_batch_size != 1 else "")
        key += f" {targets.replace(',', '+')}" if targets != "query,value" else ""
        write_section(key, section)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
