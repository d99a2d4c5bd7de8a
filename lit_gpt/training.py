"""The one training loop behind `finetune/ether.py`, `finetune/lora.py` and `finetune/full.py`.

Reads top to bottom: `finetune()` sets up Fabric, the model and the data, then `fit()` runs the optimisation.
Everything a run needs to continue after a crash (adapter or weights, optimizer, scheduler, step, data position, RNG)
goes into one atomically written file per checkpoint, so `--resume auto` picks up the newest complete one.
"""

from __future__ import annotations

import math
import os
import random
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import yaml

from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.config import Config
from lit_gpt.model import GPT, Block
from lit_gpt.utils import atomic_save, atomic_write_text, check_checkpoint_dir, load_file, load_model_weights, num_parameters

HPARAMS_FILENAME = "hyperparameters.yaml"
CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pth$")


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- setup helpers
def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def precision_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16-true"):
        return torch.bfloat16
    if precision.startswith("16-true"):
        return torch.float16
    return torch.float32


def check_devices(devices: int) -> None:
    """Fail in one sentence when `--devices` asks for more GPUs than this machine has (Fabric would fail later, in a
    traceback); without a GPU the processes run on the CPU, as many as asked."""
    if devices < 1:
        raise ValueError(f"--devices {devices}: pass the number of processes per machine, 1 or more.")
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(
            f"--devices {devices} asks for more GPUs than this machine has ({n}); pass --devices {n} or fewer "
            f"(to run {devices} processes on the CPU instead, hide the GPUs with CUDA_VISIBLE_DEVICES=)."
        )


def build_fabric(devices: int, num_nodes: int, precision: str, out_dir: Path, activation_checkpointing: bool):
    """A Fabric for one device, or FSDP2 (`fully_shard` per block) through `ModelParallelStrategy` for several."""
    import lightning as L
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(root_dir=out_dir, name="logs", version="")]
    try:
        loggers.append(TensorBoardLogger(root_dir=out_dir, name="tensorboard", version=""))
    except ModuleNotFoundError:  # tensorboard is in requirements.txt; a stripped install still trains
        pass
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if devices * num_nodes > 1:
        from lightning.fabric.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            parallelize_fn=shard_model, data_parallel_size=devices * num_nodes, tensor_parallel_size=1
        )
    else:
        strategy = "auto"
    return L.Fabric(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
        loggers=loggers,
    )


def shard_model(model: nn.Module, device_mesh) -> nn.Module:
    """FSDP2: every transformer block is its own unit; embeddings, final norm and head stay with the root."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def resolve_io(io: IOArgs, run_name: str) -> IOArgs:
    io.val_data_dir = io.val_data_dir or io.train_data_dir
    io.checkpoint_dir = io.checkpoint_dir or io.train_data_dir.parent
    io.out_dir = io.out_dir or io.log_dir / run_name
    return io



# ---------------------------------------------------------------------------------------------- learning rate
def lr_lambda(warmup_steps: int, max_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------- checkpoints
def trainable_state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
    """Full (unsharded) trainable parameters and optimizer state on the CPU; identical on every rank's call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    if optimizer is None:
        msd, osd = get_model_state_dict(model, options=opts), None
    else:
        msd, osd = get_state_dict(model, optimizer, options=opts)
    # ignore_frozen_params still reports a frozen parameter shared by two modules (tied embeddings): keep only the
    # names, aliases included, of parameters that are trained
    trained = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trained}, osd


def load_trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model, optimizer, model_state_dict=msd, optim_state_dict=osd,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_resume_checkpoint(out_dir: Path) -> Optional[Path]:
    ckpt_dir = out_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step-*.pth") if (m := CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------------------------- entry
def targets_from_flags(**flags: bool) -> list[str]:
    targets = [name for name, on in flags.items() if on]
    if not targets:
        raise ValueError("No layer is adapted: enable at least one of " + ", ".join(f"--*_{n}" for n in flags) + ".")
    return targets


