"""Fine-tune with a multiplicative adapter: ETHER, ETHER+ (one- or two-sided) or OFT."""

import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.adapters.config import named_by_flags
from lit_gpt.training import (
    ETHER_FLAGS, layers_from_flag, run_entrypoint, targets_from_flags, train_modules_from_flag,
)


def setup(
    io: IOArgs = IOArgs(),
    train: TrainArgs = TrainArgs(learning_rate=1e-3, global_batch_size=16, micro_batch_size=1, lr_warmup_steps=100),
    eval: EvalArgs = EvalArgs(),
    Htype: Literal["ether", "etherplus", "etherplusHH", "oft"] = "ether",
    ether_nb: int = 32,
    ether_dropout: float = 0.0,
    block_dropout: float = 0.0,
    flip_side: bool = False,
    ether_query: Optional[bool] = None,
    ether_key: Optional[bool] = None,
    ether_value: Optional[bool] = None,
    ether_projection: Optional[bool] = None,
    ether_mlp: Optional[bool] = None,
    ether_head: Optional[bool] = None,
    ether_targets: Optional[Union[str, list[str]]] = None,
    ether_train_modules: Optional[Union[str, list[str]]] = None,
    ether_layers: Optional[Union[int, str, list[int]]] = None,
    oft_coft: bool = False,
    oft_eps: Optional[float] = None,
    oft_block_share: bool = False,
    oft_neumann_terms: int = 0,
    precision: Optional[str] = None,
    adapter_float32: bool = False,
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
    """Fine-tune a lit checkpoint with ETHER, ETHER+ or OFT on data made by a `scripts/prepare_*.py` script.

    Args:
        io: Data, checkpoint, log and output directories.
        train: Optimisation hyperparameters.
        eval: Periodic validation.
        Htype: The transform: `ether` (Householder reflection), `etherplus` (ETHER+, one side), `etherplusHH`
            (ETHER+ on both sides of each weight) or `oft` (Cayley orthogonal blocks).
        ether_nb: Number of diagonal blocks each transform is split into; must divide every adapted width.
        ether_dropout: Dropout on the adapted layer's input (the reference code's semantics).
        block_dropout: Multiplicative dropout: each block is replaced by the identity with this probability per step.
        flip_side: Transform the layer's output instead of its input (one-sided methods).
        ether_query: Adapt the attention queries (unset: true, or as --ether_targets says).
        ether_key: Adapt the attention keys (unset: false, or as --ether_targets says).
        ether_value: Adapt the attention values (unset: true, or as --ether_targets says).
        ether_projection: Adapt the attention output projection (unset: false, or as --ether_targets says).
        ether_mlp: Adapt every MLP linear layer (unset: false, or as --ether_targets says).
        ether_head: Adapt the output head (unset: false, or as --ether_targets says).
        ether_targets: The adapted layers in one flag, instead of the six above: names separated by commas
            (query,value,mlp) or a list, or all-linear (PEFT's rule: every linear layer but the output head);
            transformers' names (q_proj, v_proj, gate_proj, ...) are taken as ours; module names (attn.proj,
            transformer.h.0.attn.qkv) and patterns ("re:<regex>") select layers as the Python API's targets do. A
            layer flag given too must agree.
        ether_train_modules: Modules trained in full beside the adapter (PEFT's modules_to_save), saved in its file
            and merged with it: names separated by commas or a list, of head (the output head), embeddings (token
            embeddings, and GPT-2's positions), norms (every norm), or module names (transformer.ln_f, norm_1) and
            patterns ("re:<regex>"); transformers' names (lm_head, embed_tokens, input_layernorm, norm) are taken
            as ours. A head tied to the embeddings trains them too; they keep the model's dtype.
        ether_layers: Adapt the layers above in these transformer blocks only (PEFT's layers_to_transform):
            indices from 0 and inclusive ranges separated by commas (0-7,30,31), or a list; unset: every block.
            The head, in no block, is adapted when targeted, as PEFT adapts a module named in full.
        oft_coft: Constrained OFT: keep each skew-symmetric block within Frobenius norm `oft_eps` of zero.
        oft_eps: COFT radius per block, with `--oft_coft true`; null (unset) means 6e-5, the OFT authors' and
            PEFT's number. Their code bounds each block by `eps / sqrt(nb)`: pass that value to reproduce their
            constraint.
        oft_block_share: One OFT block shared by all blocks of a layer.
        oft_neumann_terms: K: replace OFT's exact inverse (I - S)^-1 by the series sum_{j=0..K} S^j (OFTv2's
            Cayley-Neumann; K + 1 terms, so PEFT's num_cayley_neumann_terms T is K = T - 2); 0 = exact Cayley.
        precision: `bf16-true`, `16-true`, `16-mixed`, `32-true`, … (default: bf16-true on GPUs with bfloat16,
            16-mixed on older GPUs, 32-true on the CPU).
        adapter_float32: Under `--precision bf16-true`, keep the adapter's weights, gradients and AdamW state in
            float32 (PEFT's default; always so under 16-true), so that Adam steps below half a bfloat16 spacing
            are not rounded away; the frozen model and the activations stay bfloat16.
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
        merge: After training, fold the final adapter into the base model, as scripts/merge_ether.py does, into the
            standalone model folder `merged/` of the run directory, which chat/base.py takes as --checkpoint_dir
            (a full copy of the model on disk).
        dry_run: Print trainable/frozen parameter counts and memory needs on the meta device, then exit.
    """
    flags = dict(locals())  # the parsed flags only: hyperparameters.yaml records these
    from lit_gpt.adapters import AdapterConfig

    targets = targets_from_flags(
        "ether", ether_targets,
        query=ether_query, key=ether_key, value=ether_value, projection=ether_projection, mlp=ether_mlp,
        head=ether_head,
    )
    if oft_eps is not None and not oft_coft:
        raise ValueError(
            f"--oft_eps {oft_eps} only applies to constrained OFT: add --oft_coft true (with --Htype oft) or drop "
            "--oft_eps."
        )
    extra = {} if oft_eps is None else {"eps": oft_eps}
    with named_by_flags(ETHER_FLAGS):  # errors name the flags, not the fields
        adapter = AdapterConfig(
            method=Htype, nb=ether_nb, targets=targets, flip_side=flip_side, dropout=ether_dropout,
            block_dropout=block_dropout, coft=oft_coft, block_share=oft_block_share, neumann_terms=oft_neumann_terms,
            train_modules=train_modules_from_flag(ether_train_modules),
            layers=layers_from_flag(ether_layers, "--ether_layers"), **extra,
        )
        run_entrypoint(Htype, adapter, flags)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli
    from lit_gpt.training import TRAINING_ERRORS

    run_cli(setup, errors=TRAINING_ERRORS, finetune_script="finetune/ether.py")
