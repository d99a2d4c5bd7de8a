"""Export a lit checkpoint as a Hugging Face transformers model folder."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from lit_gpt.convert_hf import ConversionError, convert_lit_checkpoint  # noqa: E402


def main(
    checkpoint_dir: Path,
    output_dir: Path,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    max_shard_gb: float = 5.0,
) -> None:
    """Write config.json, safetensors weights, generation_config.json and the tokenizer files into `output_dir`.

    The result loads with `transformers.AutoModelForCausalLM.from_pretrained(output_dir)` and computes the same logits
    as the lit model. The architecture follows the config's shape: llama, or mistral with a sliding window in every
    block; mixtral (a mixture of experts), qwen2_moe with a shared expert, or qwen3_moe with per-head query/key norms;
    qwen2 (bias on the QKV projection only), qwen3 (per-head query/key norms), phi3 (a SwiGLU model rotating part of
    each head; other Phi-3s export as llama or mistral), gemma, gemma2, gemma3_text (a multimodal Gemma 3's text model
    exports as this), phi, gpt_neox or gpt2. Adapter checkpoints must be merged first (scripts/merge_ether.py,
    scripts/merge_lora.py).

    Args:
        checkpoint_dir: A lit checkpoint directory (lit_model.pth + model_config.yaml + tokenizer files).
        output_dir: Folder to write the transformers model into; must differ from `checkpoint_dir`.
        dtype: Cast the weights to this dtype; by default they keep the dtype of lit_model.pth.
        max_shard_gb: Weights up to this size (in 10^9 bytes) go into one model.safetensors; larger models are split
            into numbered shards with a model.safetensors.index.json.
    """
    if max_shard_gb <= 0:
        raise ConversionError(f"--max_shard_gb must be positive, got {max_shard_gb}.")
    out = convert_lit_checkpoint(checkpoint_dir, output_dir, dtype=dtype, max_shard_bytes=int(max_shard_gb * 10**9))
    print(f"Exported {checkpoint_dir} to {out}", file=sys.stderr)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    run_cli(main)
