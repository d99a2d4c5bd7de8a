"""The one training loop behind `finetune/ether.py`, `finetune/lora.py` and `finetune/full.py`.

Reads top to bottom: `finetune()` sets up Fabric, the model and the data, then `fit()` runs the optimisation.
Everything a run needs to continue after a crash (adapter or weights, optimizer, step, data position, RNG) goes into
one atomically written file per checkpoint, so `--resume auto` picks up the newest complete one. The last step is
checkpointed too, so `--resume auto` on a finished run says it is finished instead of redoing steps. A resumed run
takes its learning-rate schedule, weight decay and betas from its own flags (`use_optimiser_flags`), AdamW's moments
from the checkpoint.

Every input is checked before a model loads: the numbers (`TrainArgs.validate`), the data directory, then the base
checkpoint, then that the data was tokenized for that checkpoint, then that a `--resume` checkpoint belongs to this
run (method, adapter config, data order). `hyperparameters.yaml` is written only once all of that has passed, and no
checkpoint or final file is written unless every trainable tensor is finite.

Ctrl-C (SIGINT), a scheduler's SIGTERM (preemption, `scancel`, `kill`) or SIGUSR1 (SLURM's warning before the time
limit with `#SBATCH --signal=USR1@90`) stops a run after the step in progress, with a checkpoint of that step, on every
rank at once (`StopRequest`); the process exits with 128 + the signal's number, and the same command with `--resume
auto` goes on from there. A validation in progress, or due at that step, is left to the resume, which runs it first.
The same signal again acts at once (SIGUSR1: terminates).
"""

from __future__ import annotations

import csv
import inspect
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import yaml

from lit_gpt.adapters.config import field_name, format_layers
from lit_gpt.adapters.state import REGULARISERS  # adapter settings a resume may change
from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.config import CONFIG_FILENAME, Config, read_yaml_file
from lit_gpt.model import GPT
from lit_gpt.quantize import check_kind, quantize_model, quantize_note
from lit_gpt.utils import (
    FINAL_DIRNAME,
    MERGED_DIRNAME,
    WEIGHTS_FILENAME,
    atomic_path,
    atomic_save,
    atomic_write_text,
    check_checkpoint_dir,
    check_output_dir,
    load_file,
    load_model_weights,
    launched_as_another_rank,
    merge_script_for,
    merged_from,
    num_parameters,
    print_once,
    progress_bars_off,
)

HPARAMS_FILENAME = "hyperparameters.yaml"
METRICS_FILENAME = "metrics.csv"
CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pth$")
# the flag of each `AdapterConfig` field in finetune/ether.py and finetune/lora.py: their errors name these
# (`named_by_flags`)
ETHER_FLAGS = {"method": "--Htype", "nb": "--ether_nb", "targets": "--ether_targets or --ether_* layer flags",
               "flip_side": "--flip_side", "dropout": "--ether_dropout", "block_dropout": "--block_dropout",
               "coft": "--oft_coft", "eps": "--oft_eps", "block_share": "--oft_block_share",
               "neumann_terms": "--oft_neumann_terms", "train_modules": "--ether_train_modules",
               "layers": "--ether_layers"}
LORA_FLAGS = {"r": "--lora_r", "alpha": "--lora_alpha", "dropout": "--lora_dropout", "dora": "--lora_dora",
              "init": "--lora_init",
              "targets": "--lora_targets or --lora_* layer flags", "train_modules": "--lora_train_modules",
              "layers": "--lora_layers"}


class NonFiniteLossError(RuntimeError):
    pass


class RunWriteError(RuntimeError):
    """Rank 0 could not write a file of the run (a full disk, a folder where a file goes): every rank stops."""


def write_on_rank_0(fabric, path: Path, write, last_good: Optional[Path] = None) -> None:
    """`write()` on rank 0 (which writes the run's files), then every rank learns whether it worked: on an
    `OSError` rank 0 raises `RunWriteError` naming `path` (and `last_good`, the newest complete checkpoint) and the
    other ranks exit quietly, instead of waiting at the next collective for a rank that has died."""
    error = None
    if fabric.global_rank == 0:
        try:
            write()
        except OSError as e:
            kept = (f"the last complete checkpoint, {last_good}, is intact: " if last_good is not None
                    else "nothing was lost: ")
            error = (f"Could not write {path}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; {kept}"
                     "free space (or fix the folder), then run the same command with --resume auto.")
    if fabric.world_size > 1:
        error = fabric.broadcast(error, src=0)
    if error is not None:
        if fabric.global_rank == 0:
            raise RunWriteError(error)
        raise SystemExit(1)


def launch(fabric, grace: float = 30.0) -> None:
    """`fabric.launch()`, with Lightning's watcher of the other processes patient with rank 0.

    When a process it started dies, Lightning's watcher (polling every 5 s) SIGKILLs the others and rank 0 itself, as
    one hung in a collective may never return. Rank 0 usually learns of the death first, in its next collective, and
    ends with a `PeerLostError` naming the intact checkpoint, but when the watcher's poll comes first the run vanishes
    with exit -9 and no word of the checkpoint. Here the watcher still kills the other processes at once, but gives
    rank 0 `grace` seconds to say so and exit before it kills it too.

    Every process also prints its Python stack if it crashes (`faulthandler`: a segmentation fault, an abort), so a
    rank that dies of one says where."""
    import faulthandler

    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except (AttributeError, OSError, ValueError, RuntimeError):  # a stderr without a file descriptor (Jupyter)
            pass
    try:
        from lightning.fabric.strategies.launchers import subprocess_script
        watcher = subprocess_script._ChildProcessObserver
    except (ImportError, AttributeError):  # another Lightning: its own watcher, as it is
        fabric.launch()
        return

    class PatientWatcher(watcher):
        def _terminate_all(self) -> None:
            for proc in self._child_processes:
                if proc.poll() is None:  # (not one whose end `how_peers_ended` is to tell)
                    _STOPPED_BY_WATCHER.add(proc.pid)
                proc.send_signal(self._termination_signal)
            time.sleep(grace)  # a daemon thread: gone with rank 0 when it exits in time
            os.kill(self._main_pid, self._termination_signal)

    subprocess_script._ChildProcessObserver = PatientWatcher
    try:
        fabric.launch()
    finally:
        subprocess_script._ChildProcessObserver = watcher


class PeerLostError(RuntimeError):
    """Another process of a multi-process run ended without a word (killed, out of memory) in the middle of a
    collective; the message names the intact checkpoint."""


# the processes `launch`'s watcher killed because another had died
_STOPPED_BY_WATCHER: set[int] = set()


def how_peers_ended(fabric, wait: float = 5.0) -> Optional[str]:
    """On the process that launched the others (rank 0 of a node): how those that have ended did, in words (`rank 1
    was killed by SIGKILL`), waiting up to `wait` seconds for one to end; None when none has or it cannot know. Those
    the launcher's watcher stopped after another died are left out."""
    procs = list(getattr(getattr(fabric.strategy, "launcher", None), "procs", None) or ())
    deadline = time.monotonic() + wait
    while procs and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    first = getattr(fabric, "node_rank", 0) * (len(procs) + 1)  # the launched processes are local ranks 1, 2, ...
    said = []
    for i, proc in enumerate(procs, start=first + 1):
        code = proc.poll()
        if code is None or proc.pid in _STOPPED_BY_WATCHER:
            continue
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            why = {"SIGKILL": ", as the system's out-of-memory killer does",
                   "SIGSEGV": ", a crash whose stack is printed above",
                   "SIGABRT": ", an abort whose stack is printed above"}.get(name, "")
            said.append(f"rank {i} was killed by {name}{why}")
        else:
            said.append(f"rank {i} exited with code {code}" + (", after the error printed above" if code else ""))
    return "; ".join(said) or None


# what a collective raises when a peer's connection is gone (gloo on the CPU; NCCL's DistBackendError)
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted")


def peer_lost(error: BaseException) -> bool:
    dist_backend_error = getattr(torch.distributed, "DistBackendError", ())
    return isinstance(error, dist_backend_error) or any(text in str(error) for text in _PEER_LOST)


# what the finetune scripts print as one `error:` line (besides the input errors every script prints so)
TRAINING_ERRORS = (NonFiniteLossError, RunWriteError, PeerLostError)


class TrainingStopped(SystemExit):
    """The run stopped on a signal after a step, with a checkpoint of it; exits with 128 + the signal's number."""


class StopRequest:
    """While entered (in the main thread): SIGINT, SIGTERM and SIGUSR1 ask the run to stop after the step in progress
    (`signum` becomes the signal's number) instead of killing it mid-step; the same signal again acts as it did before
    (Ctrl-C raises KeyboardInterrupt, SIGTERM terminates). `fit` shares the request with every rank in the step's
    loss all-reduce, so all stop after the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ())

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce  # rank 0 says what will happen; the others stay quiet
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # the next one acts at once
        if self.announce:  # os.write: a handler may interrupt a print (or tqdm) on the same stream
            name = signal.Signals(signum).name
            os.write(2, f"\n{name} received: the run stops after the step in progress, with a checkpoint of it "
                        f"({name} again stops at once, without one).\n".encode())


def non_finite_advice(precision: str, max_norm: Optional[float] = None) -> str:
    """What to do about a NaN/inf: in float16 it is nearly always the format, not the learning rate."""
    if precision.startswith("16-true"):
        # the trainable weights and AdamW's state are float32 (`fabric_precision`); what is left in
        # float16 is the model's activations, whose largest finite value is 65504
        return ("--precision 16-true computes in float16, whose largest value (65504) activations can exceed: train "
                "with --precision bf16-true or 16-mixed")
    if max_norm:
        return f"Lower --train.learning_rate or --train.max_norm (now {max_norm:g})"
    return "Lower --train.learning_rate or set --train.max_norm"


# what FSDP2 (Lightning's ModelParallelStrategy) takes: the sharded weights are kept in one dtype
SHARDED_PRECISIONS = ("32-true", "32", "bf16-true", "bf16-mixed", "16-true")


def check_precision(precision: str, adapter_config: Optional[Any], world_size: int = 1) -> None:
    """Full fine-tuning cannot keep float16 weights: AdamW's state would be float16 too, where its eps (1e-8) and
    squared gradients below ~2e-4 round to 0, so a step divides 0 by 0. (An adapter run keeps its few trainable
    weights in float32 instead: `fabric_precision`.) Nor a precision of Lightning's that this training does not
    support (transformer-engine and 8-bit need other packages and keep the weights otherwise), or that FSDP2 does
    not when `world_size` (--devices × --num_nodes) is over 1."""
    from lit_gpt.adapters.plan import PRECISION_ALIASES, PRECISION_BYTES

    unified = PRECISION_ALIASES.get(precision, precision)
    if unified not in PRECISION_BYTES:
        # (full fine-tuning refuses float16 weights, below: not offered to it)
        offered = [k for k in PRECISION_BYTES if k != "32" and not (adapter_config is None and k.startswith("16-true"))]
        raise ValueError(f"--precision {precision}: choose one of {', '.join(offered)} "
                         "(bf16-true on GPUs with bfloat16, 16-mixed on older ones, 32-true on the CPU).")
    if adapter_config is None and precision.startswith("16-true"):
        other = "16-mixed (float32 weights, float16 compute)" if world_size == 1 else "32-true"
        raise ValueError(
            "--precision 16-true cannot train every weight: AdamW's state would be float16, where its eps and small "
            "squared gradients round to 0 and the first steps turn the weights into NaN; use --precision bf16-true "
            f"on GPUs with bfloat16, or {other}."
        )
    if getattr(adapter_config, "train_modules", None) and precision.startswith("16-true"):
        flag = "--lora_train_modules" if adapter_config.method == "lora" else "--ether_train_modules"
        raise ValueError(
            f"--precision 16-true cannot train modules in full ({flag}): they keep the model's float16, where AdamW's "
            "state rounds to 0 and the first steps turn the weights into NaN; use --precision bf16-true on GPUs with "
            "bfloat16, or 16-mixed."
        )
    if world_size > 1 and unified not in SHARDED_PRECISIONS:
        offered = "32-true, bf16-true, bf16-mixed" + (" or 16-true" if adapter_config is not None else "")
        raise ValueError(f"--precision {precision} does not work with --devices × --num_nodes = {world_size}: FSDP2 "
                         f"keeps the sharded weights in one dtype, so choose {offered}.")


def _non_finite_error(what: str, step: int, last_good: Optional[Path], precision: str,
                      unwritten: Optional[str] = None, max_norm: Optional[float] = None) -> NonFiniteLossError:
    skipped = f", so {unwritten} was not written" if unwritten else ""
    if last_good is not None:
        where = f"the last good checkpoint is {last_good}"
        then = f", then resume from that checkpoint with --resume {last_good}"
    else:
        where, then = "no good checkpoint exists yet", ""
    advice = non_finite_advice(precision, max_norm)
    return NonFiniteLossError(f"{what} at step {step}{skipped}; {where}. {advice}{then}.")


def first_non_finite(state_dict: dict) -> Optional[str]:
    return next((k for k, v in state_dict.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()), None)


def check_finite(state_dict: dict, what: str, step: int, last_good: Optional[Path], precision: str,
                 fabric: Any = None, max_norm: Optional[float] = None) -> None:
    """Refuse to write trainable tensors holding NaN/inf (a checkpoint or final file is only written when finite).

    With several processes only rank 0 holds the gathered tensors (`trainable_state_dict`), so rank 0 decides and
    every rank raises together (a rank that went on would wait forever at the next collective)."""
    several = fabric is not None and fabric.world_size > 1
    bad = first_non_finite(state_dict) if not several or fabric.global_rank == 0 else None
    if several:
        bad = fabric.broadcast(bad, src=0)
    if bad is not None:
        raise _non_finite_error(f"The trainable weights became non-finite ({bad})", step, last_good, precision,
                                unwritten=what, max_norm=max_norm)


# ---------------------------------------------------------------------------------------------- setup helpers
def default_precision(world_size: int = 1) -> str:
    """bf16-true on GPUs with bfloat16; on older ones 16-mixed on one device and 32-true sharded (FSDP2 takes no
    mixed float16); 32-true on the CPU."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-true"
        return "16-mixed" if world_size == 1 else "32-true"
    return "32-true"


