"""Fine-tune every weight of the model."""

import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.training import run_entrypoint


def setup(
    io: IOArgs = IOArgs(),
    train: TrainArgs = TrainArgs(learning_rate=2e-5, global_batch_size=16, micro_batch_size=1, lr_warmup_steps=100,
                                 weight_decay=0.01),
    eval: EvalArgs = EvalArgs(),
    precision: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    seed: int = 1337,
    logger_name: Literal["tensorboard", "wandb", "csv"] = "tensorboard",
    resume: Union[bool, str] = False,
    model_name: Optional[str] = None,
    dry_run: bool = False,
) -> None:
    """Fine-tune every weight of a lit checkpoint on data made by a `scripts/prepare_*.py` script.

    At the end, the run directory holds the weights, `lit_model_finetuned.pth`, and the model folder `final/`
    (lit_model.pth, a hard link to those weights, with the config, tokenizer and prompt style of the run), which
    chat/base.py, scripts/generate.py and eval/lm_eval_harness.py take as --checkpoint_dir.

    Args:
        io: Data, checkpoint, log and output directories.
        train: Optimisation hyperparameters.
        eval: Periodic validation.
        precision: `bf16-true`, `16-mixed`, `32-true`, … (default: bf16-true on GPUs with bfloat16, 16-mixed on
            older GPUs, 32-true on the CPU); not `16-true`: float16 AdamW state for every weight turns to NaN.
        devices: Devices per node; more than one shards the model with FSDP2.
        num_nodes: Number of nodes.
        seed: Random seed for initialisation and data order.
        logger_name: Where the metrics go besides logs/metrics.csv (always written): `tensorboard` (tensorboard/
            in the run directory), `wandb` (Weights & Biases, after `pip install wandb`: project $WANDB_PROJECT,
            else lit-ether; the W&B run takes the run directory's name and hyperparameters, and a resume
            continues it, recorded in logs/wandb_run.yaml: the steps a resume redoes show twice, at their
            trainer/global_step) or `csv` (nothing more).
        resume: `auto` (or `true`) continues from the newest complete checkpoint in the run directory (`io.out_dir`);
            a `step-*.pth` path continues from that checkpoint; `false` starts from step 0.
        model_name: With `--dry_run`: a named config to plan for without any checkpoint (see scripts/download.py).
        dry_run: Print trainable/frozen parameter counts and memory needs on the meta device, then exit.
    """
    flags = dict(locals())  # the parsed flags only: hyperparameters.yaml records these
    run_entrypoint("full", None, flags)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli
    from lit_gpt.training import TRAINING_ERRORS

    run_cli(setup, errors=TRAINING_ERRORS, finetune_script="finetune/full.py")