def run_entrypoint(method: str, adapter_config: Optional[Any], args: dict) -> Optional[Path]:
    """What every `finetune/*.py` does with its parsed flags: plan (`--dry_run`) or train."""
    if args["dry_run"]:
        from lit_gpt.adapters import plan_report

        model = args["model_name"]
        if model is None:  # plan for the checkpoint the run would train
            io = args["io"]
            model = Config.from_checkpoint(io.checkpoint_dir or io.train_data_dir.parent)
        print(plan_report(model, adapter_config, args["precision"] or default_precision()))
        return None
    cli_args = {k: v for k, v in args.items() if k not in ("io", "train", "eval", "adapter", "targets", "extra")}
    cli_args.update(train=asdict(args["train"]), eval=asdict(args["eval"]))
    return finetune(
        method=method, adapter_config=adapter_config, io=args["io"], train=args["train"], eval=args["eval"],
        precision=args["precision"], devices=args["devices"], num_nodes=args["num_nodes"], seed=args["seed"],
        resume=args["resume"], cli_args=cli_args,
    )


def finetune(
    *,
    method: str,
    adapter_config: Optional[Any],
    io: IOArgs,
    train: TrainArgs,
    eval: EvalArgs,
    precision: Optional[str],
    devices: int,
    num_nodes: int,
    seed: int,
    resume: str | bool,
    cli_args: dict,
) -> Path:
    """Fine-tune the checkpoint in `io.checkpoint_dir` with `adapter_config` (None: every weight) and return the run dir."""
    from lit_gpt.adapters import apply_adapters, save_adapters

    from lit_gpt.data import SFTDataset
    from lit_gpt.tokenizer import Tokenizer

    # every input is checked before any process is launched, so a typo costs seconds, not a cluster allocation
    io = resolve_io(io, run_name(method, adapter_config, train))
    check_checkpoint_dir(io.checkpoint_dir)
    tokenizer = Tokenizer(io.checkpoint_dir)
    train_data = SFTDataset.from_dir(io.train_data_dir, "train")
    val_data = SFTDataset.from_dir(io.val_data_dir, "test")
    config = Config.from_checkpoint(io.checkpoint_dir)
    check_devices(devices)
    train.gradient_accumulation_iters(devices * num_nodes)
    if adapter_config is not None:  # an nb that does not divide a width fails here, on the meta device, in ms
        with torch.device("meta"):
            apply_adapters(GPT(config), adapter_config)
    precision = precision or default_precision()
    out_dir = Path(io.out_dir)
    fabric = build_fabric(devices, num_nodes, precision, out_dir, train.activation_checkpointing)
    fabric.launch()
    fabric.seed_everything(seed)

    hparams = dict(cli_args, method=method, precision=precision,
                   adapter_config=adapter_config.to_dict() if adapter_config is not None else None,
                   io={k: str(v) if v is not None else None for k, v in asdict(io).items()},
                   base_checkpoint_dir=str(io.checkpoint_dir))
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / HPARAMS_FILENAME, yaml.safe_dump(_plain(hparams), sort_keys=False))

    # model: loaded on the CPU straight into the training dtype (memory-mapped, one copy), adapted, then sharded
    with torch.device("meta"):
        model = GPT(config)
    load_model_weights(model, io.checkpoint_dir / "lit_model.pth", dtype=precision_dtype(precision))
    if adapter_config is not None:
        apply_adapters(model, adapter_config)
    model.activation_checkpointing = train.activation_checkpointing
    fabric.print(
        f"trainable parameters: {num_parameters(model, requires_grad=True):,}  "
        f"frozen: {num_parameters(model, requires_grad=False):,}"
    )
    model = fabric.setup_module(model)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=train.learning_rate, weight_decay=train.weight_decay, betas=(train.beta1, train.beta2)
    )
    optimizer = fabric.setup_optimizers(optimizer)

    steps = total_steps(train, len(train_data))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(train.lr_warmup_steps, steps, train.min_lr / train.learning_rate)
    )

    state = {"step": 0, "data": None}
    ckpt = None
    if resume not in (False, None, "false", "False", ""):
        ckpt = find_resume_checkpoint(out_dir) if str(resume) == "auto" else Path(resume)
        if ckpt is None:
            fabric.print(f"--resume auto: no checkpoint in {out_dir / 'checkpoints'}, starting from step 0.")
    if ckpt is not None:
        saved = load_file(ckpt, mmap=False)
        load_trainable_state(model.module, optimizer.optimizer, saved["model"], saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state["step"] = saved["step"]
        state["data"] = saved["data"]
        set_rng_state(saved["rng"])
        fabric.print(f"Resumed from {ckpt} at step {state['step']}.")

    def save_checkpoint(step: int, data_state: dict) -> Path:
        msd, osd = trainable_state_dict(model.module, optimizer.optimizer)
        path = out_dir / "checkpoints" / f"step-{step:06d}.pth"
        if fabric.global_rank == 0:
            atomic_save({"model": msd, "optimizer": osd, "scheduler": scheduler.state_dict(), "step": step,
                         "data": data_state, "rng": rng_state(), "method": method}, path)
        fabric.barrier()
        return path

    status = "failed"
    try:
        fit(fabric, model, optimizer, scheduler, train_data, val_data, tokenizer, train, eval, state, steps, seed,
            save_checkpoint, pad_id=0)
        status = "success"
    finally:  # flush the CSV/TensorBoard logs whatever happened, so a failed run still shows its curves
        for logger in fabric.loggers:
            logger.finalize(status)

    # the final artefact: the adapter (or the full weights) as a standalone file
    final = out_dir / final_filename(method)
    msd, _ = trainable_state_dict(model.module)
    if fabric.global_rank == 0:
        if adapter_config is not None:
            save_adapters(model.module, final, state_dict=msd)
        else:
            atomic_save(msd, final)
        fabric.print(f"Saved {final}")
    fabric.barrier()
    return out_dir


def total_steps(train: TrainArgs, n_samples: int) -> int:
    if train.max_steps:
        return train.max_steps
    epoch_size = train.epoch_size or n_samples
    return max(1, (train.epochs * epoch_size) // train.global_batch_size)


def final_filename(method: str) -> str:
    if method == "full":
        return "lit_model_finetuned.pth"
    family = "lora" if method == "lora" else "ether"
    return f"lit_model_{family}_finetuned.pth"


def run_name(method: str, adapter_config: Optional[Any], train: TrainArgs) -> str:
    parts = [method]
    if adapter_config is not None:
        if method == "lora":
            parts.append(f"r{adapter_config.r}")
        else:
            parts.append(f"nb{adapter_config.nb}")
        parts.append("-".join(adapter_config.targets))
        if getattr(adapter_config, "flip_side", False):
            parts.append("flip")
    parts += [f"lr{train.learning_rate:g}", f"bs{train.global_batch_size}"]
    return "_".join(parts)


def _plain(obj: Any) -> Any:
    """YAML-safe copy: paths and other objects become strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# ---------------------------------------------------------------------------------------------- the loop
def fit(fabric, model, optimizer, scheduler, train_data, val_data, tokenizer, train: TrainArgs, eval: EvalArgs,
        state: dict, steps: int, seed: int, save_checkpoint, pad_id: int) -> None:
    from lit_gpt.data import MicroBatchLoader

    accum = train.gradient_accumulation_iters(fabric.world_size)
    max_len = min(train.max_seq_length or model.module.config.block_size, model.module.config.block_size)
    # the longest micro-batch comes first, so an out-of-memory error shows at step 1 rather than hours in
    loader = MicroBatchLoader(
        train_data, train.micro_batch_size, seed=seed, rank=fabric.global_rank, world_size=fabric.world_size,
        pad_id=pad_id, max_seq_length=max_len, longest_first=True,
    )
    if state["data"] is not None:
        loader.load_state_dict(state["data"])
    batches = iter(loader)
    progress = _progress(fabric, state["step"], steps)
    last_good = None
    model.train()
    while state["step"] < steps:
        t0 = time.perf_counter()
        loss_sum, tokens = torch.zeros((), device=fabric.device), 0
        for i in range(accum):
            batch = next(batches)
            input_ids, labels = batch["input_ids"].to(fabric.device), batch["labels"].to(fabric.device)
            with fabric.no_backward_sync(model, enabled=i < accum - 1):
                loss = model(input_ids, labels=labels)
                fabric.backward(loss / accum)
            loss_sum += loss.detach()
            tokens += input_ids.numel()
        if train.max_norm:
            fabric.clip_gradients(model, optimizer, max_norm=train.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] += 1
        step = state["step"]

        loss_val = fabric.all_reduce(loss_sum / accum).item()
        if not math.isfinite(loss_val):
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"The training loss became {loss_val} at step {step}; {where}. Lower --train.learning_rate or "
                f"set --train.max_norm, then resume from that checkpoint with --resume."
            )
        dt = time.perf_counter() - t0
        metrics = {"loss": loss_val, "lr": scheduler.get_last_lr()[0], "step_time": dt,
                   "tokens_per_sec": tokens * fabric.world_size / dt, "step": step}
        if step % train.log_interval == 0 or step == steps:
            fabric.log_dict(metrics, step=step)
        progress.update(metrics)

        if eval.interval and step % eval.interval == 0 and step < steps:
            validate_and_log(fabric, model, val_data, tokenizer, eval, max_len, pad_id, step, progress)
        if step % train.save_interval == 0 and step < steps:
            last_good = save_checkpoint(step, loader.state_dict())
    validate_and_log(fabric, model, val_data, tokenizer, eval, max_len, pad_id, steps, progress)
    progress.close()


@torch.no_grad()
def validate(fabric, model, val_data, eval: EvalArgs, max_len: int, pad_id: int, micro_batch_size: int = 1) -> float:
    from lit_gpt.data import collate

    model.eval()
    n = min(len(val_data), eval.max_iters * fabric.world_size)
    total = torch.zeros((), device=fabric.device)
    count = torch.zeros((), device=fabric.device)
    for j in range(fabric.global_rank, n, fabric.world_size):
        batch = collate([val_data[j]], pad_id=pad_id, max_seq_length=max_len)
        total += model(batch["input_ids"].to(fabric.device), labels=batch["labels"].to(fabric.device))
        count += 1
    model.train()
    total, count = fabric.all_reduce(total, reduce_op="sum"), fabric.all_reduce(count, reduce_op="sum")
    return (total / count.clamp(min=1)).item()


def validate_and_log(fabric, model, val_data, tokenizer, eval, max_len, pad_id, step, progress) -> None:
    val_loss = validate(fabric, model, val_data, eval, max_len, pad_id)
    fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=step)
    progress.write(f"step {step}: val loss {val_loss:.4f}")
    if eval.max_new_tokens > 0 and len(val_data):
        sample = sample_generation(fabric, model, val_data[0], tokenizer, eval.max_new_tokens)
        progress.write(f"sample: {sample!r}")


@torch.no_grad()
def sample_generation(fabric, model, row: dict, tokenizer, max_new_tokens: int) -> str:
    """Greedy answer to the first validation prompt (every rank runs it: sharded weights are gathered per block)."""
    from lit_gpt.generate import generate

    prompt = row["input_ids"][: int((row["labels"] == -100).sum())] if "labels" in row else row["input_ids"]
    module = model.module
    model.eval()
    out = generate(model, prompt.to(fabric.device), max_new_tokens, temperature=0.0, stop_tokens=[[i] for i in tokenizer.stop_ids])
    module.clear_kv_cache()
    model.train()
    return tokenizer.decode(out[len(prompt):])


class _progress:
    """tqdm on rank 0 with loss, tokens/s and ETA; a no-op elsewhere."""

    def __init__(self, fabric, start: int, total: int) -> None:
        self.bar = None
        if fabric.global_rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=os.environ.get("LIT_GPT_NO_PROGRESS") == "1")

    def update(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_sec']:.0f}", refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
