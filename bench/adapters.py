"""Speed and memory of every adapter method against the frozen floor, a weight-centric ETHER and HF PEFT.

One run measures, on one random Llama-shaped model (the same weights everywhere):

* ``floor``: forward + backward to the activations only (the input embeddings require grad, every weight is
  frozen): what any adapter must pay at least;
* our ``ether``, ``etherplus``, ``etherplusHH`` (nb blocks), ``oft`` (block size, upper-triangle storage as PEFT;
  exact Cayley, and the 5-term Cayley–Neumann series PEFT uses by default), ``lora`` (rank r) and ``dora`` (LoRA
  with DoRA's magnitudes); ``ether`` also
  with the opt-in low-rank form on the fused QKV (`AdaptedLinear.fused_low_rank`);
* ``ether weight-centric``: the same ETHER parameters, but forming `W H` every step as the authors' code does
  (here block-diagonal as the paper writes it), which also forces a weight-gradient GEMM;
* with transformers + peft installed: transformers' ``LlamaForCausalLM`` (its own floor) with PEFT's LoRA, OFT and
  HRA (a chain of r Householder reflections, also formed as a weight every step), and LoRA with ``use_dora``.

for two target sets: query + value, and all linear layers of the blocks (q, k, v, o, gate, up, down; not the head).
Steps are interleaved (every variant once per round, the order alternating between rounds) and each variant's
ratio to the floor of its own framework is taken per round, then the median over rounds is reported.

Memory is measured device-independently as the bytes a step keeps for backward: every tensor saved by autograd
(`torch.autograd.graph.saved_tensors_hooks`, distinct storages, model weights excluded; a transformed weight `W'`
kept for backward counts) plus the gradients of the trainable parameters. On CUDA the peak allocated memory of
the step above the resting model is reported as well.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable, Optional
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import command_line, machine, saved_bytes, sync, write_section  # noqa: E402
from lit_gpt import GPT, Config, recompute  # noqa: E402
from lit_gpt.adapters import (  # noqa: E402
    AdaptedLinear, AdapterConfig, adapted_layers, apply_adapters, cpu_kernel, gpu_kernel,
)
from lit_gpt.adapters.ether import HouseholderTransform  # noqa: E402
from lit_gpt.adapters.lora import LoRAAdapter  # noqa: E402

SHAPES = {
    # a Llama scaled down so a CPU run takes minutes: Llama-2's MLP ratio and head size 64; the vocabulary is cut
    # to 4096 so that the output head is ~8% of the floor's multiply-adds, near its ~2% share in Llama-2-7B (a
    # 32000-word head on this width would be 40% of the floor and hide the adapters' cost behind it)
    "small": dict(n_embd=1024, n_head=16, intermediate_size=2752, vocab_size=4096),
    # Llama-2-7B's layer shapes (use fewer layers than its 32)
    "llama2-7b": dict(n_embd=4096, n_head=32, intermediate_size=11008, vocab_size=32000),
    # SmolLM2-135M, the quickstart's model (use --n_layer 30 for all of it): blocks of 18 and 48 at nb 32
    "smollm2-135m": dict(n_embd=576, n_head=9, n_query_groups=3, intermediate_size=1536, vocab_size=49152),
    # for smoke tests of this script
    "tiny": dict(n_embd=64, n_head=4, intermediate_size=192, vocab_size=256),
}
TARGET_SETS = {
    "qv": (["query", "value"], ["q_proj", "v_proj"]),
    "all": (["all-linear"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


# ---------------------------------------------------------------------------------------------------------------
# the weight-centric ETHER the reference code implies: W' = W H formed every step
# ---------------------------------------------------------------------------------------------------------------
def make_weight_centric(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.forward = _weight_centric_forward(layer)


def _weight_centric_forward(layer: AdaptedLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        W = layer.base_weight()
        parts = []
        for name, lo, hi in layer.slices:
            Ws = W[lo:hi]
            if name in layer.adapters:
                H = layer.adapters[name].input.blocks().to(W.dtype)  # (nb, k, k), differentiable
                Ws = torch.einsum("mik,ikl->mil", Ws.reshape(hi - lo, H.shape[0], H.shape[1]), H).reshape(Ws.shape)
            parts.append(Ws)
        return F.linear(x, torch.cat(parts) if len(parts) > 1 else parts[0], layer.bias)

    return forward


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------
def make_step(model: nn.Module, hf: bool, x: torch.Tensor, y: torch.Tensor, device: str) -> Callable[[], None]:
    def step() -> None:
        with path_of(model):
            logits = model(input_ids=x).logits if hf else model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
            loss.backward()
        model.zero_grad(set_to_none=True)
        sync(device)

    return step


def path_of(model: nn.Module):
    """The eager variants run the Householder update without the fused kernels (`cpu_kernel`, `gpu_kernel`); the
    `inputs kept` ones keep every adapted layer's input instead of rebuilding norm outputs and the MLP product in
    backward (`lit_gpt.recompute`); the `projections keep ...` one runs ETHER+HH's output sides of the projections
    into the residual stream the other way than the device's default (keeping the layer's input or its output,
    `HouseholderTransform.output_side_keeps_input` / `cpu_output_side_keeps_input`); `per slice` LoRA adds each
    slice's product as its own autograd node, as before `_LoRALinear`."""
    stack = contextlib.ExitStack()
    if getattr(model, "bench_eager", False):
        stack.enter_context(cpu_kernel.disabled())
        stack.enter_context(gpu_kernel.disabled())
    if getattr(model, "bench_keep_inputs", False):
        stack.enter_context(recompute.disabled())
    if getattr(model, "bench_other_output_side", False):
        attr = "output_side_keeps_input" if model.bench_device == "cuda" else "cpu_output_side_keeps_input"
        stack.enter_context(mock.patch.object(HouseholderTransform, attr, not getattr(HouseholderTransform, attr)))
    if getattr(model, "bench_per_slice", False):  # LoRA's products added per slice, not one node per layer
        stack.enter_context(mock.patch.object(LoRAAdapter, "linear_slices", staticmethod(lambda *args: None)))
    return stack