def precision_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16-true"):
        return torch.bfloat16
    if precision.startswith("16-true"):
        return torch.float16
    return torch.float32


def keeps_trainable_float32(precision: str, adapter_config: Optional[Any], adapter_float32: bool = False) -> bool:
    """An adapter run keeps its trainable weights in float32 (`_half_keeping_trainable_float32`) under `16-true`
    always, and under `bf16-true` when asked (`--adapter_float32`); in the other precisions they are float32 anyway."""
    if adapter_config is None:
        return False
    return precision.startswith("16-true") or (adapter_float32 and precision.startswith("bf16-true"))


def resolve_adapter_float32(given: Optional[bool], adapter_config: Optional[Any], precision: str) -> bool:
    """`--adapter_float32` as the run uses it: unset (None) is false, but true for DoRA under `bf16-true`, whose
    magnitudes start at the row norms (about 1), where AdamW's steps are below half a bfloat16 spacing and would all
    be rounded away (PEFT keeps them in float32 too); DoRA with it set false there is refused."""
    dora = bool(getattr(adapter_config, "dora", False)) and precision.startswith("bf16-true")
    if given is None:
        return dora
    if dora and not given:
        raise ValueError("--lora_dora true under --precision bf16-true needs --adapter_float32 true: DoRA's magnitudes "
                         "start at the row norms (about 1), where AdamW's steps are below half a bfloat16 spacing, so "
                         "in bfloat16 they would never train; drop --adapter_float32 false (unset, it is true for "
                         "DoRA) or use --precision bf16-mixed.")
    return given


def fabric_precision(precision: str, adapter_config: Optional[Any], adapter_float32: bool = False) -> dict:
    """Fabric's `precision=` or `plugins=` for a run: Lightning's own, but for `keeps_trainable_float32`."""
    if keeps_trainable_float32(precision, adapter_config, adapter_float32):
        return {"plugins": [_half_keeping_trainable_float32()(precision)]}
    return {"precision": precision}


def _half_keeping_trainable_float32():
    """The plugin class, defined on first use: importing lightning takes seconds."""
    from lightning.fabric.plugins.precision import HalfPrecision

    class HalfKeepingTrainableFloat32(HalfPrecision):
        """Lightning's `16-true` or `bf16-true` (half-precision weights, inputs and compute), except that the
        trainable weights are cast to float32 before FSDP shards them: their gradients and AdamW's state are then
        float32 (PEFT keeps adapter weights in float32 too). In float16 AdamW needs it (its state underflows to NaN);
        in bfloat16 it keeps the Adam steps smaller than half a bfloat16 spacing, which bfloat16 weights drop. The
        adapters cast their weights to the activations' dtype, and the gradients back."""

        def convert_module(self, module: nn.Module) -> nn.Module:
            # float32 trainable weights keep their values (DoRA's magnitudes, set from the base weights in float32)
            exact = {id(p): p.data for p in module.parameters() if p.requires_grad and p.dtype == torch.float32}
            module = super().convert_module(module)
            cast_trainable_float32(module, exact)
            return module

    return HalfKeepingTrainableFloat32


def cast_trainable_float32(module: nn.Module, exact: Optional[dict[int, torch.Tensor]] = None) -> None:
    """The adapters' trainable weights of `module` in float32, in place (their gradients and AdamW's state follow
    them): `exact[id(p)]` where given (their float32 values before a cast to half precision), else `p` as it is.
    Modules trained in full (`AdapterConfig.train_modules`) keep the model's dtype, as full fine-tuning does and PEFT
    does with `modules_to_save`: their own forward computes with their weights as they are."""
    from lit_gpt.adapters.base import trained_module_state_dict

    full = {id(p) for p in trained_module_state_dict(module).values()}
    exact = exact or {}
    for p in module.parameters():
        if p.requires_grad and id(p) not in full:
            p.data = exact[id(p)] if id(p) in exact else p.data.float()


def check_devices(devices: int, this_machine: bool = True) -> None:
    """Fail in one sentence when `--devices` asks for more GPUs than this machine has (Fabric would fail later, in a
    traceback); without a GPU the processes run on the CPU, as many as asked. `this_machine=False` (a plan for
    another machine): the number only."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"--devices {devices}: pass the number of processes per machine, 1 or more.")
    if this_machine and torch.cuda.is_available() and devices > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(
            f"--devices {devices} asks for more GPUs than this machine has ({n}); pass --devices {n} or fewer "
            f"(to run {devices} processes on the CPU instead, hide the GPUs with CUDA_VISIBLE_DEVICES=)."
        )


# --logger_name: where the metrics go besides logs/metrics.csv, which every run writes (`MetricsCSV`)
LOGGER_NAMES = ("tensorboard", "wandb", "csv")
WANDB_DEFAULT_PROJECT = "lit-ether"  # when WANDB_PROJECT is not set
# in the run's logs/: the id and project of its W&B run, which a resume continues
WANDB_RUN_FILENAME = "wandb_run.yaml"


def make_loggers(logger_name: str, out_dir: Path, purge_step: Optional[int] = None) -> list:
    """Fabric's loggers for `--logger_name`: TensorBoard's event files in `out_dir/tensorboard/`, a Weights & Biases
    run, or none (`csv`: logs/metrics.csv only). A run that starts logging past step 1 (`purge_step`, a resume)
    continues the W&B run recorded in `out_dir/logs/wandb_run.yaml`; a new one starts another (project
    `$WANDB_PROJECT`, else `lit-ether`; named after `out_dir`), recorded there when it first logs."""
    if logger_name not in LOGGER_NAMES:
        raise ValueError(f"--logger_name {logger_name!r}: choose {', '.join(LOGGER_NAMES[:-1])} or {LOGGER_NAMES[-1]}.")
    if logger_name == "csv":
        return []
    if logger_name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        try:
            return [TensorBoardLogger(root_dir=out_dir, name="tensorboard", version="", purge_step=purge_step)]
        except ModuleNotFoundError:  # tensorboard is in requirements.txt; a stripped install still trains
            return []
    try:
        import wandb  # an optional dependency
    except ImportError:
        raise ValueError("--logger_name wandb needs the wandb package: pip install wandb.") from None
    record = Path(out_dir) / "logs" / WANDB_RUN_FILENAME
    run = _recorded_wandb_run(record) if purge_step is not None and purge_step > 1 else None
    if run is None:  # a new W&B run: an id of our own, so that the run directory can record it
        import secrets

        run = {"id": secrets.token_hex(6), "project": os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT}
    return [_wandb_logger_class(wandb)(Path(out_dir), run, record)]


def _recorded_wandb_run(path: Path) -> Optional[dict]:
    """The W&B run (`id`, `project`) a run directory recorded, or None when it has none (it never logged to W&B)."""
    if not path.is_file():
        return None
    run = read_yaml_file(path, ": delete it to log the resumed run to a new W&B run.")
    if not (isinstance(run, dict) and isinstance(run.get("id"), str) and isinstance(run.get("project"), str)):
        raise ValueError(f"{str(path)!r} does not hold a W&B run's id and project: delete it to log the resumed run "
                         "to a new W&B run.")
    return {"id": run["id"], "project": run["project"]}


def _wandb_logger_class(wandb):
    """Lightning's `WandbLogger`, defined on first use (importing Lightning takes seconds), that records its run in
    the run directory, takes the run's hyperparameters.yaml as the W&B config and finishes the W&B run at the end.
    Like Lightning's loggers it logs on rank 0 only; each step is logged as `trainer/global_step`, W&B's x-axis."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import WandbLogger

    class RunWandbLogger(WandbLogger):
        def __init__(self, out_dir: Path, run: dict, record: Path) -> None:
            # the W&B files go into the run directory unless WANDB_DIR says otherwise
            super().__init__(name=out_dir.name, project=run["project"], id=run["id"],
                             save_dir=os.environ.get("WANDB_DIR") or out_dir)
            self._wandb_init.pop("anonymous", None)  # (wandb warns that the setting has no effect)
            self._out_dir, self._run, self._record = out_dir, run, record

        @property
        def experiment(self):
            started = self._experiment is not None
            try:
                experiment = WandbLogger.experiment.fget(self)
            except wandb.errors.Error as e:  # not logged in, no connection, ...
                why = " ".join(str(e).split()).rstrip(".")
                raise ValueError(f"--logger_name wandb could not start the W&B run ({why}): fix that, or set "
                                 "WANDB_MODE=offline and upload the run later with `wandb sync`.") from None
            if not started and rank_zero_only.rank == 0:
                self._started(experiment)
            return experiment

        def _started(self, experiment) -> None:
            try:
                atomic_write_text(self._record, yaml.safe_dump(self._run, sort_keys=False))
            except OSError as e:  # the run goes on; only a resume would start another W&B run
                print(f"warning: could not write {self._record} ({e.strerror or e}): a resume of this run will log "
                      "to a new W&B run.", file=sys.stderr)
            hparams = self._out_dir / HPARAMS_FILENAME
            try:
                config = yaml.safe_load(hparams.read_text(encoding="utf-8"))
            except (OSError, ValueError, yaml.YAMLError):  # (written just before training starts)
                config = None
            if isinstance(config, dict):  # a resume's flags may differ from the run's first ones
                experiment.config.update(config, allow_val_change=True)

        @rank_zero_only
        def finalize(self, status: str) -> None:
            super().finalize(status)
            if self._experiment is not None:  # (Lightning's logger leaves the W&B run open until the process exits)
                if status == "stopped":  # a signal stopped the run: `--resume auto` goes on with it
                    self._experiment.mark_preempting()
                self._experiment.finish(exit_code=0 if status == "success" else 1)
                self._experiment = None

    return RunWandbLogger


def build_fabric(devices: int, num_nodes: int, precision: str, out_dir: Path, activation_checkpointing: bool, *,
                 purge_step: Optional[int] = None, adapter_config: Optional[Any] = None,
                 adapter_float32: bool = False, logger_name: str = "tensorboard"):
    """A Fabric for one device, or FSDP2 (`fully_shard` per block) through `ModelParallelStrategy` for several.

    `purge_step`: the first step this run logs; TensorBoard hides what older event files in `out_dir` hold from that
    step on (a resumed run redoes those steps, a new run in the same directory starts over). `adapter_config`: the
    run's adapter, if any, and `adapter_float32` the flag (`fabric_precision`). `logger_name`: `make_loggers`."""
    import lightning as L

    # logs/metrics.csv is written by MetricsCSV (flushed per row, kept on --resume), not by Lightning's CSVLogger
    loggers = make_loggers(logger_name, out_dir, purge_step)
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if devices * num_nodes > 1:
        from lightning.fabric.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            parallelize_fn=shard_model, data_parallel_size=devices * num_nodes, tensor_parallel_size=1
        )
    else:
        strategy = "auto"
    return L.Fabric(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, loggers=loggers,
        **fabric_precision(precision, adapter_config, adapter_float32),
    )


def shard_model(model: nn.Module, device_mesh) -> nn.Module:
    """FSDP2: every transformer block is its own unit; embeddings, final norm and head stay with the root. A module
    trained in full (`AdapterConfig.train_modules`) is a unit of its own, as FSDP2 needs one dtype for the trainable
    weights of a unit and it keeps the model's where the adapters may be float32 (`cast_trainable_float32`); but
    not a weight tied to another module (a unit cannot share it)."""
    from torch.distributed.fsdp import fully_shard

    from lit_gpt.adapters.base import parameter_names, trained_modules

    mesh = device_mesh["data_parallel"]
    names = parameter_names(model)
    for _, module in trained_modules(model):
        if all(len(names[id(p)]) == 1 for p in module.parameters()):
            # kept gathered until backward: a norm's weight rebuilds its output in the next layer's backward
            # (`lit_gpt.recompute`), before the norm's own backward would gather it again
            fully_shard(module, mesh=mesh, reshard_after_forward=False)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def resolve_io(io: IOArgs, run_name: str, resume: Optional[str | Path] = None) -> IOArgs:
    io.train_data_dir = Path(io.train_data_dir)
    io.val_data_dir = Path(io.val_data_dir or io.train_data_dir)
    io.checkpoint_dir = Path(io.checkpoint_dir or io.train_data_dir.parent)
    if io.out_dir is None and isinstance(resume, Path) and resume.parent.name == "checkpoints":
        io.out_dir = resume.parent.parent  # a resume goes on in its run's directory, whatever the flags name now
    io.out_dir = Path(io.out_dir or Path(io.log_dir) / run_name)
    return io


def run_dir_contents(out_dir: Path) -> list[str]:
    """What makes `out_dir` a run's directory: its checkpoints and final file."""
    steps = checkpoint_steps(out_dir)
    found = [f"checkpoints up to step {max(steps)}"] if steps else []
    return found + [name for name in FINAL_FILENAMES if (out_dir / name).is_file()]


