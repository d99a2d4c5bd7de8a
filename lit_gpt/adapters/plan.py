"""The fine-tuning CLIs' `--dry_run`: parameter counts and the memory the weights and optimizer will need, computed
on the `meta` device (no weights are read, no memory is used: a 70B model is planned in a second)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from lit_gpt.adapters.base import adapted_layers, apply_adapters, trained_module_state_dict
from lit_gpt.adapters.config import AdapterConfig
from lit_gpt.config import Config
from lit_gpt.utils import num_parameters

# Lightning precision -> (bytes of a stored parameter, what it means). Mixed precision keeps float32 weights, and
# AdamW keeps its two state tensors in the parameter's dtype.
PRECISION_BYTES = {
    "64-true": (8, "float64 weights"),
    "32-true": (4, "float32 weights"),
    "32": (4, "float32 weights"),
    "bf16-mixed": (4, "float32 weights, bfloat16 compute"),
    "16-mixed": (4, "float32 weights, float16 compute"),
    "bf16-true": (2, "bfloat16 weights"),
    "16-true": (2, "float16 weights"),
}
# Lightning's short spellings
PRECISION_ALIASES = {"64": "64-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plan_report(model: Union[str, Config], config: Optional[AdapterConfig], precision: str = "bf16-true",
                adapter_float32: Optional[bool] = None, world_size: int = 1, quantize: Optional[str] = None) -> str:
    """A plain-text plan for fine-tuning `model` (a name of `Config.from_name`, or a checkpoint's `Config`) with
    `config` (`None`: full fine-tuning) at Lightning `precision`; `adapter_float32`: the flag of that name (None:
    unset, true for DoRA under bf16-true: `lit_gpt.training.resolve_adapter_float32`);
    `world_size` processes (devices × nodes) shard the weights, gradients and AdamW state with FSDP2; `quantize`:
    the frozen linear weights kept in that format (`lit_gpt.quantize`; every process keeps all of them)."""
    precision = PRECISION_ALIASES.get(precision, precision)
    if precision not in PRECISION_BYTES:
        raise ValueError(f"Unknown precision {precision!r}: choose one of {', '.join(PRECISION_BYTES)}.")
    model_config = model if isinstance(model, Config) else Config.from_name(model)
    from lit_gpt.model import GPT

    with torch.device("meta"):
        gpt = GPT(model_config)
        if config is not None:
            apply_adapters(gpt, config)
    trainable = num_parameters(gpt, requires_grad=True)
    frozen = num_parameters(gpt, requires_grad=False)
    nbytes, meaning = PRECISION_BYTES[precision]
    from lit_gpt.training import keeps_trainable_float32, resolve_adapter_float32  # (16-true; bf16-true with it)

    adapter_float32 = resolve_adapter_float32(adapter_float32, config, precision)
    trainable_bytes = 4 if keeps_trainable_float32(precision, config, adapter_float32) else nbytes
    # the modules trained in full keep the model's dtype (`lit_gpt.training.cast_trainable_float32`)
    full = sum(p.numel() for p in {id(p): p for p in trained_module_state_dict(gpt).values()}.values())
    trained_bytes = (trainable - full) * trainable_bytes + full * nbytes
    # PiSSA's and OLoRA's starting factors, kept beside the adapter (buffers: never trained), in the model's dtype
    starting = sum(b.numel() for name, b in gpt.named_buffers() if ".adapters." in name)
    quantized, quantized_bytes = 0, 0
    if quantize is not None:
        from lit_gpt.quantize import DESCRIPTIONS, check_kind, quantizable, quantized_nbytes

        check_kind(quantize)
        shapes = [tuple(m.weight.shape) for *_, m in quantizable(gpt)]
        quantized = sum(a * b for a, b in shapes)
        quantized_bytes = sum(quantized_nbytes(shape, quantize) for shape in shapes)
    weights = (frozen - quantized) * nbytes + quantized_bytes + trained_bytes + starting * nbytes
    grads = trained_bytes
    adam = 2 * trained_bytes
    method = "full fine-tuning" if config is None else config.describe()
    lines = [
        f"model: {model_config.name} ({model_config.n_layer} layers, width {model_config.n_embd})",
        f"method: {method}",
    ]
    if config is not None:
        lines.append(f"adapted layers: {sum(1 for _ in adapted_layers(gpt))}")
    lines += [
        f"trainable parameters: {trainable:,}"
        + (f" ({full:,} of them in the modules trained in full)" if full else ""),
        f"frozen parameters: {frozen:,}",
    ]
    if model_config.n_expert:  # a token runs k experts of n: the compute per token is that of the active ones
        base = {name: p.numel() for name, p in gpt.named_parameters() if ".adapters." not in name}
        experts = sum(n for name, n in base.items() if ".mlp.experts." in name)
        per_expert = experts // model_config.n_expert
        active = sum(base.values()) - experts + per_expert * model_config.n_expert_per_token
        lines.append(f"model parameters active per token: {active:,} ({model_config.n_expert_per_token} of "
                     f"{model_config.n_expert} experts per token; the adapter not counted)")
    lines += [
        f"precision: {precision} ({meaning}, {nbytes} bytes per parameter"
        + (f"; the {'adapter' if full else 'trainable'} ones float32, {trainable_bytes} bytes)"
           if trainable_bytes != nbytes else ")"),
        f"weights: {format_bytes(weights)}" + (f" (with the adapter's {starting:,} starting factors, "
                                                f"{format_bytes(starting * nbytes)})" if starting else ""),
    ]
    if quantize is not None:
        lines.append(f"quantized: {len(shapes)} frozen linear weights ({quantized:,} parameters) in "
                     f"{DESCRIPTIONS[quantize]}, {format_bytes(quantized_bytes)} in place of "
                     f"{format_bytes(quantized * nbytes)}")
    lines += [
        f"gradients: {format_bytes(grads)}",
        f"AdamW state: {format_bytes(adam)} (2 tensors per trainable parameter)",
        f"total before activations: {format_bytes(weights + grads + adam)}",
    ]
    if world_size > 1:  # FSDP2 shards every parameter (so its gradient and AdamW state) evenly over the processes
        gathered = None if quantize is None else (
            {id(p) for p in gpt.parameters()} - {id(m.weight) for *_, m in quantizable(gpt)})
        largest_block = max((sum(p.numel() for p in block.parameters() if gathered is None or id(p) in gathered)
                             for block in gpt.transformer.h), default=0) * nbytes
        sharded = weights - quantized_bytes + grads + adam
        kept = (f" and the {format_bytes(quantized_bytes)} of quantized weights, which every device keeps,"
                if quantize else "")
        lines.append(f"per device, sharded over {world_size}: {format_bytes(sharded / world_size)},{kept} "
                     f"and up to {format_bytes(2 * largest_block)} for the gathered blocks in use")
    return "\n".join(lines)