def embeddings_require_grad(embedding: nn.Module) -> None:
    """The floor's rule for everyone: backward runs down to the input embeddings, whose table stays frozen."""
    embedding.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_())


def llama_config(shape: str, n_layer: int, seq_len: int) -> Config:
    """A Llama-style `Config` of one of `SHAPES` (RMSNorm, SwiGLU MLP, no biases)."""
    dims = SHAPES[shape]
    return Config(
        name=f"bench-{shape}", block_size=max(seq_len, 256), vocab_size=dims["vocab_size"],
        padded_vocab_size=dims["vocab_size"], n_layer=n_layer, n_head=dims["n_head"], n_embd=dims["n_embd"],
        n_query_groups=dims.get("n_query_groups", dims["n_head"]),
        intermediate_size=dims["intermediate_size"], norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
        bias=False, norm_eps=1e-5,
    )


# ---------------------------------------------------------------------------------------------------------------
# models sharing one set of weights
# ---------------------------------------------------------------------------------------------------------------
def lit_model(config: Config, state_dict: dict, device: str) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state_dict, assign=True)  # shares the tensors: one copy of the weights for all variants
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings_require_grad(model.transformer.wte)
    return model.train()


def hf_model(hf_config, state_dict: dict, device: str):
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(state_dict, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config).to(device)  # non-persistent buffers
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings_require_grad(model.get_input_embeddings())
    return model.train()


