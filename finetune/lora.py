"""Fine-tune with LoRA."""

import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.adapters.config import named_by_flags
from lit_gpt.training import (
    LORA_FLAGS, layers_from_flag, run_entrypoint, targets_from_flags, train_modules_from_flag,
)


def setup(
    io: IOArgs = IOArgs(),
    train: TrainArgs = TrainArgs(learning_rate=5e-4, global_batch_size=8, micro_batch_size=1, lr_warmup_steps=100,
                                 weight_decay=0.01),
    eval: EvalArgs = EvalArgs(),
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_dora: bool = False,
    lora_init: str = "default",
    lora_query: Optional[bool] = None,
    lora_key: Optional[bool] = None,
    lora_value: Optional[bool] = None,
    lora_projection: Optional[bool] = None,
    lora_mlp: Optional[bool] = None,
    lora_head: Optional[bool] = None,
    lora_targets: Optional[Union[str, list[str]]] = None,
    lora_train_modules: Optional[Union[str, list[str]]] = None,
    lora_layers: Optional[Union[int, str, list[int]]] = None,
    loraplus_lr_ratio: Optional[float] = None,
    precision: Optional[str] = None,
    adapter_float32: Optional[bool] = None,
    quantize: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    seed: int = 1337,
    logger_name: Literal["tensorboard", "wandb", "csv"] = "tensorboard",
    resume: Union[bool, str] = False,
    model_name: Optional[str] = None,
    merge: bool = False,
    dry_run: bool = False,
) -> None:
    """Fine-tune a lit checkpoint with LoRA on data made by a `scripts/prepare_*.py` script.

    Args:
        io: Data, checkpoint, log and output directories.
        train: Optimisation hyperparameters.
        eval: Periodic validation.
        lora_r: Rank of the update `B A`.
        lora_alpha: Scale: the update is multiplied by `lora_alpha / lora_r`.
        lora_dropout: Dropout on the input of the LoRA branch.
        lora_dora: DoRA (PEFT's use_dora): also train a magnitude per output row of every adapted layer, which
            rescales the row of `W + B A` to it (one more vector per layer; merges like plain LoRA).
        lora_init: How A and B start (PEFT's init_lora_weights): default (A Kaiming-uniform, B zero), gaussian
            (A normal, std 1/r), pissa (B A = the top r singular components of the base weight, by a full SVD, on
            a GPU when there is one), pissa_niter_<k> (a randomized SVD of k iterations: far faster on a large
            model, e.g. pissa_niter_4) or olora (B A from the QR decomposition of the base weight). For pissa and
            olora the base weights stay as they are: the adapter keeps its starting factors and subtracts them
            (it merges and exports to PEFT as a plain LoRA of rank 2r).
        lora_query: Adapt the attention queries (unset: true, or as --lora_targets says).
        lora_key: Adapt the attention keys (unset: false, or as --lora_targets says).
        lora_value: Adapt the attention values (unset: true, or as --lora_targets says).
        lora_projection: Adapt the attention output projection (unset: false, or as --lora_targets says).
        lora_mlp: Adapt every MLP linear layer (unset: false, or as --lora_targets says).
        lora_head: Adapt the output head (unset: false, or as --lora_targets says).
        lora_targets: The adapted layers in one flag, instead of the six above: names separated by commas
            (query,value,mlp) or a list, or all-linear (PEFT's rule: every linear layer but the output head);
            transformers' names (q_proj, v_proj, gate_proj, ...) are taken as ours; module names (attn.proj,
            transformer.h.0.attn.qkv) and patterns ("re:<regex>") select layers as the Python API's targets do. A
            layer flag given too must agree.
        lora_train_modules: Modules trained in full beside the adapter (PEFT's modules_to_save), saved in its file
            and merged with it: names separated by commas or a list, of head (the output head), embeddings (token
            embeddings, and GPT-2's positions), norms (every norm), or module names (transformer.ln_f, norm_1) and
            patterns ("re:<regex>"); transformers' names (lm_head, embed_tokens, input_layernorm, norm) are taken
            as ours. A head tied to the embeddings trains them too; they keep the model's dtype.
        lora_layers: Adapt the layers above in these transformer blocks only (PEFT's layers_to_transform):
            indices from 0 and inclusive ranges separated by commas (0-7,30,31), or a list; unset: every block.
            The head, in no block, is adapted when targeted, as PEFT adapts a module named in full.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024; PEFT's create_loraplus_optimizer): train B, and as PEFT every
            one-dimensional tensor (DoRA's magnitudes, trained norms), at --train.learning_rate times this ratio
            (the paper suggests 16); unset: one rate for every tensor. --train.weight_decay applies to both
            (PEFT's own loraplus_weight_decay is 0 unless set).
        precision: `bf16-true`, `16-true`, `16-mixed`, `32-true`, … (default: bf16-true on GPUs with bfloat16,
            16-mixed on older GPUs, 32-true on the CPU).
        adapter_float32: Under `--precision bf16-true`, keep the adapter's weights, gradients and AdamW state in
            float32 (PEFT's default; always so under 16-true), so that Adam steps below half a bfloat16 spacing
            are not rounded away; the frozen model and the activations stay bfloat16 (unset: false, but true with
            --lora_dora, whose magnitudes would not train in bfloat16).
        quantize: Keep the frozen linear weights of the transformer blocks in `nf4` (QLoRA's 4-bit NormalFloat,
            0.56 bytes per weight), `nf4-dq` (its scales in 8 bits too, QLoRA's double quantization: 0.52) or
            `int8` (1 byte), dequantized layer by layer as they compute: QLoRA when the method is LoRA. The
            embeddings, norms, output head and what trains keep --precision's dtype; the adapter trains
            against the quantized weights and merges into the checkpoint's own.
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
        merge: After training, fold the final adapter into the base model, as scripts/merge_lora.py does, into the
            standalone model folder `merged/` of the run directory, which chat/base.py takes as --checkpoint_dir
            (a full copy of the model on disk).
        dry_run: Print trainable/frozen parameter counts and memory needs on the meta device, then exit.
    """
    flags = dict(locals())  # the parsed flags only: hyperparameters.yaml records these
    from lit_gpt.adapters import AdapterConfig

    targets = targets_from_flags(
        "lora", lora_targets,
        query=lora_query, key=lora_key, value=lora_value, projection=lora_projection, mlp=lora_mlp, head=lora_head
    )
    with named_by_flags(LORA_FLAGS):  # errors name the flags, not the fields
        adapter = AdapterConfig(method="lora", r=lora_r, alpha=lora_alpha, dropout=lora_dropout, dora=lora_dora,
                                init=lora_init, targets=targets,
                                train_modules=train_modules_from_flag(lora_train_modules),
            layers=layers_from_flag(lora_layers, "--lora_layers"))
        run_entrypoint("lora", adapter, flags)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli
    from lit_gpt.training import TRAINING_ERRORS

    run_cli(setup, errors=TRAINING_ERRORS, finetune_script="finetune/lora.py")