def check_run_dir(out_dir: Path, out_dir_given: bool, resume: Optional[str | Path]) -> None:
    """A run directory that can be written, and a new run never mixed into another run's: without --resume (or
    resuming a checkpoint of another directory) `out_dir` must not hold checkpoints or a final file, which `--resume
    auto` would later take for this run's."""
    if not out_dir_given:  # the default run directory is a new name under --io.log_dir
        check_output_dir(out_dir.parent, "--io.log_dir")
    check_output_dir(out_dir, "--io.out_dir")
    own = isinstance(resume, Path) and resume.resolve().parent == (out_dir / "checkpoints").resolve()
    if own:
        return
    found = run_dir_contents(out_dir)
    if not found:
        return
    if not checkpoint_steps(out_dir):  # a finished run with nothing to go on from: --resume auto would redo it
        if resume is None or resume == "auto":
            raise ValueError(
                f"{str(out_dir)!r} holds a finished run ({' and '.join(found)}) and no checkpoint to go on from: pass "
                "another --io.out_dir for a new run (or delete that folder to start it over)."
            )
    elif resume == "auto":
        return
    how = (f"resume {str(resume)!r} into a new --io.out_dir" if resume is not None
           else "continue it with --resume auto (a checkpoint: --resume PATH)")
    raise ValueError(f"{str(out_dir)!r} already holds a run ({' and '.join(found)}): {how}, or pass another "
                     f"--io.out_dir for a new run (or delete that folder to start it over).")


# atomic_path's temporary files (`.<name>.<random>.tmp`) of the files a run writes; a writer killed outright (the
# OOM killer, a scheduler's kill after its grace period) leaves one, as large as a checkpoint
_PARTIAL_WRITE = re.compile(r"\.(step-\d+\.pth|lit_model\w*\.pth|hyperparameters\.yaml)\.\w+\.tmp")


def remove_partial_writes(out_dir: Path) -> list[str]:
    """Delete the temporary files of writes that never finished in the run directory `out_dir` (a run starting
    there is its only writer); returns their names with their sizes."""
    freed = []
    for folder in (out_dir, out_dir / "checkpoints"):
        for p in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
            if p.is_file() and _PARTIAL_WRITE.fullmatch(p.name):
                size = p.stat().st_size
                p.unlink()
                freed.append(f"{p.relative_to(out_dir)}, {size / 2**20:.1f} MiB")
    return freed


def checkpoint_steps(out_dir: Path) -> dict[int, Path]:
    ckpt_dir = out_dir / "checkpoints"
    return {int(m.group(1)): p for p in ckpt_dir.glob("step-*.pth") if (m := CHECKPOINT_RE.match(p.name))}


def set_aside_later_branch(out_dir: Path, step: int) -> Optional[Path]:
    """Resuming step `step` of a run that went further (a branch: new flags from an earlier checkpoint) moves the
    later checkpoints, the final file, the model folders made from it (`final/`, `merged/`) and the metrics into
    `superseded/<time>/`, so that neither `--resume auto` nor a reader takes them for this branch's; nothing is
    deleted. Returns that folder (None: nothing was later)."""
    later = [p for s, p in sorted(checkpoint_steps(out_dir).items()) if s > step]
    if not later:
        return None
    dest = out_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
    for p in later:
        os.replace(p, dest / "checkpoints" / p.name)
    for name in FINAL_FILENAMES:
        if (out_dir / name).is_file():
            os.replace(out_dir / name, dest / name)
    for name in RUN_FOLDERS:  # the model folders made from that final file
        if (out_dir / name).is_dir():
            os.replace(out_dir / name, dest / name)
    for path in (out_dir / "logs" / METRICS_FILENAME, out_dir / HPARAMS_FILENAME):
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    return dest


# ---------------------------------------------------------------------------------------------- input checks
def check_numbers(train: TrainArgs, eval: EvalArgs, devices: int, num_nodes: int, seed: int = 0,
                  this_machine: bool = True) -> None:
    """Every number of the run, before anything is read from disk (one sentence naming the flag). `this_machine=False`
    (`--dry_run`, which may plan for another machine): not whether this one has the GPUs and the multi-node launch."""
    check_devices(devices, this_machine)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"--num_nodes {num_nodes}: pass the number of machines, 1 or more.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"--seed {seed}: pass an integer from 0 to {2**32 - 1}.")
    train.validate()
    eval.validate()
    train.gradient_accumulation_iters(devices, num_nodes)
    if this_machine:
        check_nodes(num_nodes)
        check_launched_processes(devices, num_nodes)


def die_with_launcher() -> None:
    """In a process a launcher started (LOCAL_RANK set: Fabric's own launcher, which re-runs the script for ranks 1..,
    or torchrun), ask Linux for SIGTERM when the launching process dies. Before training starts, neither forwards a
    signal it gets, so `kill` of a run still starting left the other ranks waiting for it until the process group's
    timeout (30 minutes), holding their GPUs."""
    if "LOCAL_RANK" not in os.environ or sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not glibc/musl: nothing to ask
        return
    if os.getppid() == 1:  # the launcher died before the request: it will not come
        os.kill(os.getpid(), signal.SIGTERM)


def check_launched_processes(devices: int, num_nodes: int) -> None:
    """torchrun started its own processes (--nproc_per_node N × --nnodes, its WORLD_SIZE) for another count than
    --devices × --num_nodes: each process would take itself for a whole run, and they would all write into one run
    directory. (Fabric's own launcher sets WORLD_SIZE too, from --devices, but not torchrun's other variables.)"""
    launched = os.environ.get("WORLD_SIZE")
    if launched is None or not launched.isdigit() or int(launched) == devices * num_nodes:
        return  # (before importing Lightning, seconds that an input error need not wait for)
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    if not TorchElasticEnvironment.detect():
        return
    per_node = int(launched) // num_nodes if int(launched) % num_nodes == 0 else None
    fix = (f"pass --devices {per_node} (the processes per machine)" if per_node
           else "make --devices × --num_nodes equal it")
    raise ValueError(f"The launcher started {launched} processes (WORLD_SIZE={launched}), but --devices {devices} × "
                     f"--num_nodes {num_nodes} = {devices * num_nodes}: {fix}.")


def multi_node_launch_detected() -> bool:
    """Whether a launcher told this process which node it is: one of Lightning's cluster environments (srun under
    SLURM, torchrun, LSF's jsrun, MPI; Kubeflow cannot be detected) or NODE_RANK in the environment (a manual launch,
    or `fabric run --node-rank`)."""
    from lightning.fabric.plugins.environments import (KubeflowEnvironment, LSFEnvironment, MPIEnvironment,
                                                       SLURMEnvironment, TorchElasticEnvironment)

    if "NODE_RANK" in os.environ:
        return True
    for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment, KubeflowEnvironment):
        try:
            if env.detect():
                return True
        except NotImplementedError:  # KubeflowEnvironment: "can't be detected automatically"
            pass
    return False


def check_nodes(num_nodes: int) -> None:
    """Without a multi-node launcher, Fabric takes this machine for node 0 of `num_nodes` (MASTER_ADDR 127.0.0.1) and
    waits forever for the others: refuse instead."""
    if num_nodes > 1 and not multi_node_launch_detected():
        raise ValueError(
            f"--num_nodes {num_nodes}: no multi-node launch was detected, so this process would wait forever for the "
            f"other nodes; every node must start this same command, with srun under SLURM, with torchrun --nnodes "
            f"{num_nodes} --node_rank R --master_addr ADDR --master_port PORT, or with MASTER_ADDR, MASTER_PORT and "
            "NODE_RANK set on each node (on one machine, drop --num_nodes and use --devices)."
        )


def normalize_resume(resume: Any) -> Optional[str | Path]:
    """`--resume`: None (start at step 0), "auto" (`true` means the same) or the path of a checkpoint."""
    if resume is None or resume is False or str(resume).strip().lower() in ("", "false", "no", "0", "none"):
        return None
    if resume is True or str(resume).strip().lower() in ("auto", "true", "yes", "1"):
        return "auto"
    return Path(resume)


def prepared_data_description(filename: str = "train.pt") -> str:
    return (f"a directory written by a scripts/prepare_*.py script (it holds {filename} and prepare_config.yaml; "
            "scripts/prepare_json.py --json_path FILE --checkpoint_dir MODEL makes one from your own data)")


def check_train_data_given(io: IOArgs) -> None:
    if io.train_data_dir is None:
        raise ValueError(f"--io.train_data_dir is required: pass {prepared_data_description()}.")


def load_data_dir(data_dir: Path, split: str, flag: str):
    """The `SFTDataset` of one split, with an error naming the flag and what the directory must hold."""
    from lit_gpt.data import SFTDataset
    from lit_gpt.data.sft import SPLIT_FILES

    filename = SPLIT_FILES[split]
    what = prepared_data_description(filename)
    if not data_dir.exists():
        raise FileNotFoundError(f"{flag} {str(data_dir)!r} does not exist: pass {what}.")
    if not data_dir.is_dir():
        raise ValueError(f"{flag} {str(data_dir)!r} is a file: pass {what}.")
    if not (data_dir / filename).is_file():
        if (data_dir / CONFIG_FILENAME).is_file():  # the model folder itself, a likely slip
            prepared = sorted(d.name + "/" for d in data_dir.iterdir() if (d / filename).is_file())
            inside = f"one of its prepared data folders ({', '.join(prepared)})" if prepared else (
                f"a data folder prepared for it (`python scripts/prepare_alpaca.py --checkpoint_dir {data_dir}` "
                "writes one inside it)")
            raise ValueError(f"{flag} {str(data_dir)!r} is a model checkpoint, not prepared data: pass {inside}.")
        raise FileNotFoundError(f"{flag} {str(data_dir)!r} has no {filename}: pass {what}, or prepare it with "
                                f"--destination_path {str(data_dir)!r}.")
    data = SFTDataset.from_dir(data_dir, split)
    if split == "train" and len(data) == 0:
        raise ValueError(f"{str(data_dir / filename)!r} holds no examples: prepare the data again (its "
                         "prepare_config.yaml says how many rows were dropped and why).")
    return data


def prepared_config(data_dir: Path) -> Optional[dict]:
    """The data's `prepare_config.yaml`, or None when it has none (data made by other code)."""
    from lit_gpt.data import read_prepare_config

    try:
        return read_prepare_config(data_dir)
    except FileNotFoundError:
        return None


def check_base_checkpoint(io: IOArgs, inferred: bool) -> None:
    """`io.checkpoint_dir` must be a lit checkpoint; when it was inferred from the data directory, say so."""
    try:
        check_checkpoint_dir(io.checkpoint_dir, flag="--io.checkpoint_dir")
    except (FileNotFoundError, ValueError):
        missing = [n for n in (WEIGHTS_FILENAME, CONFIG_FILENAME) if not (io.checkpoint_dir / n).is_file()]
        if not inferred or not missing:
            raise
        recorded = (prepared_config(io.train_data_dir) or {}).get("checkpoint_dir")
        hint = ""
        if recorded and (Path(recorded) / CONFIG_FILENAME).is_file():
            hint = f" (the data's prepare_config.yaml names {str(recorded)!r})"
        raise FileNotFoundError(
            f"No --io.checkpoint_dir was given, so the base model was looked for in {str(io.checkpoint_dir)!r}, the "
            f"parent of --io.train_data_dir, which has no {' or '.join(missing)}: pass --io.checkpoint_dir with the "
            f"model the data was prepared for{hint}."
        ) from None


# the prepare settings that make validation examples look like the training ones (or not)
FORMAT_SETTINGS = ("prompt_style", "system_prompt", "mask_inputs")


def warn_other_val_format(train_dir: Path, prepared: Optional[dict], val_dir: Path, val_prepared: Optional[dict]):
    """A warning when --io.val_data_dir was prepared in another format than the training data: its val loss (and
    the sample generated from its prompts) would measure a format the model is not trained on."""
    if prepared is None or val_prepared is None:
        return
    differ = [f"{k} {val_prepared.get(k)!r}, not {prepared.get(k)!r}" for k in FORMAT_SETTINGS
              if val_prepared.get(k) != prepared.get(k)]
    if differ:
        print_once(f"warning: --io.val_data_dir {str(val_dir)!r} was prepared in another format than "
                   f"--io.train_data_dir {str(train_dir)!r} ({'; '.join(differ)}): its val loss measures a format the "
                   "model is not trained on; prepare the validation rows with the training data's settings.",
                   file=sys.stderr)


def check_data_matches_model(data_dir: Path, data, prepared: Optional[dict], tokenizer: Any, config: Config,
                             checkpoint_dir: Path) -> None:
    """Refuse data tokenized for another model: its recorded tokenizer fingerprint (or vocab size, BOS, EOS) must be
    the checkpoint's, and no token id may be past the model's embedding table."""
    from lit_gpt.data.prepare import tokenizer_fingerprint

    fix = f"prepare the data again with --checkpoint_dir {str(checkpoint_dir)!r}"
    if prepared is not None:
        made_with = str(prepared.get("checkpoint_dir") or "another checkpoint")
        fix_other = f"{fix}, or pass --io.checkpoint_dir {made_with!r}, the model it was prepared for"
        recorded = prepared.get("tokenizer_fingerprint")
        if recorded is not None:
            current = tokenizer_fingerprint(tokenizer)
            if current is not None and current != recorded:
                raise ValueError(
                    f"{str(data_dir)!r} was tokenized with the tokenizer of {made_with!r} (fingerprint {recorded}), "
                    f"not that of the base model {str(checkpoint_dir)!r} ({current}): {fix_other}."
                )
        for key in ("vocab_size", "bos_id", "eos_id"):
            want, have = prepared.get(key), getattr(tokenizer, key, None)
            if want is not None and have is not None and want != have:
                raise ValueError(
                    f"{str(data_dir)!r} was tokenized with the tokenizer of {made_with!r} ({key} {want}), not that "
                    f"of the base model {str(checkpoint_dir)!r} ({key} {have}): {fix_other}."
                )
    largest = data.max_token_id
    if largest >= config.padded_vocab_size:
        raise ValueError(
            f"{str(data_dir)!r} holds token id {largest}, but the base model {str(checkpoint_dir)!r} has only "
            f"{config.padded_vocab_size} token embeddings (vocab_size {config.vocab_size}), so it was tokenized for "
            f"another model: {fix}."
        )