def main(
    device: str = "cpu",
    dtype: str = "float32",
    shape: str = "small",
    n_layer: int = 4,
    batch_size: int = 4,
    seq_len: int = 256,
    repeats: int = 5,
    quick: bool = False,
    threads: Optional[int] = None,
    nb: int = 32,
    oft_block_size: int = 32,
    lora_r: int = 8,
    hra_r: int = 8,
    peft: bool = True,
    targets: list[str] = ["qv", "all"],
    only: Optional[list[str]] = None,
    write_docs: bool = False,
) -> None:
    """Time a training step (forward + backward) of every adapter method against the frozen floor.

    Args:
        device: "cpu" or "cuda".
        dtype: "float32" or "bfloat16" (weights, adapters and activations).
        shape: "small" (width 1024, MLP 2752, 16 heads, vocab 4096), "llama2-7b" (width 4096, MLP 11008,
            32 heads, vocab 32000), "smollm2-135m" (width 576, MLP 1536, 9 heads in 3 groups, vocab 49152; 30
            layers in the real model) or "tiny" (width 64, for smoke tests).
        n_layer: Transformer blocks.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        repeats: Interleaved timed rounds (after one warm-up round).
        quick: A run of a few minutes on two CPU cores: 2 layers, batch 2, 2 rounds (overrides those arguments).
        threads: torch intra-op threads (default: torch's choice); set once for every variant.
        nb: Blocks of the ETHER family.
        oft_block_size: OFT block size (ours and PEFT's).
        lora_r: LoRA rank (alpha = 2 r), ours and PEFT's.
        hra_r: PEFT HRA's number of reflections.
        peft: Also measure transformers + PEFT when they are installed.
        targets: Target sets: "qv" (query + value) and/or "all" (every linear layer of the blocks).
        only: Measure only the variants whose label contains one of these strings (the floors always run).
        write_docs: Replace (or add) this benchmark's section of docs/benchmarks.md with the results.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if quick:
        n_layer, batch_size, repeats = 2, 2, 2
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    command = command_line()
    print(f"$ {command}")
    torch.manual_seed(0)

    have_peft = False
    if peft:
        try:
            import peft as peft_lib
            import transformers

            have_peft = True
        except ImportError:
            print("transformers/peft not installed: measuring ours only")

    config = llama_config(shape, n_layer, seq_len)
    with torch.device(device):
        base = GPT(config).to(torch_dtype)
    lit_sd = base.state_dict()
    hf_sd = hf_config = None
    if have_peft:
        from lit_gpt.convert_hf import config_to_hf, lit_to_hf_state_dict

        hf_config = transformers.LlamaConfig(**config_to_hf(config))
        hf_config._attn_implementation = "sdpa"
        hf_sd = lit_to_hf_state_dict(lit_sd, config)
    del base

    x = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)

    # (label, framework, build) per variant; the floors are shared by both target sets
    variants: list[tuple[str, str, str, Callable[[], nn.Module]]] = [
        ("floor", "lit", "", lambda: lit_model(config, lit_sd, device))
    ]
    if have_peft:
        variants.append(("transformers floor", "hf", "", lambda: hf_model(hf_config, hf_sd, device)))

    def ours(
        cfg: AdapterConfig, weight_centric: bool = False, low_rank: bool = False, eager: bool = False,
        keep_inputs: bool = False, per_slice: bool = False, other_output_side: bool = False,
    ) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = apply_adapters(lit_model(config, lit_sd, device), cfg)
            model.bench_eager, model.bench_keep_inputs, model.bench_per_slice = eager, keep_inputs, per_slice
            model.bench_other_output_side, model.bench_device = other_output_side, device
            if weight_centric:
                make_weight_centric(model)
            for _, layer in adapted_layers(model):
                layer.fused_low_rank = low_rank
            return model

        return build

    def theirs(make_cfg: Callable[[], object]) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = peft_lib.get_peft_model(hf_model(hf_config, hf_sd, device), make_cfg())
            return model.to(device)

        return build

    for tset in targets:
        lit_targets, hf_targets = TARGET_SETS[tset]
        variants += [
            (f"ether nb{nb}", "lit", tset, ours(AdapterConfig(method="ether", nb=nb, targets=lit_targets))),
            (f"etherplus nb{nb}", "lit", tset, ours(AdapterConfig(method="etherplus", nb=nb, targets=lit_targets))),
            (f"etherplusHH nb{nb}", "lit", tset,
             ours(AdapterConfig(method="etherplusHH", nb=nb, targets=lit_targets))),
        ]
        if (cpu_kernel if device == "cpu" else gpu_kernel).available():
            # the same three without the fused kernel (C on the CPU, Triton on the GPU): what it buys
            variants += [
                (f"{m} nb{nb} eager", "lit", tset,
                 ours(AdapterConfig(method=m, nb=nb, targets=lit_targets), eager=True))
                for m in ("ether", "etherplus", "etherplusHH")
            ]
        if "projection" in lit_targets or "all-linear" in lit_targets:
            keeps = HouseholderTransform.output_side_keeps_input if device == "cuda" else (
                HouseholderTransform.cpu_output_side_keeps_input)
            variants.append((f"etherplusHH nb{nb} projections keep {'outputs' if keeps else 'inputs'}", "lit", tset,
                             ours(AdapterConfig(method="etherplusHH", nb=nb, targets=lit_targets),
                                  other_output_side=True)))
        variants += [
            (f"etherplus nb{nb} inputs kept", "lit", tset,
             ours(AdapterConfig(method="etherplus", nb=nb, targets=lit_targets), keep_inputs=True)),
            (f"ether nb{nb} low-rank QKV", "lit", tset,
             ours(AdapterConfig(method="ether", nb=nb, targets=lit_targets), low_rank=True)),
            (f"ether nb{nb} weight-centric", "lit", tset,
             ours(AdapterConfig(method="ether", nb=nb, targets=lit_targets), weight_centric=True)),
            # upper-triangle storage: the parameters PEFT's OFT trains (the compute is the same as full blocks)
            (f"oft b{oft_block_size} exact", "lit", tset, ours(AdapterConfig(
                method="oft", block_size=oft_block_size, upper_triangle=True, targets=lit_targets))),
            (f"oft b{oft_block_size} neumann5", "lit", tset, ours(AdapterConfig(
                method="oft", block_size=oft_block_size, upper_triangle=True, neumann_terms=3, targets=lit_targets))),
            (f"lora r{lora_r}", "lit", tset,
             ours(AdapterConfig(method="lora", r=lora_r, alpha=2 * lora_r, targets=lit_targets))),
            (f"lora r{lora_r} per slice", "lit", tset,
             ours(AdapterConfig(method="lora", r=lora_r, alpha=2 * lora_r, targets=lit_targets), per_slice=True)),
            (f"dora r{lora_r}", "lit", tset,
             ours(AdapterConfig(method="lora", r=lora_r, alpha=2 * lora_r, targets=lit_targets, dora=True))),
        ]
        if have_peft:
            variants += [
                (f"peft lora r{lora_r}", "hf", tset, theirs(lambda t=hf_targets: peft_lib.LoraConfig(
                    r=lora_r, lora_alpha=2 * lora_r, target_modules=t, lora_dropout=0.0))),
                (f"peft dora r{lora_r}", "hf", tset, theirs(lambda t=hf_targets: peft_lib.LoraConfig(
                    r=lora_r, lora_alpha=2 * lora_r, target_modules=t, lora_dropout=0.0, use_dora=True))),
                (f"peft oft b{oft_block_size} exact", "hf", tset, theirs(lambda t=hf_targets: peft_lib.OFTConfig(
                    r=0, oft_block_size=oft_block_size, target_modules=t, use_cayley_neumann=False))),
                (f"peft oft b{oft_block_size} neumann5", "hf", tset, theirs(lambda t=hf_targets: peft_lib.OFTConfig(
                    r=0, oft_block_size=oft_block_size, target_modules=t, use_cayley_neumann=True,
                    num_cayley_neumann_terms=5))),
                (f"peft hra r{hra_r}", "hf", tset, theirs(lambda t=hf_targets: peft_lib.HRAConfig(
                    r=hra_r, target_modules=t))),
            ]

    if only:
        variants = [v for v in variants if not v[2] or any(o in v[0] for o in only)]
    print(f"building {len(variants)} variants of a {n_layer}-layer {shape} model ({dtype}, {device}) ...")
    built = []
    for label, fw, tset, build in variants:
        model = build()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        built.append((label, fw, tset, model, make_step(model, fw == "hf", x, y, device), trainable))

    # memory (this pass is also every variant's warm-up): bytes kept for backward + trainable grads; on CUDA also
    # the step's peak above the resting model
    memory, peak = {}, {}
    for label, fw, tset, model, step, _ in built:
        def forward_loss(model=model, fw=fw):
            logits = model(input_ids=x).logits if fw == "hf" else model(x)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

        with path_of(model):
            memory[(label, tset)] = saved_bytes(model, forward_loss)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resting = torch.cuda.memory_allocated()
            step()
            peak[(label, tset)] = torch.cuda.max_memory_allocated() - resting

    # time: in every round each variant runs next to a floor measurement of its own framework (F a b F c d F ...,
    # the order reversed every other round) and is divided by the mean of the floor steps just before and after
    # it, so slow drifts of a shared machine's load cancel; the median over rounds is reported. On the CPU the
    # process's CPU time is recorded as well (it does not count time the scheduler gave to other jobs).
    cpu_clock = not device.startswith("cuda")
    ratios: dict[str, dict[tuple[str, str], list[float]]] = {"wall": {}, "cpu": {}}
    wall_ms: dict[tuple[str, str], list[float]] = {}
    floor_noise: list[float] = []
    for r in range(repeats):
        for fw in ("lit", "hf"):
            fl = [b for b in built if b[1] == fw and b[2] == ""]
            if not fl:
                continue
            items = [b for b in built if b[1] == fw and b[2] != ""]
            if r % 2:
                items = items[::-1]
            seq = [fl[0]]
            for i in range(0, len(items), 2):
                seq += items[i:i + 2] + [fl[0]]
            meas = []
            for label, _, tset, _, step, _ in seq:
                c0, w0 = time.process_time(), time.perf_counter()
                step()
                meas.append(((label, tset), time.perf_counter() - w0, time.process_time() - c0))
            floor_pos = [i for i, m in enumerate(meas) if m[0] == (fl[0][0], "")]
            floors = [meas[i] for i in floor_pos]
            floor_noise += [abs(a[1] / b[1] - 1) for a, b in zip(floors, floors[1:])]
            for key in [(fl[0][0], "")] + [(b[0], b[2]) for b in items]:
                ratios["wall"].setdefault(key, [])
                ratios["cpu"].setdefault(key, [])
                wall_ms.setdefault(key, [])
            for f in floors:
                wall_ms[f[0]].append(f[1])
                ratios["wall"][f[0]].append(1.0)
                ratios["cpu"][f[0]].append(1.0)
            for i, (key, w, c) in enumerate(meas):
                if key == (fl[0][0], ""):
                    continue
                before = meas[max(p for p in floor_pos if p < i)]
                after = meas[min(p for p in floor_pos if p > i)]
                ratios["wall"][key].append(w / ((before[1] + after[1]) / 2))
                ratios["cpu"][key].append(c / ((before[2] + after[2]) / 2))
                wall_ms[key].append(w)
        print(f"round {r + 1}/{repeats} done")
    noise = statistics.median(floor_noise) if floor_noise else 0.0

    def floor_key(fw: str) -> tuple[str, str]:
        return ("floor", "") if fw == "lit" else ("transformers floor", "")

    rows = []
    for label, fw, tset, model, _, trainable in built:
        fl, key = floor_key(fw), (label, tset)
        row = dict(label=label, tset=tset or "-", trainable=trainable, ms=1e3 * statistics.median(wall_ms[key]),
                   ratio=statistics.median(ratios["wall"][key]), mem=memory[key] / 2**20,
                   mem_ratio=memory[key] / memory[fl])
        if cpu_clock:
            row["cpu_ratio"] = statistics.median(ratios["cpu"][key])
        if peak:
            row["peak"] = peak[key] / 2**20
            row["peak_ratio"] = peak[key] / peak[fl]
        rows.append(row)

    threads_used = torch.get_num_threads()
    setup = (
        f"{shape} Llama shape: {n_layer} layers, width {config.n_embd}, {config.n_head} heads, MLP "
        f"{config.intermediate_size}, vocab {config.vocab_size}; batch {batch_size} x {seq_len} tokens; {dtype} on "
        f"{device}, {threads_used} torch threads; {repeats} interleaved rounds after a warm-up; the floor's step time "
        f"moved by {100 * noise:.1f}% (median) between consecutive floor steps"
    )
    env = f"torch {torch.__version__}, Python {platform.python_version()}, {machine()}"
    if have_peft:
        env += f", transformers {transformers.__version__}, peft {peft_lib.__version__}"
    header = ["variant", "targets", "trainable", "step ms", "time / floor"]
    if cpu_clock:
        header += ["CPU time / floor"]
    header += ["saved MiB", "memory / floor"]
    if peak:
        header += ["peak MiB", "peak / floor"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["label"], r["tset"], f"{r['trainable']:,}", f"{r['ms']:.0f}", f"{r['ratio']:.3f}"]
        if cpu_clock:
            cells += [f"{r['cpu_ratio']:.3f}"]
        cells += [f"{r['mem']:.0f}", f"{r['mem_ratio']:.3f}"]
        if peak:
            cells += [f"{r['peak']:.0f}", f"{r['peak_ratio']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    goals = goal_lines(rows, "cpu_ratio" if cpu_clock else "ratio", nb, oft_block_size, lora_r, noise)
    print(setup)
    print(env)
    print(table)
    print("ratios: ours against `floor`, peft against `transformers floor` (same weights, each framework's own)")
    print("\n".join(goals))

    if write_docs:
        kind = "cuda" if device.startswith("cuda") else "cpu"  # one section per device kind
        # a run of a subset (`--only`, e.g. more rounds of one family) gets a section of its own
        subset = f" ({', '.join(only)} only)" if only else ""
        section = (
            f"## Adapters on {kind.upper()}{subset}: step time and memory against the frozen floor "
            f"(`bench/adapters.py`)\n\n"
            f"Run on {date.today().isoformat()}: `{command}`\n\n{setup}. {env}.\n\n{table}\n\n"
            + table_notes(cpu_clock) + "\n\n"
            "Goals (checked by the script on the " + ("CPU-time" if cpu_clock else "wall-time") + " ratios):\n\n"
            + "\n".join(goals) + "\n\n" + WHERE_THE_TIME_GOES + "\n"
        )
        write_section(f"bench/adapters.py {kind}" + (" only " + " ".join(only) if only else ""), section)


def table_notes(cpu_clock: bool) -> str:
    """What the table's columns mean; the `CPU time / floor` sentence only where the table has that column (CPU runs;
    a CUDA run's ratios are wall time only)."""
    return (
        "`time / floor`: every variant runs next to a floor step of its own framework (ours: `floor`; PEFT: "
        "`transformers floor`, same weights) and its wall time is divided by the mean of the floor steps just "
        "before and after it; the median over rounds is shown. "
        + ("`CPU time / floor`: the same with the process's CPU time. " if cpu_clock else "")
        + "Differences smaller than the floor's own step-to-step movement (above) are noise. `saved MiB` "
        "is what a step keeps for backward (autograd's saved tensors, distinct storages, model weights excluded) "
        "plus the trainable parameters' gradients. `neumann5`: PEFT's `num_cayley_neumann_terms=5`, which is our "
        "`neumann_terms=3` (the series up to S^3)."
    )


