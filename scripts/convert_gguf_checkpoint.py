"""Import a GGUF model file (llama.cpp's format) as a lit checkpoint directory."""

import sys
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lit_gpt.gguf import convert_gguf  # noqa: E402


def main(gguf_path: Path, checkpoint_dir: Path, dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> None:
    """Dequantize a llama (Mixtral's experts included), qwen2, qwen2moe, qwen3, qwen3moe, phi3, gemma, gemma2,
    gemma3 (text), smollm3, olmo2 (OLMo 3 included) or granite GGUF file into `checkpoint_dir`.

    Writes lit_model.pth, model_config.yaml, tokenizer.json, tokenizer_config.json (with the chat template) and
    generation_config.json. Quantized tensors are dequantized one at a time.

    Args:
        gguf_path: The .gguf file to import.
        checkpoint_dir: Directory to write the lit checkpoint into (created if missing).
        dtype: Dtype of the saved weights. float32 keeps the dequantized values exactly; bfloat16 halves the size.
    """
    config = convert_gguf(gguf_path, checkpoint_dir, dtype=getattr(torch, dtype))
    print(
        f"Imported {config.name!r} ({config.n_layer} layers, width {config.n_embd}, vocabulary {config.vocab_size}) "
        f"into {checkpoint_dir}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    run_cli(main)
