"""Fold a LoRA adapter into its base model: a standalone lit checkpoint directory."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.cli import run_cli  # noqa: E402
from lit_gpt.merge import merge_cli  # noqa: E402

Precision = Literal["bf16-true", "bf16-mixed", "16-true", "16-mixed", "32-true"]
RUN_CONFIG_FIX = ("pass the run's adapter file instead, --lora_path {adapter} (its base model and prompt style are "
                  "read from the run)")


def main(
    lora_path: Optional[Path] = None,
    checkpoint_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    precision: Optional[Precision] = None,
    adapter_path: Optional[Path] = None,
    probe: bool = True,
) -> Path:
    """Merge a fine-tuned adapter into its base model (W' = W + alpha/r B A; with DoRA each row of that rescaled to
    its trained magnitude, m / ||W'||_row W') as a standalone checkpoint.

    Writes lit_model.pth (base architecture, no adapter keys), model_config.yaml, the tokenizer files,
    generation_config.json and prompt_style.yaml (the prompt format the run trained with), so that
    GPT.from_checkpoint, chat/base.py, eval and scripts/convert_lit_checkpoint.py take the result as is. The method
    and its settings (r, alpha, targets) are read from the adapter file, the base checkpoint and prompt
    style from the run's hyperparameters.yaml next to it (the prompt style also from a recent adapter file
    alone); never from directory names. Same routine as merge_ether.py.

    Args:
        lora_path: The adapter file, e.g. out/run/lit_model_lora_finetuned.pth (or a .safetensors one
            `save_adapters` wrote), or a Hugging Face PEFT adapter folder (LoRA, OFT, or HRA as an export writes
            it), imported in memory for --checkpoint_dir.
        checkpoint_dir: The base checkpoint the adapter was trained on; default the run's base_checkpoint_dir
            (required with a PEFT folder: the lit checkpoint converted from its base model).
        out_dir: Where to write the merged checkpoint; default <adapter's dir>/merged (a PEFT folder's merged/).
        precision: Dtype of the saved weights: bf16-true -> bfloat16, 16-true -> float16, 32-true (or *-mixed)
            -> float32; default the base checkpoint's dtype. Folding itself always runs in float32.
        adapter_path: Same as --lora_path (the name merge_ether.py also accepts).
        probe: Compare merged and unmerged logits on a small fixed batch and print the largest difference.
    """
    if lora_path is not None and adapter_path is not None and Path(lora_path) != Path(adapter_path):
        raise ValueError("--lora_path and --adapter_path name different files; pass one of them.")
    return merge_cli(lora_path or adapter_path, checkpoint_dir, out_dir, precision, probe, flag="--lora_path")


if __name__ == "__main__":
    run_cli(main, run_config_fix=RUN_CONFIG_FIX)
