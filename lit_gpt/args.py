"""Argument groups shared by every finetune entrypoint (`--io.*`, `--train.*`, `--eval.*` on the command line)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class IOArgs:
    """Where data, the base checkpoint, logs and outputs live."""

    train_data_dir: Optional[Path] = None
    """Directory with `train.pt` made by a `scripts/prepare_*.py` script (required)."""
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
    """AdamW's peak learning rate, reached after the warm-up and decayed by a cosine to `min_lr`."""
    global_batch_size: int = 16
    """Samples per optimizer step, over all devices (gradient accumulation makes up the difference)."""
    micro_batch_size: int = 1
    """Samples per forward pass on one device. A step's loss is the mean of its micro-batches' per-token mean losses
    (litgpt's convention), so this changes how examples of different lengths are weighted; the number of devices
    does not."""
    epochs: int = 1
    """Passes over `epoch_size` samples (unless `max_steps` is set): ceil(epochs × epoch_size / global_batch_size)
    optimizer steps. The passes follow each other without padding or repeats; a step that crosses into the next pass
    takes its first examples."""
    epoch_size: Optional[int] = None
    """Samples per epoch (default: the size of the training set)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (null: train for epochs × epoch_size samples)."""
    lr_warmup_steps: int = 100
    """Optimizer steps of linear warm-up to `learning_rate`."""
    lr_warmup_fraction: Optional[float] = None
    """The warm-up as a fraction of an epoch's optimizer steps instead (litgpt's lr_warmup_fraction; HF's
    warmup_ratio, a fraction of the whole run, is warmup_ratio × epochs here): replaces `lr_warmup_steps` (a config
    file's; the two given on the command line are refused, and `--train.lr_warmup_steps` on `--resume` replaces the
    run's fraction)."""
    min_lr: float = 0.0
    """The learning rate the cosine schedule ends at."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the trainable parameters."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.999
    """AdamW's second-moment decay."""
    max_norm: Optional[float] = None
    """Clip the gradient norm to this value (null: no clipping)."""
    max_seq_length: Optional[int] = None
    """Truncate samples to this many tokens (default: the longest sample, capped by the model's block size)."""
    save_interval: int = 1000
    """Write a resumable checkpoint every this many optimizer steps."""
    log_interval: int = 1
    """Log metrics every this many optimizer steps."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (less memory, ~30% more compute)."""
    router_aux_loss_coef: float = 0.0
    """Mixture-of-experts models: add this times the routers' load-balancing loss (Switch Transformer's, as
    transformers computes it with output_router_logits) to the training loss, logged as `router_aux_loss`; the
    logged `loss` and the validation loss stay the cross-entropy. 0: none (transformers' default). Mixtral's config
    says 0.02, Qwen-MoE's 0.001. With adapters its gradient reaches the adapters of earlier blocks, and the router
    only where `mlp.gate` is adapted or trained."""

    def gradient_accumulation_iters(self, devices: int, num_nodes: int = 1) -> int:
        """Micro-batches per optimizer step on each of `devices` × `num_nodes` processes."""
        per_step = self.micro_batch_size * devices * num_nodes
        if self.global_batch_size % per_step:
            nodes = (" × --num_nodes", f" × {num_nodes}") if num_nodes > 1 else ("", "")
            raise ValueError(
                f"--train.global_batch_size {self.global_batch_size} must be a multiple of --train.micro_batch_size "
                f"× --devices{nodes[0]} = {self.micro_batch_size} × {devices}{nodes[1]} = {per_step}."
            )
        return self.global_batch_size // per_step

    def warmup_steps(self, n_samples: int) -> int:
        """The warm-up's optimizer steps: `lr_warmup_steps`, or `lr_warmup_fraction` of an epoch's steps (rounded
        up) for a training set of `n_samples` examples."""
        if self.lr_warmup_fraction is None:
            return self.lr_warmup_steps
        epoch_steps = (self.epoch_size or n_samples) / self.global_batch_size
        return math.ceil(self.lr_warmup_fraction * epoch_steps - 1e-9)

    def validate(self) -> None:
        """Refuse, in one sentence naming the flag, a value that would crash or silently mistrain later."""
        _at_least(self.global_batch_size, 1, "--train.global_batch_size")
        _at_least(self.micro_batch_size, 1, "--train.micro_batch_size")
        _at_least(self.epochs, 1, "--train.epochs")
        _at_least(self.epoch_size, 1, "--train.epoch_size", unset="to use the size of the training set")
        _at_least(self.max_steps, 1, "--train.max_steps", unset="to train for --train.epochs")
        _at_least(self.lr_warmup_steps, 0, "--train.lr_warmup_steps")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction <= 1:
            raise ValueError(f"--train.lr_warmup_fraction {self.lr_warmup_fraction}: pass a fraction of an epoch "
                             "from 0 to 1 (e.g. 0.03), or leave it unset to use --train.lr_warmup_steps.")
        _at_least(self.max_seq_length, 1, "--train.max_seq_length", unset="to use the longest sample")
        _at_least(self.save_interval, 1, "--train.save_interval")
        _at_least(self.log_interval, 1, "--train.log_interval")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < math.inf):
            raise ValueError(f"--train.learning_rate {self.learning_rate}: pass a positive number (e.g. 1e-3).")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(
                f"--train.min_lr {self.min_lr}: pass a value from 0 to --train.learning_rate ({self.learning_rate:g}), "
                "the rate the cosine schedule decays to."
            )
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"--train.weight_decay {self.weight_decay}: pass 0 or a positive number.")
        for flag, beta in (("--train.beta1", self.beta1), ("--train.beta2", self.beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{flag} {beta}: pass a value in [0, 1) (AdamW's moment decay, e.g. 0.9 or 0.999).")
        coef = self.router_aux_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < math.inf:
            raise ValueError(f"--train.router_aux_loss_coef {coef}: pass 0 (no load-balancing loss) or a positive "
                             "number (Mixtral's 0.02, Qwen-MoE's 0.001).")
        if self.max_norm is not None and not 0 < self.max_norm < math.inf:
            raise ValueError(
                f"--train.max_norm {self.max_norm}: pass a positive gradient-norm bound, or leave it unset for no "
                "clipping."
            )


@dataclass
class EvalArgs:
    """Periodic validation."""

    interval: int = 100
    """Validate every this many optimizer steps (0: only at the end)."""
    max_iters: int = 100
    """Validation examples per periodic evaluation, shared among the processes: the first this many (0: no
    validation). Examples, not batches: litgpt's max_iters counts batches of micro_batch_size."""
    initial_validation: bool = False
    """Also validate before the first step (logged as step 0), on the first `max_iters` examples."""
    final_validation: bool = True
    """After the last step, validate on the whole validation set (false: on the first `max_iters` examples, as the
    periodic validations do)."""
    max_new_tokens: int = 100
    """Length of the sample generation printed at each validation (0: no sample)."""

    def validate(self) -> None:
        _at_least(self.interval, 0, "--eval.interval", unset=None)
        _at_least(self.max_iters, 0, "--eval.max_iters", unset=None)
        _at_least(self.max_new_tokens, 0, "--eval.max_new_tokens", unset=None)


def _at_least(value: Optional[int], low: int, flag: str, unset: Optional[str] = None) -> None:
    """`value` must be an integer >= `low`; None is allowed (meaning "unset") only when `unset` says what it does."""
    if value is None and unset is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        hint = f", or null {unset}" if unset is not None else ""
        raise ValueError(f"{flag} {value}: pass a whole number, {low} or more{hint}.")