def goal_lines(rows: list[dict], key: str, nb: int, oft_block_size: int, lora_r: int, noise: float) -> list[str]:
    """The brief's goals, checked against this run: the ETHER family within 5% of the floor with every linear layer
    adapted, and our OFT and LoRA no slower (relative to their own floor) than PEFT's. A verdict whose margin is
    smaller than the floor's own step-to-step movement is flagged as such."""
    by = {(r["label"], r["tset"]): r for r in rows}
    out = []

    def verdict(value: float, limit: float) -> str:
        v = "met" if value <= limit else "MISSED"
        return v + (f" (margin {abs(value - limit):.3f} < noise {noise:.3f})" if abs(value - limit) < noise else "")

    for m in ("ether", "etherplus", "etherplusHH"):
        r = by.get((f"{m} nb{nb}", "all"))
        if r:
            out.append(f"- {m} nb{nb}, all linear layers: {r[key]:.3f}x the floor (goal <= 1.05x): "
                       f"{verdict(r[key], 1.05)}")
    for tset in ("qv", "all"):
        for ours, theirs in ((f"oft b{oft_block_size} exact", f"peft oft b{oft_block_size} exact"),
                             (f"oft b{oft_block_size} neumann5", f"peft oft b{oft_block_size} neumann5"),
                             (f"lora r{lora_r}", f"peft lora r{lora_r}"),
                             (f"dora r{lora_r}", f"peft dora r{lora_r}")):
            a, b = by.get((ours, tset)), by.get((theirs, tset))
            if a and b:
                out.append(f"- {ours} ({tset}): {a[key]:.3f}x vs PEFT's {b[key]:.3f}x of their floors "
                           f"(goal: no slower): {verdict(a[key], b[key])}")
    return out