def use_loss_ignore_index(data, prepared: Optional[dict]) -> None:
    """Data prepared with `--ignore_index N` marks the positions without a loss (the prompt) with N; the loss skips
    -100 (PyTorch's default), so relabel N as -100 once, here, instead of threading N through every loss."""
    marker = (prepared or {}).get("ignore_index", -100)
    if isinstance(marker, int) and not isinstance(marker, bool) and marker >= 0:
        where = str(Path(data.source).parent) if getattr(data, "source", "") else "the data"
        raise ValueError(
            f"{where!r} was prepared with --ignore_index {marker}, a token id: the answers' tokens {marker} cannot be "
            "told from the masked prompt, so the model would never learn them; prepare it again with the default "
            "--ignore_index -100."
        )
    if isinstance(marker, int) and marker != -100:
        for sample in data.samples:
            sample["labels"] = sample["labels"].masked_fill(sample["labels"] == marker, -100)


def check_answers_fit(data, max_len: int, data_dir: Path, flag_given: bool) -> None:
    """An example whose answer begins past the first `max_len` tokens (truncation) has no token to learn from: refuse
    data where that holds for every example (the loss would be 0 at every step), warn where it holds for some."""
    if not len(data):
        return
    empty = [i for i, s in enumerate(data.samples) if not bool((s["labels"][1:max_len] != -100).any())]
    if not empty:
        return
    limit = f"--train.max_seq_length {max_len}" if flag_given else f"the model's block_size ({max_len} tokens)"
    prompts = [int((s["labels"] == -100).sum()) for s in (data.samples[i] for i in empty)]
    what = (f"{len(empty)} of the {len(data)} examples in {str(data_dir / 'train.pt')!r} have no answer token within "
            f"{limit} (the longest of their prompts has {max(prompts)} tokens)")
    if len(empty) == len(data):
        fix = "raise --train.max_seq_length" if flag_given else "prepare shorter examples"
        raise ValueError(f"{what}, so training would learn nothing (a loss of 0 at every step): {fix}.")
    print_once(f"warning: {what}; they train nothing.")


def tied_trained_note(model: nn.Module) -> Optional[str]:
    """A note when a module trained in full shares a weight with another module (a head tied to the embeddings),
    which the training then changes too."""
    from lit_gpt.adapters.base import parameter_names, trained_module_state_dict

    names = parameter_names(model)
    for own, p in trained_module_state_dict(model).items():
        others = [n for n in names[id(p)] if n != own]
        if others:
            return f"note: {own} is tied to {others[0]} (one tensor), so training it in full changes both."
    return None


def check_tied_head(config: Config, adapter_config: Any, method: str) -> None:
    if adapter_config is not None and config.tie_embeddings and "head" in adapter_config.targets:
        flag = "--lora_head" if method == "lora" else "--ether_head"
        raise ValueError(
            f"{config.name} ties its output head to the token embeddings, so an adapter on the head could not be "
            f"merged back into the model: drop {flag} true."
        )


# ---------------------------------------------------------------------------------------------- learning rate
def check_router_aux_loss(train: TrainArgs, config: Config, model: str) -> None:
    """`--train.router_aux_loss_coef` balances the routers of a mixture of experts: refused for other models."""
    if train.router_aux_loss_coef and config.mlp_class_name != "LLaMAMoE":
        raise ValueError(f"--train.router_aux_loss_coef {train.router_aux_loss_coef}: {model} is not a "
                         "mixture-of-experts model and has no router to balance; leave it at 0.")


def warmup_warning(warmup_steps: int, steps: int, fraction: Optional[float] = None) -> str:
    """The note for a warm-up as long as the run: its learning rate never reaches the one asked for (litgpt caps the
    warm-up instead; a run that later raises --train.max_steps would then differ from one that had them all along)."""
    if fraction is None:
        given, fix = f"--train.lr_warmup_steps {warmup_steps}", f"lower --train.lr_warmup_steps (e.g. to {steps // 10})"
    else:
        given = f"--train.lr_warmup_fraction {fraction:g} ({warmup_steps} steps)"
        fix = "lower --train.lr_warmup_fraction"
    return (f"Warning: {given} is not below the run's {steps} optimizer steps, so the learning rate only reaches "
            f"{steps / (warmup_steps + 1):.0%} of --train.learning_rate and never decays: {fix}.")


def lr_lambda(warmup_steps: int, max_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------- checkpoints
def trainable_state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
    """Full (unsharded) trainable parameters and optimizer state on the CPU: on rank 0 only when several processes
    run (torch gathers to rank 0 with `cpu_offload`); every rank must call it."""
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


def load_trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict, osd: dict,
                         ckpt: Path = Path("checkpoint")) -> None:
    """Load a checkpoint's trainable tensors and optimizer state; the tensors must be exactly the trainable ones
    (frozen weights are not in a checkpoint, hence `strict=False` below, after this check)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    check_trainable_keys(model, msd, ckpt)
    # a param-group setting this optimizer lacks (`initial_lr`, which the scheduler adds) would fail torch's loader;
    # the settings are this run's flags anyway (`use_optimiser_flags`), only the state tensors matter
    known = set(optimizer.param_groups[0]) if optimizer.param_groups else set()
    osd = dict(osd, param_groups=[{k: v for k, v in g.items() if k in known} for g in osd.get("param_groups", [])])
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


def every_rank_rng_state(fabric) -> list[dict]:
    """Each rank's `rng_state()`, in rank order (a collective: every rank calls it). Dropout draws as many numbers as
    a micro-batch has elements, and micro-batches differ in length between ranks, so the ranks' generators part
    after the first step: a checkpoint keeps them all."""
    state = rng_state()
    if fabric.world_size == 1:
        return [state]
    import torch.distributed as dist

    states: list = [None] * fabric.world_size
    dist.all_gather_object(states, state)
    return states


def seed_rank(seed: int, rank: int, step: int) -> None:
    """A generator stream of this rank's own, from (seed, rank, step): ranks other than 0 draw other dropout masks
    than rank 0 (each rank sees other examples; identical masks on equally long micro-batches would be correlated
    noise), and rank 0's stream is the one a single-device run has."""
    import hashlib

    digest = hashlib.sha256(f"lit_gpt.rank:{seed}:{rank}:{step}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") >> 1
    torch.manual_seed(value)
    random.seed(value)


def restore_rng_state(saved: Any, rank: int, seed: int, step: int) -> None:
    """Set this rank's generators from a checkpoint's `rng`: a list holds every rank's (`every_rank_rng_state`);
    a dict (checkpoints before 2026-11-24) only rank 0's. A rank the checkpoint has no state for (it ran on fewer
    processes) starts a stream of its own."""
    states = saved if isinstance(saved, list) else [saved] if isinstance(saved, dict) else []
    if rank < len(states):
        set_rng_state(states[rank])
    else:
        seed_rank(seed, rank, step)


def checkpoint_validated(saved: dict, steps: int) -> bool:
    """Whether a validation ran at a checkpoint's step before it was written. Checkpoints of earlier versions say so
    only at the last step (`last_of_run`); before it, they were written after any validation due at their step."""
    if "validated" in saved:
        return bool(saved["validated"])
    return bool(saved.get("last_of_run")) if saved["step"] >= steps else True


def find_resume_checkpoint(out_dir: Path) -> Optional[Path]:
    found = checkpoint_steps(out_dir)
    return found[max(found)] if found else None


def check_trainable_keys(model: nn.Module, saved_keys, ckpt: Path) -> None:
    """The checkpoint must hold exactly this run's trainable tensors (a tensor shared by two modules under either
    of its names), or loading it would silently leave weights at their initial values."""
    names_by_param: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names_by_param.setdefault(id(p), []).append(n)
    trained = {n for names in names_by_param.values() for n in names}
    saved_keys = set(saved_keys)
    unexpected = sorted(saved_keys - trained)
    missing = sorted(names[0] for names in names_by_param.values() if not saved_keys.intersection(names))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} trainable tensor(s) of this run (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"holds {len(unexpected)} this run does not train (e.g. {unexpected[0]})")
        raise ValueError(
            f"--resume {str(ckpt)!r} {' and '.join(parts)}: it was written by a run with other adapter flags; "
            "resume with that run's flags, or start a new run without --resume."
        )


def other_runs(out_dir: Path) -> list[Path]:
    """Run directories beside a default `out_dir` with the same method and adapter but another learning rate or batch
    size (the last parts of the default name: `run_name`), that hold checkpoints."""
    prefix = out_dir.name.rsplit("_lr", 1)[0] + "_lr"
    if not out_dir.parent.is_dir():
        return []
    return sorted(d for d in out_dir.parent.iterdir()
                  if d != out_dir and d.name.startswith(prefix) and d.is_dir() and checkpoint_steps(d))


def resolve_resume(resume: Optional[str | Path], out_dir: Path, others: Optional[list[Path]] = None
                   ) -> Optional[Path]:
    """The checkpoint `--resume` names (None: start at step 0). `others`: runs `--resume auto` may have meant, when
    `out_dir` is the default one, whose name holds the learning rate and batch size."""
    if resume is None:
        return None
    if resume == "auto":
        ckpt = find_resume_checkpoint(out_dir)
        if ckpt is None:
            hint = ""
            if others:
                hint = (" (the default --io.out_dir names the learning rate, LoRA+ ratio and batch size; to resume "
                        f"{'one of these runs' if len(others) > 1 else 'the run'} with new ones, pass its folder as "
                        f"--io.out_dir: {', '.join(str(d) for d in others)})")
            print_once(f"--resume auto: no checkpoint in {out_dir / 'checkpoints'}, starting from step 0{hint}.")
        return ckpt
    ckpt = Path(resume)
    if ckpt.is_dir():
        raise ValueError(f"--resume {str(ckpt)!r} is a directory: pass one of its checkpoints/step-*.pth files, or "
                         f"--resume auto with --io.out_dir set to the run directory.")
    if not ckpt.is_file():
        raise FileNotFoundError(f"--resume {str(ckpt)!r} does not exist: pass a checkpoints/step-*.pth file of the "
                                "run, or --resume auto.")
    return ckpt


def _saved_adapter_config(saved: dict, ckpt: Path) -> Optional[dict]:
    """The adapter config a checkpoint was trained with: in the file, or (older checkpoints) its run's hparams."""
    if saved.get("adapter_config") is not None:
        return saved["adapter_config"]
    hparams = ckpt.parent.parent / HPARAMS_FILENAME
    if hparams.is_file():
        hp = read_yaml_file(hparams, ": fix or delete it (this older checkpoint keeps its adapter settings only "
                                     "there, and --resume compares them with the flags).")
        if isinstance(hp, dict) and isinstance(hp.get("adapter_config"), dict):
            return hp["adapter_config"]
    return None


def check_resume_matches(saved: Any, ckpt: Path, method: str, adapter_config: Optional[Any]) -> None:
    """Refuse, in one sentence naming both, a checkpoint of another method or adapter configuration."""
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict) and "step" in saved):
        raise ValueError(f"--resume {str(ckpt)!r} is not a training checkpoint (no model/step): pass a "
                         "checkpoints/step-*.pth file written by finetune/.")
    bad = first_non_finite(saved["model"])
    if bad is not None:
        raise ValueError(f"--resume {str(ckpt)!r} holds non-finite weights ({bad}): resume from an earlier "
                         "checkpoint of the run, or start a new run without --resume.")
    saved_method = saved.get("method")
    if saved_method is not None and saved_method != method:
        script = ("finetune/full.py" if saved_method == "full" else "finetune/lora.py" if saved_method == "lora"
                  else f"finetune/ether.py --Htype {saved_method}")
        raise ValueError(
            f"--resume {str(ckpt)!r} is a checkpoint of method {saved_method!r}, but this run trains {method!r}: "
            f"resume with {script} and the flags the run was started with, or start a new run without --resume."
        )
    if adapter_config is None:
        return
    was = _saved_adapter_config(saved, ckpt)
    if was is None:
        return  # an old checkpoint: the strict key check still catches another set of tensors
    now = adapter_config.to_dict()
    differ = [k for k in now if k not in REGULARISERS and k in was and was[k] != now[k]]
    if differ:
        def show(key: str, value: Any) -> str:  # (blocks as the flag spells them)
            return format_layers(value) if key == "layers" and isinstance(value, list) else repr(value)

        detail = "; ".join(f"{k} was {show(k, was[k])}, now {show(k, now[k])}"
                           + (f" ({field_name(k)})" if field_name(k) != k else "") for k in differ)
        raise ValueError(
            f"--resume {str(ckpt)!r} was trained with another adapter configuration ({detail}): resume with the "
            "flags the run was started with, or start a new run without --resume."
        )


