"""Argument groups shared by every finetune entrypoint (`--io.*`, `--train.*`, `--eval.*` on the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class IOArgs:
    """Where data, the base checkpoint, logs and outputs live."""

    train_data_dir: Path = Path("data/alpaca")
    """Directory with `train.pt` made by a `scripts/prepare_*.py` script."""
    val_data_dir: Optional[Path] = None
    """Directory with `test.pt` for validation (default: `train_data_dir`)."""
    checkpoint_dir: Optional[Path] = None
    """Base model checkpoint (default: the parent of `train_data_dir`, where prepare scripts put their output)."""
    log_dir: Path = Path("logs")
    """Parent directory of run directories."""
    out_dir: Optional[Path] = None
    """This run's directory (default: a readable name under `log_dir` built from the method and its settings)."""


@dataclass
class TrainArgs:
    """Optimisation hyperparameters."""

    learning_rate: float = 1e-3
    global_batch_size: int = 16
    """Samples per optimizer step, over all devices (gradient accumulation makes up the difference)."""
    micro_batch_size: int = 1
    """Samples per forward pass on one device."""
    epochs: int = 1
    epoch_size: Optional[int] = None
    """Samples per epoch (default: the size of the training set)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs × epoch_size)."""
    lr_warmup_steps: int = 100
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_norm: Optional[float] = None
    """Clip the gradient norm to this value (None: no clipping)."""
    max_seq_length: Optional[int] = None
    """Truncate samples to this many tokens (default: the longest sample, capped by the model's block size)."""
    save_interval: int = 1000
    """Write a resumable checkpoint every this many optimizer steps."""
    log_interval: int = 1
    """Log metrics every this many optimizer steps."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (less memory, ~30% more compute)."""

    def gradient_accumulation_iters(self, devices: int) -> int:
        per_step = self.micro_batch_size * devices
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--train.global_batch_size {self.global_batch_size} must be a multiple of "
                f"--train.micro_batch_size × devices = {self.micro_batch_size} × {devices}."
            )
        return self.global_batch_size // per_step


@dataclass
class EvalArgs:
    """Periodic validation."""

    interval: int = 100
    """Validate every this many optimizer steps (0: only at the end)."""
    max_iters: int = 100
    """Validation micro-batches per evaluation."""
    max_new_tokens: int = 100
    """Length of the sample generation printed at each validation (0: no sample)."""