WHERE_THE_TIME_GOES = (
    "Where the time goes. The floor is almost all GEMMs. The ETHER family adds element-wise work on the "
    "activations, O(d) per token and per block vector: a dot product per block and an update in forward, the same "
    "on the gradient plus the vector's gradient (a sum over tokens) in backward. On the CPU these run in one fused "
    "C loop (`lit_gpt/adapters/cpu_kernel.py`, built once with the system compiler): one read of the activations "
    "and one write in forward, two reads and one write in backward, the dot products and the update of a block "
    "done while its values are in cache. An adapted layer is one autograd node (`_GroupedLinear`): its "
    "transformed input and the transform of its output gradient live in a reused workspace (a fresh tensor per "
    "layer would cost the allocator's page faults every step), span GEMMs write into one output, input gradients "
    "add up in one buffer, and ETHER+HH's output side runs in the same node, except on the MLP's fc_1 and fc_2: "
    "their output-side transforms run with the SiLU and the product in one node (`_SwiGLUOutputs`), a row at a "
    "time, so the MLP's widest activations are visited once each way instead of once per transform and PyTorch "
    "operation. On a GPU the same work runs in Triton "
    "kernels (`gpu_kernel.py`: one launch forward, one backward plus a small one that adds up the vector "
    "gradient's partial sums). The `eager` "
    "rows are the same adapters without the fused kernels (several passes of PyTorch operations, over cache-sized "
    "token chunks on the CPU; the path CPU bfloat16 takes). ETHER+ has two vectors "
    "per block; ETHER+HH has two per block on both sides of every adapted layer, and its output sides include the "
    "MLP's intermediate width, so it does about 2.2 times ETHER+'s element-wise work. The weight-centric form forms "
    "`W H` every step, pays a full weight-gradient GEMM per adapted layer and keeps `W H` alive for backward; "
    "PEFT's HRA builds its weight from r reflections the same way. OFT's extra cost is its `k x k` block matmul "
    "(`k/m` of a layer's multiply-adds) and its blocks, one batch of small inverses per adapted layer and step "
    "(exact Cayley as `2 (I - S)^-1 - I`, whose backward is two small products instead of a second solve; on the "
    "CPU by elimination in C, `cpu_kernel.cayley`, a few times faster than LAPACK one matrix at a time); the block "
    "matmul is a C kernel too (`cpu_kernel.oft_forward` / `oft_backward`: it reads the rows where they lie, "
    "where PyTorch's batched matmul works on permuted copies, and backward takes the input gradient and the "
    "block gradient in one pass), and an adapted layer is one node (`_OFTLinear`) as for the ETHER family. "
    "LoRA's extra cost is a few skinny GEMMs; its backward takes them as `(r x tokens)` and `(r x out)` products "
    "(`bench/lora_shapes.py`: MKL runs the other forms 1.4-12 times slower). "
    "Memory: a transform on a layer's input needs that input for its gradient (the frozen GEMM alone keeps "
    "nothing). Where the input is a norm's output or the MLP's product, it keeps instead what the norm and the "
    "product keep anyway (the norm's float32 input and `1/rms`; `silu(a)` and `b`) and rebuilds the input in "
    "backward (`lit_gpt/recompute.py`; the C kernel makes each block of it from those tensors where it reads it, "
    "so no pass rebuilds it; the `inputs kept` row keeps the inputs instead: what that saves and costs); "
    "attention's output, the input of its projection, is a view of what the attention kernel keeps for its own "
    "backward. So ETHER, ETHER+, OFT and LoRA keep about what the floor keeps. A transform on a layer's output "
    "(ETHER+HH) updates the GEMM output in place and keeps the result, from which backward rebuilds its input: "
    "attention keeps the fused QKV output and the MLP's product keeps fc_1's and fc_2's anyway, so only the two "
    "projections into the residual stream (attention's output, the MLP's down projection) cost an activation each. "
    "Those two can keep their input instead (kept anyway), taking the vector gradient's sum over tokens `sum_t d_t "
    "z_t` as `W (sum_t d_t x'_t)`: a product with `2 nb` rows over the tokens and one that reads `W` once, about "
    "6% of the layer's GEMM. By default they do on the GPU (`HouseholderTransform.output_side_keeps_input`), "
    "where memory is short, and not on the CPU (`cpu_output_side_keeps_input`); the `projections keep ...` row "
    "runs them the other way: what that saves and costs."
)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