# what a resumed run takes from its own flags, not from the checkpoint: AdamW's hyperparameters and the schedule (the
# schedule's length too, `changed_training_flags`), the batch size, clipping and truncation; AdamW's moments and the
# step counter come from the checkpoint
RESUME_FROM_FLAGS = ("learning_rate", "min_lr", "lr_warmup_steps", "lr_warmup_fraction", "weight_decay", "beta1",
                     "beta2", "global_batch_size", "max_norm", "max_seq_length", "router_aux_loss_coef")


# what fixes the order of the training data, by the flags that set it (the number of processes and the micro-batch
# size do not: `MicroBatchLoader` deals one stream of examples)
DATA_ORDER_FLAGS = {"seed": "--seed", "num_samples": "the size of --io.train_data_dir's train.pt"}


def check_data_order(loader, state: dict, ckpt: Path) -> None:
    """A resume must go on with the data order the checkpoint's run had: refuse other flags in one sentence."""
    differ = loader.order_differences(state)
    if differ:
        detail = "; ".join(f"{DATA_ORDER_FLAGS.get(k, k)} was {old}, now {new}" for k, (old, new) in differ.items())
        raise ValueError(f"--resume {str(ckpt)!r} cannot go on with the same order of the training data ({detail}): "
                         "resume with the flags the run was started with, or start a new run without --resume.")
    loader.load_state_dict(state)


# what a resume reports of a training set prepared again: the prepare_config.yaml settings that change its examples
PREPARE_SETTINGS = ("dataset", "source", "prompt_style", "system_prompt", "seed", "test_split_fraction",
                    "max_seq_length", "mask_inputs")


def data_fingerprint(data, prepared: Optional[dict]) -> dict:
    """What identifies the examples a run trains on, kept in its checkpoints: a hash of every example's tokens and
    labels in their order, and the `prepare_config.yaml` settings that made them (to say what changed)."""
    import hashlib

    samples = data.samples
    digest = hashlib.sha256(torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.int64).numpy())
    for key in ("input_ids", "labels"):
        digest.update(torch.cat([s[key].to(torch.int64) for s in samples]).numpy())
    settings = {k: prepared[k] for k in PREPARE_SETTINGS if prepared is not None and k in prepared}
    return {"sha256": digest.hexdigest(), "prepared": settings}


def check_same_training_data(saved: dict, now: dict, data_dir: Path, ckpt: Path) -> None:
    """A resume trains on the examples its run started with: data prepared again in the same folder (another prompt
    style, system prompt or split) is refused in one sentence, instead of a run that learns two formats."""
    was = saved.get("data_fingerprint")
    if not isinstance(was, dict) or was.get("sha256") in (None, now["sha256"]):
        return  # the same examples (or a checkpoint from before fingerprints were kept)
    old, new = was.get("prepared") or {}, now["prepared"]
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in PREPARE_SETTINGS if old.get(k) != new.get(k)]
    detail = f" ({', '.join(changed)})" if changed else ""
    raise ValueError(
        f"--resume {str(ckpt)!r} trained on other examples than --io.train_data_dir {str(data_dir)!r} holds now: it "
        f"was prepared again since{detail}; resume with the data the run started with (prepare it again as it was), "
        "or start a new run without --resume."
    )


def changed_training_flags(saved: dict, train: TrainArgs, steps: int, n_samples: int, precision: str,
                           adapter_float32: bool = False, loraplus_lr_ratio: Optional[float] = None,
                           quantize: Optional[str] = None) -> list[str]:
    """`--train.X old -> new` for each training setting of this run that differs from the checkpoint's (none for
    checkpoints written before the settings were recorded in them), and `--precision`, `--adapter_float32`,
    `--quantize` likewise."""
    changed = []
    if "quantize" in saved and saved["quantize"] != quantize:
        changed.append(f"--quantize {saved['quantize'] or 'null'} -> {quantize or 'null'}")
    if saved.get("precision") not in (None, precision):
        changed.append(f"--precision {saved['precision']} -> {precision}")
    if saved.get("adapter_float32") not in (None, adapter_float32):
        changed.append(f"--adapter_float32 {str(saved['adapter_float32']).lower()} -> {str(adapter_float32).lower()}")
    if "loraplus_lr_ratio" in saved and saved["loraplus_lr_ratio"] != loraplus_lr_ratio:
        changed.append(f"--loraplus_lr_ratio {_or_null(saved['loraplus_lr_ratio'])} -> {_or_null(loraplus_lr_ratio)}")
    was = saved.get("train")
    if not isinstance(was, dict):
        return changed
    now = asdict(train)
    changed += [f"--train.{k} {was[k]} -> {now[k]}" for k in RESUME_FROM_FLAGS if k in was and was[k] != now[k]]
    was_steps = total_steps(TrainArgs(**{k: v for k, v in was.items() if k in now}), n_samples)
    if was_steps != steps:
        flag = "--train.max_steps" if was.get("max_steps") and train.max_steps else "the schedule's length in steps"
        changed.append(f"{flag} {was_steps} -> {steps}")
    return changed


def loraplus_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors LoRA+ (Hayou et al. 2024, arXiv 2402.12354) gives the higher rate, as PEFT's
    `create_loraplus_optimizer` picks them: LoRA's `B` and every one-dimensional trainable tensor (DoRA's magnitudes,
    and the norms and biases of modules trained in full)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim == 1 or (
        ".adapters." in n and n.endswith(".B")))]


def optimizer_groups(model: nn.Module, train: TrainArgs, loraplus_lr_ratio: Optional[float] = None) -> list[dict]:
    """AdamW's parameter groups: every trainable tensor at `--train.learning_rate`, but with LoRA+
    (`--loraplus_lr_ratio`) those of `loraplus_parameters` at that rate times the ratio."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        return [{"params": trainable}]
    plus = {id(p) for p in loraplus_parameters(model)}
    groups = [{"params": [p for p in trainable if id(p) not in plus]},
              {"params": [p for p in trainable if id(p) in plus], "lr": train.learning_rate * loraplus_lr_ratio}]
    return [g for g in groups if g["params"]]


def _or_null(value: Optional[float]) -> str:
    return "null" if value is None else f"{value:g}"


def use_optimiser_flags(optimizer: torch.optim.Optimizer, train: TrainArgs, plus: Optional[set[int]] = None,
                        loraplus_lr_ratio: Optional[float] = None) -> None:
    """Loading a checkpoint's optimizer state restored its lr, weight decay and betas: put this run's flags back,
    keeping AdamW's moments and step counts (`initial_lr` is the base rate the scheduler scales); the group of the
    parameters `plus` (their ids: `loraplus_parameters`) at the rate times `loraplus_lr_ratio`."""
    for group in optimizer.param_groups:
        lr = train.learning_rate
        if loraplus_lr_ratio is not None and any(id(p) in (plus or ()) for p in group["params"]):
            lr *= loraplus_lr_ratio
        group.update(lr=lr, initial_lr=lr, weight_decay=train.weight_decay, betas=(train.beta1, train.beta2))


class MetricsCSV:
    """`logs/metrics.csv` in Lightning's CSVLogger layout (a row per log call, sorted columns, a `step` column), but
    every row is on disk when `log` returns (a killed run keeps its curves) and a resumed run keeps the rows up to
    the step it resumes from (the later ones are redone)."""

    def __init__(self, path: Path, keep_until_step: int) -> None:
        self.path = Path(path)
        self.keys: list[str] = []
        if self.path.is_file():
            rows, keys = self._read()
            kept = [r for r in rows if _row_step(r) is not None and _row_step(r) <= keep_until_step]
            self.keys = keys
            if len(kept) != len(rows):
                self._rewrite(kept)

    def _read(self) -> tuple[list[dict], list[str]]:
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=self.keys, restval="")
                writer.writeheader()
                writer.writerows(rows)

    def log(self, metrics: dict, step: int) -> None:
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        row["step"] = step
        if not set(row) <= set(self.keys):  # a new column: the header changes, so the file is rewritten once
            rows = self._read()[0] if self.path.is_file() else []
            self.keys = sorted(set(self.keys) | set(row))
            self._rewrite(rows)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.keys, restval="").writerow(row)


def _row_step(row: dict) -> Optional[int]:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- entry
# the layer flags' defaults when neither they nor --*_targets are given (the ETHER paper's queries and values)
DEFAULT_TARGETS = ("query", "value")


def _target_names(given: Union[str, Sequence[str]], flag: str) -> list[str]:
    """`--*_targets`'s value as targets of a lit_gpt.GPT, the named ones in their canonical order, then module names
    and patterns sorted: names separated by commas or a list, `all-linear` (PEFT's rule: every linear layer but the
    output head), transformers' layer names (q_proj, v_proj, ...) taken as the target they are here, and module names
    (`attn.proj`, `transformer.h.0.attn.qkv`), globs and `re:` patterns (`AdapterConfig.targets`)."""
    from lit_gpt.adapters.base import HF_TARGET_NAMES
    from lit_gpt.adapters.config import ALL_LINEAR, GPT_TARGETS

    items = _split_names(given) if isinstance(given, str) else list(given)
    names = [str(item).strip() for item in items if str(item).strip()]
    if not names:
        raise ValueError(f"{flag} names no layer: pass {ALL_LINEAR} or some of {', '.join(GPT_TARGETS)} (e.g. "
                         f"{flag} query,value).")
    chosen, mlp_names, patterns = set(), set(), set()
    for name in names:
        ours = name.lower()
        if name.startswith("re:") or "." in name or any(c in name for c in "*?["):
            patterns.add(name)  # a module name or pattern, as the API takes it (checked when it is applied)
        elif ours == ALL_LINEAR:
            chosen.update(t for t in GPT_TARGETS if t != "head")
        elif ours in GPT_TARGETS:
            chosen.add(ours)
        elif ours in HF_TARGET_NAMES:  # PEFT's target_modules names, e.g. q_proj
            chosen.update(t.strip() for t in HF_TARGET_NAMES[ours].replace(" and ", ",").split(","))
            if HF_TARGET_NAMES[ours] == "mlp":
                mlp_names.add(ours)
        else:
            router = (" (a mixture of experts' router is mlp.gate)" if ours in ("gate", "router", "block_sparse_moe")
                      else "")
            raise ValueError(f"{flag}: {name!r} is not a layer name here{router}: pass {ALL_LINEAR} or some of "
                             f"{', '.join(GPT_TARGETS)} (transformers' q_proj, k_proj, v_proj, o_proj, gate_proj, "
                             "up_proj, down_proj and lm_head are taken too), module names such as attn.proj or "
                             "mlp.gate, or 're:<regex>' patterns.")
    if mlp_names and not any(family <= mlp_names for family in _HF_MLP_LAYERS):
        family = next((f for f in _HF_MLP_LAYERS if mlp_names & f), sorted(mlp_names))
        layers = [n for n in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h",
                              "w1", "w2", "w3") if n in family] or ["c_fc", "c_proj"]  # (GPT-2's)
        raise ValueError(f"{flag}: {', '.join(sorted(mlp_names))} is only part of the MLP here, whose target, mlp, "
                         f"adapts all of its linear layers ({', '.join(layers)}): pass mlp (or all of them), or name "
                         "ours for some (the gate projection, gate_proj or w1, is mlp.fc_1; the up projection, "
                         "up_proj or w3, mlp.fc_2; the down projection, down_proj or w2, mlp.proj; in a mixture of "
                         "experts a pattern such as 're:.*experts\\.\\d+\\.fc_1').")
    return [t for t in GPT_TARGETS if t in chosen] + sorted(patterns)


# transformers' names of one MLP's linear layers (GPT-2's c_fc/c_proj: the mlp target, c_proj also naming attention's)
_HF_MLP_LAYERS = ({"gate_proj", "up_proj", "down_proj"}, {"fc1", "fc2"}, {"dense_h_to_4h", "dense_4h_to_h"},
                  {"w1", "w2", "w3"})  # (Mixtral's experts')


def _split_names(given: str) -> list[str]:
    """`given` split at its commas, but not at those inside brackets (a `re:` pattern's `{1,2}` or `[a,b]`)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(given):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth <= 0:
            items.append(given[start:i])
            start = i + 1
    return items + [given[start:]]


def layers_from_flag(given: Optional[Union[int, str, Sequence[int]]], flag: str) -> Optional[list[int]]:
    """`--*_layers`'s value (PEFT's layers_to_transform) as sorted block indices: an index, indices and inclusive
    ranges separated by commas (`0-7,30,31`), or a list; None (unset) is every block."""
    if given is None:
        return None
    items = [given] if isinstance(given, int) else given.split(",") if isinstance(given, str) else list(given)
    how = f"pass indices from 0 and inclusive ranges separated by commas (e.g. {flag} 0-3,8), or leave it unset for " \
          "every block"
    if isinstance(given, str) and not given.strip():
        raise ValueError(f"{flag} is empty: {how}.")
    layers = set()
    for item in items:
        text = str(item).strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
        if isinstance(item, bool) or m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"{flag} {given}: {text!r} is not a block index or a range of them: {how}.")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last > MAX_BLOCK_INDEX:  # (a typo's range is not built: no model has that many blocks)
            raise ValueError(f"{flag} {given}: block {last} is past the blocks of any model: pass indices from 0 to "
                             "the model's number of layers - 1.")
        layers.update(range(first, last + 1))
    return sorted(layers)


MAX_BLOCK_INDEX = 100_000


