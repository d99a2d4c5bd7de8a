"""QLoRA's memory and speed: a training step of an adapter on frozen weights kept in the model's dtype, in NF4 and in
int8 (`--quantize`, `lit_gpt.quantize`), and PEFT's LoRA on bitsandbytes' `Linear4bit` (transformers'
`LlamaForCausalLM`) where peft and bitsandbytes are installed: the same random Llama-shaped weights everywhere.

For each side: the bytes of the model at rest (weights, codes and scales), the bytes a step keeps for backward
(`common.saved_bytes`: saved activations and the adapter's gradients; a dequantized weight kept until backward
would count), on CUDA the step's peak allocated memory, and the step's time (forward + backward of the adapter,
interleaved, medians). Ratios are to our unquantized side. Example:

    python bench/quantize.py --shape small --n_layer 4 --seq_len 256 --batch 4 --threads 2
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from adapters import SHAPES, hf_model, lit_model, llama_config  # noqa: E402
from common import interleaved_ms, machine, report_table, saved_bytes, sync  # noqa: E402

from lit_gpt.adapters import AdapterConfig, apply_adapters  # noqa: E402
from lit_gpt.adapters.plan import format_bytes  # noqa: E402
from lit_gpt.quantize import BLOCK, quantize_model  # noqa: E402


def resting_bytes(model: nn.Module) -> int:
    """Parameters and buffers, each storage once, and bitsandbytes' scales (kept beside its packed weights)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        state = getattr(t, "quant_state", None)
        if state is not None:
            seen[state.absmax.data_ptr()] = state.absmax.untyped_storage().nbytes()
    return sum(seen.values())


def peft_qlora(hf_config, state_dict: dict, device: str, dtype: torch.dtype, r: int):
    """transformers' Llama with every block's linear layer a bitsandbytes NF4 `Linear4bit` (blocks of 64, no double
    quantization: what `--quantize nf4` keeps) and PEFT's LoRA on q_proj, v_proj."""
    import bitsandbytes as bnb
    import peft

    model = hf_model(hf_config, state_dict, device)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if type(linear) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                      quant_type="nf4", compress_statistics=False)
                q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             blocksize=BLOCK, compress_statistics=False)
                setattr(parent, name, q.to(device))
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def main(
    shape: str = "small",
    n_layer: int = 4,
    seq_len: int = 256,
    batch: int = 4,
    lora_r: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int = 2,
    repeats: int = 5,
    write: bool = False,
) -> None:
    """Measure a LoRA step on unquantized, NF4 and int8 frozen weights (and PEFT + bitsandbytes NF4).

    Args:
        shape: One of the Llama shapes of bench/adapters.py: small (width 1024), llama2-7b, smollm2-135m.
        n_layer: Transformer blocks.
        seq_len: Tokens per sequence.
        batch: Sequences per step.
        lora_r: LoRA's rank (query and value, QLoRA's paper's default targets are all linear layers; PEFT's are these).
        dtype: float32 or bfloat16: the model's and the dequantized weights' dtype.
        device: cpu or cuda.
        threads: torch threads on the CPU.
        repeats: Interleaved timed steps per side; medians are printed.
        write: Record the table in docs/benchmarks.md.
    """
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: pass one of {', '.join(SHAPES)}.")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    config = llama_config(shape, n_layer, seq_len)
    from lit_gpt import GPT

    state_dict = {k: v.to(device=device, dtype=dt) for k, v in GPT(config).state_dict().items()}
    x = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    lora = AdapterConfig(method="lora", r=lora_r, alpha=2 * lora_r, targets=["query", "value"])

    def ours(kind):
        model = apply_adapters(lit_model(config, dict(state_dict), device), lora).to(device)
        if kind is not None:
            quantize_model(model, kind)
        return model

    sides = {"ours, unquantized": ours(None)}
    sides.update({f"ours, --quantize {kind}": ours(kind) for kind in ("nf4", "nf4-dq", "int8")})
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers

        from lit_gpt.convert_hf import config_to_hf, lit_to_hf_state_dict

        hf_config = transformers.LlamaConfig(**config_to_hf(config))
        hf_state = {k: v.to(device=device, dtype=dt) for k, v in lit_to_hf_state_dict(state_dict, config).items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sides["PEFT + bitsandbytes NF4"] = peft_qlora(hf_config, hf_state, device, dt, lora_r)
    except ImportError as e:
        print(f"(no PEFT + bitsandbytes side: {e})")

    def step_fn(model, hf):
        def loss():
            logits = model(input_ids=x).logits if hf else model(x)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

        def step():
            loss().backward()
            model.zero_grad(set_to_none=True)
            sync(device)

        return loss, step

    rows = {}
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in sides.items():
            loss, step = step_fn(model, name.startswith("PEFT"))
            peak = None
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                peak = torch.cuda.max_memory_allocated() - base
            rows[name] = dict(rest=resting_bytes(model), saved=saved_bytes(model, loss), peak=peak)
            steps.append(step)
        times = interleaved_ms(steps, repeats, device=device)
    ref = rows["ours, unquantized"]
    table = ["| side | model at rest | ratio | kept for backward | ratio | step (ms) | ratio |"
             + (" step peak above rest |" if device.startswith("cuda") else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if device.startswith("cuda") else "")]
    for (name, row), ms in zip(rows.items(), times):
        line = (f"| {name} | {format_bytes(row['rest'])} | {row['rest'] / ref['rest']:.2f} | "
                f"{format_bytes(row['saved'])} | {row['saved'] / ref['saved']:.2f} | {ms:.0f} | {ms / times[0]:.2f} |")
        if row["peak"] is not None:
            line += f" {format_bytes(row['peak'])} |"
        table.append(line)
    setup = (f"Llama-shaped `{shape}` ({n_layer} blocks, width {config.n_embd}), random weights; LoRA r {lora_r} on "
             f"query and value; batch {batch} × {seq_len} tokens; {dtype} on {device}, {threads} threads; "
             f"{repeats} interleaved steps per side, medians; torch {torch.__version__}, {machine()}")
    report_table(f"bench/quantize.py {device} {dtype}", "QLoRA: frozen weights in NF4 / int8 (`bench/quantize.py`)",
                 setup, table, write)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