def train_modules_from_flag(given: Optional[Union[str, Sequence[str]]]) -> list[str]:
    """`--*_train_modules`'s value: names separated by commas, or a list; `head`, `embeddings`, `norms` (the named
    train modules of a lit_gpt.GPT), module names and patterns of `lit_gpt.GPT` (`transformer.ln_f`, `re:...`), and
    transformers' names of the same modules (PEFT's modules_to_save: embed_tokens, input_layernorm, ...). In one
    order whatever the given one (the named modules first, then the rest sorted), `lm_head` as `head`, so that a run
    spelled otherwise is the same run (its folder's name, a resume)."""
    from lit_gpt.adapters.base import hf_train_module
    from lit_gpt.adapters.config import GPT_TRAIN_MODULES

    if given is None:
        return []
    items = _split_names(given) if isinstance(given, str) else list(given)
    names = set()
    for item in (str(item).strip() for item in items):
        if item:
            name = hf_train_module(item) or item  # (a family-dependent name stays: the model resolves it)
            names.add("head" if name == "lm_head" else name)
    return [n for n in GPT_TRAIN_MODULES if n in names] + sorted(names - set(GPT_TRAIN_MODULES))


def targets_from_flags(prefix: str, targets: Optional[Union[str, Sequence[str]]] = None,
                       **flags: Optional[bool]) -> list[str]:
    """The adapted layers: `--{prefix}_targets` when given, else the `--{prefix}_query` ... `--{prefix}_head`
    flags, whose unset (None) ones take their defaults (`DEFAULT_TARGETS` on). A layer flag set as well must agree
    with `--{prefix}_targets` (a config file may set them), else one sentence names both."""
    if targets is not None:
        flag = f"--{prefix}_targets"
        chosen = _target_names(targets, flag)
        given = targets if isinstance(targets, str) else ",".join(map(str, targets))
        for name, on in flags.items():
            if on is not None and on != (name in chosen):
                raise ValueError(
                    f"--{prefix}_{name} {str(on).lower()} contradicts {flag} {given}, which "
                    f"{'adapts' if name in chosen else 'leaves out'} the {name} layers: drop one of the two (set "
                    f"--{prefix}_{name} null to unset it from a config file)."
                )
        return chosen
    chosen = [name for name, on in flags.items() if (name in DEFAULT_TARGETS if on is None else on)]
    if not chosen:
        raise ValueError("No layer is adapted: enable at least one of "
                         + ", ".join(f"--{prefix}_{n}" for n in flags) + f", or pass --{prefix}_targets.")
    return chosen


def run_entrypoint(method: str, adapter_config: Optional[Any], args: dict) -> Optional[Path]:
    """What every `finetune/*.py` does with its parsed flags: plan (`--dry_run`) or train."""
    check_kind(args.get("quantize"))
    if args["dry_run"]:
        from lit_gpt.adapters import plan_report

        check_numbers(args["train"], args["eval"], args["devices"], args["num_nodes"], args["seed"], this_machine=False)
        model = args["model_name"]
        if model is None:  # plan for the checkpoint the run would train
            io = args["io"]
            if io.checkpoint_dir is None and io.train_data_dir is None:
                raise ValueError("--dry_run plans for a model: name it with --model_name (e.g. Llama-2-7b-hf) or "
                                 "--io.checkpoint_dir, or pass the --io.train_data_dir the run would train on.")
            ckpt = Path(io.checkpoint_dir or Path(io.train_data_dir).parent)
            if io.checkpoint_dir is None and not (ckpt / CONFIG_FILENAME).is_file():
                raise FileNotFoundError(
                    f"No --io.checkpoint_dir or --model_name was given, so the model was looked for in {str(ckpt)!r}, "
                    f"the parent of --io.train_data_dir, which has no {CONFIG_FILENAME}: pass --io.checkpoint_dir "
                    "or --model_name."
                )
            if not ckpt.is_dir() and not ckpt.is_file():
                from lit_gpt.utils import missing_checkpoint_dir_error

                raise missing_checkpoint_dir_error(ckpt, "--io.checkpoint_dir")
            model = Config.from_checkpoint(ckpt)
        else:
            model = Config.from_name(model)
        check_tied_head(model, adapter_config, method)
        check_router_aux_loss(args["train"], model, model.name)
        precision = args["precision"] or default_precision(args["devices"] * args["num_nodes"])
        check_precision(precision, adapter_config, args["devices"] * args["num_nodes"])
        adapter_float32 = resolve_adapter_float32(args.get("adapter_float32"), adapter_config, precision)
        print(plan_report(model, adapter_config, precision, adapter_float32=adapter_float32,
                          world_size=args["devices"] * args["num_nodes"], quantize=args.get("quantize")))
        return None
    # the flags only: never a class or module a script happened to have in scope
    cli_args = {k: v for k, v in args.items() if k not in ("io", "train", "eval", "adapter", "targets", "extra")
                and not (inspect.isclass(v) or inspect.ismodule(v) or inspect.isroutine(v))}
    cli_args.update(train=asdict(args["train"]), eval=asdict(args["eval"]))
    return finetune(
        method=method, adapter_config=adapter_config, io=args["io"], train=args["train"], eval=args["eval"],
        precision=args["precision"], devices=args["devices"], num_nodes=args["num_nodes"], seed=args["seed"],
        resume=args["resume"], cli_args=cli_args, adapter_float32=args.get("adapter_float32"),
        logger_name=args.get("logger_name", "tensorboard"), loraplus_lr_ratio=args.get("loraplus_lr_ratio"),
        quantize=args.get("quantize"),
    )


def make_loader(train_data, train: TrainArgs, seed: int, rank: int, world_size: int, pad_id: int,
                max_len: Optional[int]):
    """The training order; the longest micro-batch comes first, so an out-of-memory error shows at step 1."""
    from lit_gpt.data import MicroBatchLoader

    return MicroBatchLoader(train_data, train.micro_batch_size, seed=seed, rank=rank, world_size=world_size,
                            pad_id=pad_id, max_seq_length=max_len, longest_first=True)


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
    adapter_float32: Optional[bool] = None,
    logger_name: str = "tensorboard",
    loraplus_lr_ratio: Optional[float] = None,
    quantize: Optional[str] = None,
) -> Path:
    """Fine-tune the checkpoint in `io.checkpoint_dir` with `adapter_config` (None: every weight); returns the run
    directory."""
    from lit_gpt.adapters import apply_adapters, save_adapters
    from lit_gpt.tokenizer import Tokenizer

    die_with_launcher()
    # every input is checked before any process is launched, so a typo costs seconds, not a cluster allocation
    check_numbers(train, eval, devices, num_nodes, seed)
    check_train_data_given(io)
    resume = normalize_resume(resume)
    inferred_checkpoint = io.checkpoint_dir is None
    given_val = io.val_data_dir is not None
    given_out = io.out_dir is not None
    if loraplus_lr_ratio is not None and not (isinstance(loraplus_lr_ratio, (int, float)) and not isinstance(
            loraplus_lr_ratio, bool) and 0 < loraplus_lr_ratio < math.inf):
        raise ValueError(f"--loraplus_lr_ratio {loraplus_lr_ratio}: pass a positive number (the LoRA+ paper's and "
                         "PEFT's suggestion is 16), or leave it unset for one learning rate.")
    io = resolve_io(io, run_name(method, adapter_config, train, loraplus_lr_ratio), resume)
    check_run_dir(io.out_dir, given_out, resume)
    # the data first: a typo in --io.train_data_dir is about the data, not about its parent folder not being a model
    train_data = load_data_dir(io.train_data_dir, "train", "--io.train_data_dir")
    val_data = load_data_dir(io.val_data_dir, "test", "--io.val_data_dir" if given_val else "--io.train_data_dir")
    check_base_checkpoint(io, inferred_checkpoint)
    tokenizer = Tokenizer(io.checkpoint_dir)
    config = Config.from_checkpoint(io.checkpoint_dir)
    prepared = prepared_config(io.train_data_dir)
    check_data_matches_model(io.train_data_dir, train_data, prepared, tokenizer, config, io.checkpoint_dir)
    use_loss_ignore_index(train_data, prepared)
    val_prepared = prepared if io.val_data_dir == io.train_data_dir else prepared_config(io.val_data_dir)
    if io.val_data_dir != io.train_data_dir:
        check_data_matches_model(io.val_data_dir, val_data, val_prepared, tokenizer, config, io.checkpoint_dir)
        warn_other_val_format(io.train_data_dir, prepared, io.val_data_dir, val_prepared)
    use_loss_ignore_index(val_data, val_prepared)
    check_answers_fit(train_data, min(train.max_seq_length or config.block_size, config.block_size), io.train_data_dir,
                      train.max_seq_length is not None)
    world_size = devices * num_nodes
    check_tied_head(config, adapter_config, method)
    check_router_aux_loss(train, config, f"{io.checkpoint_dir} ({config.name})")
    if adapter_config is not None:  # an nb that does not divide a width fails here, on the meta device, in ms
        with torch.device("meta"):
            apply_adapters(GPT(config), adapter_config)
    precision = precision or default_precision(world_size)
    check_precision(precision, adapter_config, world_size)
    adapter_float32 = resolve_adapter_float32(adapter_float32, adapter_config, precision)
    out_dir = Path(io.out_dir)
    steps = total_steps(train, len(train_data))

    # --resume: the checkpoint must be this run's (method, adapter, data order) before anything is written
    ckpt = resolve_resume(resume, out_dir, others=None if given_out else other_runs(out_dir))
    saved, changed = None, []
    fingerprint = data_fingerprint(train_data, prepared)
    if ckpt is not None:
        saved = load_file(ckpt, mmap=False)
        check_resume_matches(saved, ckpt, method, adapter_config)
        check_same_training_data(saved, fingerprint, io.train_data_dir, ckpt)
        if saved.get("data") is not None:
            check_data_order(make_loader(train_data, train, seed, 0, world_size, 0, None), saved["data"], ckpt)
        final = out_dir / final_filename(method)
        if saved["step"] >= steps and final.is_file():
            print_once(f"The run in {out_dir} already finished: {ckpt.name} is at step {saved['step']} of {steps} and "
                  f"{final.name} exists, so there is nothing to train (raise --train.max_steps to train on).")
            if not launched_as_another_rank():  # what the finished run lacks: final/, or the --merge asked for now
                finish_finished_run(out_dir, final, io.checkpoint_dir, adapter_config is not None,
                                    bool(cli_args.get("merge")))
            return out_dir
        if saved["step"] > steps:
            raise ValueError(f"--resume {str(ckpt)!r} is at step {saved['step']}, past the {steps} steps of this "
                             "run: raise --train.max_steps, or resume from an earlier checkpoint.")
        changed = changed_training_flags(saved, train, steps, len(train_data), precision, adapter_float32,
                                         loraplus_lr_ratio, quantize)
        was_world = saved.get("world_size", (saved.get("data") or {}).get("world_size"))
        if was_world not in (None, world_size):
            changed.append(f"--devices × --num_nodes {was_world} -> {world_size}")
    start_step = saved["step"] if saved is not None else 0
    warmup = train.warmup_steps(len(train_data))
    if warmup >= steps and start_step < steps:
        print_once(warmup_warning(warmup, steps, train.lr_warmup_fraction), file=sys.stderr)

    # steps are logged as 1, 2, ...: a run resumed at step N logs N + 1 first, and TensorBoard drops what the old
    # event files hold from there on (metrics.csv keeps the same rows: `MetricsCSV`)
    fabric = build_fabric(devices, num_nodes, precision, out_dir, train.activation_checkpointing,
                          purge_step=start_step + 1, adapter_config=adapter_config,
                          adapter_float32=adapter_float32, logger_name=logger_name)
    launch(fabric)
    fabric.seed_everything(seed)

    # model: loaded on the CPU straight into the training dtype (memory-mapped, one copy), adapted, then sharded
    with torch.device("meta"):
        model = GPT(config)
    load_model_weights(model, io.checkpoint_dir / "lit_model.pth", dtype=precision_dtype(precision))
    if adapter_config is not None:
        apply_adapters(model, adapter_config)
    if quantize is not None:  # made on the training device, one weight at a time (FSDP2: every process keeps all)
        fabric.print(quantize_note(model, quantize))
        quantize_model(model, quantize, device=fabric.device)
    model.activation_checkpointing = train.activation_checkpointing
    if keeps_trainable_float32(precision, adapter_config, adapter_float32):
        why = ("float16 ones round AdamW's steps to NaN" if precision.startswith("16-true")
               else "DoRA's magnitudes would not train in bfloat16" if getattr(adapter_config, "dora", False)
               else "--adapter_float32: no Adam step is rounded away")
        half = "float16" if precision.startswith("16-true") else "bfloat16"
        trained = ", ".join(adapter_config.train_modules)
        also = f" and the modules trained in full ({trained})" if trained else ""
        fabric.print(f"--precision {precision}: the adapter's weights, gradients and AdamW state are float32 ({why}); "
                     f"the frozen model{also} and the activations are {half}.")
    fabric.print(
        f"trainable parameters: {num_parameters(model, requires_grad=True):,}  "
        f"frozen: {num_parameters(model, requires_grad=False):,}"
    )
    note = tied_trained_note(model) if adapter_config is not None else None
    if note:
        fabric.print(note)
    fabric.print(training_plan(train, steps, len(train_data)))
    if train.lr_warmup_fraction is not None:
        fabric.print(f"--train.lr_warmup_fraction {train.lr_warmup_fraction:g} of an epoch: {warmup:,} warm-up "
                     f"step{'s' if warmup != 1 else ''} (instead of --train.lr_warmup_steps).")
    model = fabric.setup_module(model)

    optimizer = torch.optim.AdamW(
        optimizer_groups(model, train, loraplus_lr_ratio), lr=train.learning_rate, weight_decay=train.weight_decay,
        betas=(train.beta1, train.beta2)
    )
    optimizer = fabric.setup_optimizers(optimizer)

    state = {"step": 0, "data": None, "last_good": None, "checkpoint_last": adapter_config is not None,
             "validated": False}
    if saved is None and fabric.global_rank > 0:  # (after the model's initialisation, which every rank makes alike)
        seed_rank(seed, fabric.global_rank, 0)
    if saved is not None:
        # AdamW's moments and step counts from the checkpoint; its lr, weight decay and betas from the flags
        load_trainable_state(model.module, optimizer.optimizer, saved["model"], saved["optimizer"], ckpt)
        use_optimiser_flags(optimizer.optimizer, train, {id(p) for p in loraplus_parameters(model)}, loraplus_lr_ratio)
        state["step"] = saved["step"]
        state["data"] = saved["data"]
        state["last_good"] = ckpt
        state["validated"] = checkpoint_validated(saved, steps)
        restore_rng_state(saved["rng"], fabric.global_rank, seed, saved["step"])
        if saved.get("precision_state"):  # 16-mixed: the loss scale the run had learnt (not its start again)
            fabric.strategy.precision.load_state_dict(saved["precision_state"])
        fabric.print(f"Resumed from {ckpt} at step {state['step']}.")
        if changed:
            fabric.print(f"Resumed with other settings than the checkpoint's (old -> new): "
                         f"{', '.join(changed)}; steps {state['step'] + 1} on use the new ones.")
    # the schedule of this run's flags, at the resumed step (`last_epoch` is the step before, which the scheduler's
    # first `step()` moves on): not the checkpoint's scheduler state, which holds the old base rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup, steps, train.min_lr / train.learning_rate),
        last_epoch=state["step"] - 1,
    )

    # only now, with every check passed, does the run directory change
    # `precision` as given (null: the device's default, chosen again when `--config` replays the file on another
    # machine), `precision_used` as resolved here
    hparams = dict(cli_args, method=method, precision_used=precision,
                   adapter_config=adapter_config.to_dict() if adapter_config is not None else None,
                   io={k: str(v) if v is not None else None for k, v in asdict(io).items()},
                   base_checkpoint_dir=str(Path(io.checkpoint_dir).resolve()),
                   started_in=str(Path.cwd()))  # what the relative `io` paths are relative to (`--config` of it)
    if prepared is not None:  # the prompt format the model learns: merge, chat and eval prompt with it
        hparams["prompt_style"] = {"prompt_style": prepared.get("prompt_style", "alpaca"),
                                   "system_prompt": prepared.get("system_prompt")}
    logs = {}

    def start_logs() -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        freed = remove_partial_writes(out_dir)
        if freed:
            fabric.print(f"Removed {len(freed)} partly written file{'s' if len(freed) > 1 else ''} of a process "
                         f"killed while saving ({', '.join(freed)}).")
        if saved is not None:
            aside = set_aside_later_branch(out_dir, saved["step"])
            if aside is not None:
                fabric.print(f"Resuming step {saved['step']} of a run that went further: its later checkpoints, final "
                             f"file and metrics are now in {aside}.")
        path = out_dir / HPARAMS_FILENAME
        if saved is not None and path.is_file() and changed_hparams(path, _plain(hparams)):  # the flags of steps 1..N
            (out_dir / "logs").mkdir(exist_ok=True)
            os.replace(path, out_dir / "logs" / f"hyperparameters.until-step-{saved['step']:06d}.yaml")
        atomic_write_text(path, yaml.safe_dump(_plain(hparams), sort_keys=False))
        logs["csv"] = MetricsCSV(out_dir / "logs" / METRICS_FILENAME, keep_until_step=state["step"])

    write_on_rank_0(fabric, out_dir / HPARAMS_FILENAME, start_logs, state["last_good"])

    def log_metrics(metrics: dict, step: int) -> None:
        fabric.log_dict(metrics, step=step)
        if logs.get("csv") is not None:  # rank 0
            try:
                logs["csv"].log(metrics, step)
            except OSError as e:  # a full disk: the run goes on (a checkpoint it cannot write stops it, in one line)
                fabric.print(f"warning: could not write {logs['csv'].path} ({e.strerror or e}): it stops at the rows "
                             f"before step {step}; the other logs (--logger_name) and the checkpoints go on.")
                logs["csv"] = None

    def save_checkpoint(step: int, data_state: dict, validated: bool) -> Path:
        msd, osd = trainable_state_dict(model.module, optimizer.optimizer)
        rng = every_rank_rng_state(fabric)
        path = out_dir / "checkpoints" / f"step-{step:06d}.pth"
        check_finite(msd, f"checkpoint {path}", step, state["last_good"], precision, fabric, train.max_norm)
        write_on_rank_0(fabric, path, lambda: atomic_save(
            {"model": msd, "optimizer": osd, "step": step, "data": data_state, "rng": rng,
             "precision_state": fabric.strategy.precision.state_dict(),  # 16-mixed's GradScaler; {} otherwise
             "world_size": fabric.world_size, "method": method, "train": asdict(train), "precision": precision,
             "adapter_float32": adapter_float32, "loraplus_lr_ratio": loraplus_lr_ratio, "quantize": quantize,
             "validated": validated,  # whether a validation ran at this step before it was written
             "data_fingerprint": fingerprint,
             "adapter_config": adapter_config.to_dict() if adapter_config is not None else None}, path),
            state["last_good"])
        state["last_good"] = path
        return path

    if len(val_data) == 0 or eval.max_iters == 0:
        why = (f"{str(io.val_data_dir / 'test.pt')!r} holds no examples" if len(val_data) == 0
               else "--eval.max_iters is 0")
        fabric.print(f"No validation: {why}.")
    status = "failed"
    # a signal from here on stops the run after a step with a checkpoint; once the loop is over, the run finishes
    with StopRequest(announce=fabric.global_rank == 0) as stop:
        try:
            fit(fabric, model, optimizer, scheduler, train_data, val_data, tokenizer, train, eval, state, steps, seed,
                save_checkpoint, log_metrics, precision, pad_id=0, stop=stop)
            status = "success"
        except TrainingStopped:
            status = "stopped"
            raise
        except RuntimeError as e:
            if fabric.world_size == 1 or not peer_lost(e):
                raise
            kept = (f"the last complete checkpoint, {state['last_good']}, is intact: run the same command with "
                    "--resume auto" if state["last_good"] is not None else "no checkpoint was written yet")
            how = how_peers_ended(fabric)
            how = f": {how}" if how else " (killed? out of memory?)"
            raise PeerLostError(f"Another process of the run ended without a word while rank {fabric.global_rank} "
                                f"waited for it{how}; {kept}.") from None
        finally:  # flush the TensorBoard logs whatever happened, so a failed run still shows its curves
            for logger in fabric.loggers:
                logger.finalize(status)

        # the final artefact: the adapter (or the full weights) as a standalone file
        final = out_dir / final_filename(method)
        msd, _ = trainable_state_dict(model.module)
        check_finite(msd, str(final), steps, state["last_good"], precision, fabric, train.max_norm)
        # the adapter file carries the prompt format it was trained with, for when it is copied away from the run
        write_on_rank_0(fabric, final, lambda: save_adapters(model.module, final, state_dict=msd,
                                                             prompt_style=hparams.get("prompt_style"))
                        if adapter_config is not None else atomic_save(msd, final), state["last_good"])
        fabric.print(f"Saved {final}")
        if adapter_config is None:  # full fine-tuning: the model folder chat, generate and eval take as it is
            folder = out_dir / FINAL_DIRNAME
            write_on_rank_0(fabric, folder, lambda: write_final_folder(out_dir, final, io.checkpoint_dir,
                                                                       log=fabric.print), state["last_good"])
    # outside the stop request: Ctrl-C stops a long merge at once (its files are written as one set)
    if adapter_config is not None and cli_args.get("merge") and fabric.global_rank == 0:
        merge_after_training(out_dir, final, log=fabric.print)
    elif (adapter_config is not None and (out_dir / MERGED_DIRNAME).is_dir()
          and not merged_from(out_dir / MERGED_DIRNAME, final)):  # a merge of an earlier final file: say so
        print_once(f"warning: {out_dir / MERGED_DIRNAME} holds a merge of the run's earlier {final.name}, not of this "
                   f"one: merge again (--resume auto --merge true, or python scripts/{merge_script_for(final)} "
                   f"--adapter_path "
                   f"{final}).", file=sys.stderr)
    return out_dir


def training_plan(train: TrainArgs, steps: int, n_samples: int) -> str:
    """One line: the optimizer steps, their examples, and how many passes over the training set that makes (with
    `--train.max_steps`, which overrides `--train.epochs`, as HF's Trainer does)."""
    passes = steps * train.global_batch_size / n_samples
    how = "--train.max_steps; it overrides --train.epochs" if train.max_steps else "--train.epochs"
    batch = train.global_batch_size
    return (f"Training for {steps:,} optimizer step{'s' if steps != 1 else ''} of {batch:,} "
            f"example{'s' if batch != 1 else ''} ({how}): {passes:.3g} pass{'es' if passes != 1 else ''} over the "
            f"{n_samples:,} training example{'s' if n_samples != 1 else ''}.")


def total_steps(train: TrainArgs, n_samples: int) -> int:
    if train.max_steps:
        return train.max_steps
    epoch_size = train.epoch_size or n_samples
    return max(1, -(-train.epochs * epoch_size // train.global_batch_size))  # every example `epochs` times


def final_filename(method: str) -> str:
    if method == "full":
        return "lit_model_finetuned.pth"
    family = "lora" if method == "lora" else "ether"
    return f"lit_model_{family}_finetuned.pth"


FINAL_FILENAMES = tuple(final_filename(method) for method in ("ether", "lora", "full"))


def run_name(method: str, adapter_config: Optional[Any], train: TrainArgs,
             loraplus_lr_ratio: Optional[float] = None) -> str:
    def names(items: list[str]) -> str:  # (the characters of a pattern a folder name cannot hold are dropped)
        return "-".join(re.sub(r"[^A-Za-z0-9.]+", "", item) for item in items)

    parts = [method]
    if adapter_config is not None:
        if method == "lora":
            parts.append(f"r{adapter_config.r}")
        else:
            parts.append(f"nb{adapter_config.nb}")
        parts.append(names(adapter_config.targets))  # (all-linear too: a resume finds earlier runs' folders)
        if getattr(adapter_config, "layers", None) is not None:
            parts.append("layers" + format_layers(adapter_config.layers).replace(",", "."))
        if getattr(adapter_config, "train_modules", None):
            parts.append("train-" + names(adapter_config.train_modules))
        if getattr(adapter_config, "flip_side", False):
            parts.append("flip")
        if getattr(adapter_config, "dora", False):
            parts.append("dora")
        if getattr(adapter_config, "init", "default") != "default":
            parts.append(adapter_config.init.replace("_niter_", "-niter"))
    # (the rates last, `other_runs` offers the same run with other ones to `--resume auto`)
    plus = "" if loraplus_lr_ratio is None else f"-plus{loraplus_lr_ratio:g}"
    parts += [f"lr{train.learning_rate:g}{plus}", f"bs{train.global_batch_size}"]
    return "_".join(parts)


def changed_hparams(path: Path, new: dict) -> bool:
    """Whether a resume's settings differ from those `path` recorded (apart from `--resume` itself)."""
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, not UTF-8, not YAML: treat as changed
        return True
    if not isinstance(old, dict):
        return True
    return {k: v for k, v in old.items() if k != "resume"} != {k: v for k, v in new.items() if k != "resume"}


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
        state: dict, steps: int, seed: int, save_checkpoint, log_metrics, precision: str, pad_id: int,
        stop: Optional[StopRequest] = None) -> None:
    accum = train.gradient_accumulation_iters(fabric.world_size)
    max_len = min(train.max_seq_length or model.module.config.block_size, model.module.config.block_size)
    loader = make_loader(train_data, train, seed, fabric.global_rank, fabric.world_size, pad_id, max_len)
    if state["data"] is not None:
        loader.load_state_dict(state["data"])
    batches = iter(loader)
    progress = _progress(fabric, state["step"], steps)
    validating = len(val_data) > 0 and eval.max_iters > 0

    scaler = getattr(fabric.strategy.precision, "scaler", None)  # a GradScaler under 16-mixed, else None
    aux_coef = train.router_aux_loss_coef  # (a mixture-of-experts model: `finetune` refuses it for others)

    def non_finite(what: str, step: int) -> NonFiniteLossError:
        return _non_finite_error(what, step, state["last_good"], precision, max_norm=train.max_norm)

    def due(step: int) -> bool:  # a validation at this step: every --eval.interval steps, and after the last one
        return validating and (step == steps or bool(eval.interval) and step % eval.interval == 0)

    def validate_here(step: int) -> None:  # a stop requested meanwhile abandons it: a resume runs it again
        if not validate_and_log(fabric, model, val_data, tokenizer, eval, max_len, pad_id, step, progress, log_metrics,
                                non_finite, stop, final=step == steps):
            stop_after(step)

    def stop_after(step: int) -> None:  # before the step's validation, or cut short in it
        path = save_checkpoint(step, loader.state_dict(), validated=False)
        progress.close()
        signum = stop.signum or signal.SIGTERM  # (a signal another rank received)
        fabric.print(f"Stopped by {signal.Signals(signum).name} after step {step} of {steps}, with a checkpoint of it: "
                     f"{path}. The same command with --resume auto goes on from there.")
        raise TrainingStopped(128 + signum)

    start = state["step"]
    try:
        trained = {"seconds": 0.0, "tokens": 0}  # the optimisation steps only (no validation or checkpoints)
        # a checkpoint written before its step's validation (a stop came first, or cut it short): that validation
        # first (at the last step, the final validation below)
        if 0 < start < steps and due(start) and not state["validated"]:
            validate_here(start)
        if start == 0 and validating and eval.initial_validation:  # (a stop meanwhile waits for step 1's end)
            validate_and_log(fabric, model, val_data, tokenizer, eval, max_len, pad_id, 0, progress, log_metrics,
                             non_finite)
        model.train()
        while state["step"] < steps:
            t0 = time.perf_counter()
            step = state["step"] + 1
            loss_sum, aux_sum, tokens = torch.zeros((), device=fabric.device), torch.zeros((), device=fabric.device), 0
            for i in range(accum):
                batch = next(batches)
                input_ids, labels = batch["input_ids"].to(fabric.device), batch["labels"].to(fabric.device)
                with fabric.no_backward_sync(model, enabled=i < accum - 1):
                    if aux_coef:
                        loss, aux = model(input_ids, labels=labels, lengths=batch["lengths"].to(fabric.device),
                                          router_aux_loss=True)
                        fabric.backward((loss + aux_coef * aux) / accum)
                        aux_sum += aux.detach()
                    else:
                        loss = model(input_ids, labels=labels)
                        fabric.backward(loss / accum)
                loss_sum += loss.detach()
                tokens += input_ids.numel()
            # one all-reduce (mean) for the losses and for whether any rank was asked to stop
            asked = float(stop.signum) if stop is not None else 0.0
            both = torch.stack([loss_sum / accum, torch.full_like(loss_sum, asked), aux_sum / accum])  # (no copy in)
            loss_val, stopping, aux_val = fabric.all_reduce(both).tolist()
            if not math.isfinite(loss_val):
                raise non_finite(f"The training loss became {loss_val}", step)
            if not math.isfinite(aux_val):
                raise non_finite(f"The routers' load-balancing loss became {aux_val}", step)
            if train.max_norm:
                try:
                    # 16-mixed: an overflow is the loss scaler's to handle (it skips the step and lowers the scale)
                    fabric.clip_gradients(model, optimizer, max_norm=train.max_norm, error_if_nonfinite=scaler is None)
                except RuntimeError as e:  # torch: "The total norm of order 2.0 for gradients ... is non-finite"
                    if "non-finite" not in str(e):
                        raise
                    raise non_finite("The gradient norm became non-finite", step) from None
            lr = scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on below)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] = step

            dt = time.perf_counter() - t0
            trained["seconds"] += dt
            trained["tokens"] += tokens * fabric.world_size
            metrics = {"loss": loss_val, "lr": lr, "step_time": dt,
                       "tokens_per_sec": tokens * fabric.world_size / dt, "step": step}
            if aux_coef:
                metrics["router_aux_loss"] = aux_val
            if step % train.log_interval == 0 or step == steps:
                log_metrics(metrics, step)
            progress.update(metrics)

            if stopping and step < steps:  # (after the last one, the final validation stops, or the run just finishes)
                stop_after(step)
            if step < steps:
                if due(step):
                    validate_here(step)
                if step % train.save_interval == 0:
                    save_checkpoint(step, loader.state_dict(), validated=due(step))
        # the final validation, unless this resumes the last-step checkpoint, which was written after it (its row is
        # in the logs already: only the final file was missing)
        if due(steps) and not (state["step"] == start and state["validated"]):
            validate_here(steps)
        # the last step too, so --resume auto on a finished run knows it is finished; not for full fine-tuning, whose
        # checkpoint (every weight and two AdamW moments: ~80 GB at 7B) would cost far more than redoing a few steps
        if state["step"] > start and state["checkpoint_last"]:
            save_checkpoint(steps, loader.state_dict(), validated=due(steps))
    finally:  # also when a step fails, so that the error starts on a line of its own
        progress.close()
    if state["step"] > start:
        fabric.print(f"Trained steps {start + 1}-{steps} in {trained['seconds']:.1f} s of optimisation "
                     f"({trained['tokens'] / trained['seconds']:,.0f} tokens/s, padding included); "
                     f"{peak_memory(fabric.device, fabric.world_size)}.")


def peak_memory(device: torch.device, world_size: int = 1) -> str:
    """This process's peak memory, as a phrase: the GPU's allocations, or on the CPU the resident set."""
    if device.type == "cuda":
        where = " on rank 0's GPU" if world_size > 1 else ""
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB{where}"
    try:
        import resource
    except ImportError:  # not on Unix
        return "peak memory unknown"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return f"peak memory {kib / 2**20:.2f} GiB (the process's resident set)"


def stop_requested(fabric, stop: Optional[StopRequest]) -> bool:
    """Whether any rank was asked to stop; every rank must call it at the same point (one tiny all-reduce)."""
    asked = float(stop.signum) if stop is not None else 0.0
    if fabric.world_size == 1:
        return bool(asked)
    return fabric.all_reduce(torch.full((), asked, device=fabric.device), reduce_op="max").item() > 0


@torch.no_grad()
def validate(fabric, model, val_data, n: int, max_len: int, pad_id: int,
             stop: Optional[StopRequest] = None) -> Optional[float]:
    """The mean loss of the first `n` validation examples (all of them when fewer), shared among the ranks, so that
    the same model reports the same loss on any number of processes; None when a stop was requested on any rank
    before it finished (a signal does not wait for a long validation)."""
    from lit_gpt.data import collate

    model.eval()
    try:
        n = min(len(val_data), n)
        total = torch.zeros((), device=fabric.device)
        count = torch.zeros((), device=fabric.device)
        # every rank runs the same number of forwards, or a sharded model waits forever in the one a rank skips: in
        # the last round, a rank past the end runs the last example again and does not count it
        for j in range(fabric.global_rank, n + (-n % fabric.world_size), fabric.world_size):
            if stop_requested(fabric, stop):
                return None
            batch = collate([val_data[min(j, n - 1)]], pad_id=pad_id, max_seq_length=max_len)
            loss = model(batch["input_ids"].to(fabric.device), labels=batch["labels"].to(fabric.device))
            if j < n:
                total += loss
                count += 1
    finally:
        model.train()
    total, count = fabric.all_reduce(total, reduce_op="sum"), fabric.all_reduce(count, reduce_op="sum")
    return (total / count.clamp(min=1)).item()


def validate_and_log(fabric, model, val_data, tokenizer, eval, max_len, pad_id, step, progress, log_metrics,
                     non_finite, stop: Optional[StopRequest] = None, final: bool = False) -> bool:
    """Validate (`final`: the whole set, with `--eval.final_validation`), log and show a sample answer; False
    (nothing logged) when a stop request cut the validation short."""
    n = len(val_data) if final and eval.final_validation else min(eval.max_iters, len(val_data))
    val_loss = validate(fabric, model, val_data, n, max_len, pad_id, stop)
    if val_loss is None:
        return False
    if not math.isfinite(val_loss):
        raise non_finite(f"The validation loss became {val_loss}", step)
    log_metrics({"val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss < 700 else math.inf}, step)
    examples = f"all {n:,}" if n == len(val_data) else f"first {n:,} of {len(val_data):,}"
    progress.write(f"step {step}: val loss {val_loss:.4f} ({examples} validation examples)")
    if eval.max_new_tokens > 0 and len(val_data):
        prompt = sample_prompt(val_data.samples[0], max_len)
        if prompt is None:
            progress.write("sample: none (the first validation example has no masked prompt and no prompt_length: "
                           "data prepared with --mask_inputs false by an older version; prepare it again)")
        else:
            sample = sample_generation(fabric, model, prompt, tokenizer, eval.max_new_tokens)
            progress.write(f"sample: {sample!r}")
    return True


def sample_prompt(sample: dict, max_len: int) -> Optional[torch.Tensor]:
    """The prompt tokens of a prepared example (its `prompt_length`, else its masked labels; at most `max_len`), or
    None when it shows none: data prepared unmasked before examples recorded their prompt's length."""
    ids = sample["input_ids"]
    length = sample.get("prompt_length")
    length = int(length) if length is not None else int((sample["labels"] == -100).sum())
    return ids[:min(length, max_len)].long() if length > 0 else None


@torch.no_grad()
def sample_generation(fabric, model, prompt: torch.Tensor, tokenizer, max_new_tokens: int) -> str:
    """Greedy answer to `prompt` (every rank runs it: sharded weights are gathered per block)."""
    from lit_gpt.generate import generate

    # sharded, every rank must run as many forwards as the others: one that stopped at an end token the others did not
    # pick (a last-bit difference between GPUs) would leave them waiting forever, so all run `max_new_tokens` and the
    # answer is cut at the first stop token
    sharded = fabric.world_size > 1
    model.eval()
    try:
        new = generate(model, prompt.to(fabric.device), max_new_tokens, temperature=0.0, include_prompt=False,
                       stop_tokens=() if sharded else [[i] for i in tokenizer.stop_ids]).tolist()
    finally:
        model.module.clear_kv_cache()
        model.train()
    if sharded:
        new = new[:next((k for k, t in enumerate(new) if t in tokenizer.stop_ids), len(new))]
    return tokenizer.decode(new)


class _progress:
    """tqdm on rank 0 with loss, tokens/s and ETA; a no-op elsewhere."""

    def __init__(self, fabric, start: int, total: int) -> None:
        self.bar = None
        if fabric.global_rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=progress_bars_off())

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


# ---------------------------------------------------------------------------------------------- after training
RUN_FOLDERS = (FINAL_DIRNAME, MERGED_DIRNAME)


def write_final_folder(out_dir: Path, final: Path, checkpoint_dir: Path, log=print) -> Path:
    """`<out_dir>/final/`, the model folder of a full fine-tuning run: its weights `final` (lit_model_finetuned.pth)
    with the base's config and tokenizer files and the prompt style the run trained with, by the merge's folder
    writer (`write_checkpoint_folder`), into a new folder that then replaces an earlier one (`replace=True`): a write
    that stops part way leaves no half folder, and an earlier `final/` whole.

    Its `lit_model.pth` is a hard link to `final`, not a copy, so the weights take their disk space once (13 GB for
    a 7B model in bfloat16) while `lit_model_finetuned.pth` stays what --adapter_path, --resume and the hints read;
    both hold the weights as trained (the training dtype). Where the file system has no hard links, it is a copy."""
    from lit_gpt.merge import read_finetuned, write_checkpoint_folder

    final, checkpoint_dir = Path(final), Path(checkpoint_dir)
    finetuned = read_finetuned(final)  # memory-mapped: its dtype, and the run's hyperparameters for the prompt style
    dtype = next((v.dtype for v in finetuned.payload.values() if v.is_floating_point()), torch.float32)
    folder = out_dir / FINAL_DIRNAME

    how = [f"its lit_model.pth is {final.name}, hard-linked: no extra disk space"]

    def link(path: Path) -> None:
        path.unlink()
        try:
            os.link(final, path)
        except OSError as e:  # a file system without hard links
            shutil.copyfile(final, path)
            how[0] = f"its lit_model.pth is a copy of {final.name}, as it could not be hard-linked ({e.strerror or e})"

    write_checkpoint_folder(folder, checkpoint_dir, finetuned, Config.from_checkpoint(checkpoint_dir), dtype, link,
                            replace=True, log=log)
    log(f"Saved the model folder {folder} ({how[0]}); chat with it: python chat/base.py --checkpoint_dir {folder}")
    return folder


def merge_after_training(out_dir: Path, final: Path, log=print) -> Path:
    """`--merge true`: fold the run's final adapter file into its base model, into `<out_dir>/merged/`, as
    `python scripts/merge_ether.py --adapter_path FINAL` (or merge_lora.py) would afterwards."""
    from lit_gpt.merge import merge_checkpoint

    merged = out_dir / MERGED_DIRNAME
    try:
        merge_checkpoint(final, out_dir=merged, log=log)
    except OSError as e:  # a full disk: the run itself is done
        raise RunWriteError(f"Could not write the merged model {merged} ({e.strerror or e}); the adapter {final} is "
                            f"saved: once there is space, merge it with `python scripts/{merge_script_for(final)} "
                            f"--adapter_path {final}`.") from None
    log(f"Chat with the merged model: python chat/base.py --checkpoint_dir {merged}")
    return merged


def finish_finished_run(out_dir: Path, final: Path, checkpoint_dir: Path, adapter: bool, merge: bool,
                        log=print) -> None:
    """A resume of a finished run writes what the run lacks: a full run's `final/` (from before there was one), or
    the merged model `--merge true` asks for now, unless `merged/` already holds a merge of `final` as it is."""
    if not adapter:
        if not (out_dir / FINAL_DIRNAME / WEIGHTS_FILENAME).is_file():
            write_final_folder(out_dir, final, checkpoint_dir, log=log)
        return
    if merge and not merged_from(out_dir / MERGED_DIRNAME, final):
        merge_after_training(out_dir, final, log=log)
    elif merge:
        log(f"{out_dir / MERGED_DIRNAME} already holds the merge of {final.name}.")
