"""Convert a Hugging Face transformers checkpoint folder into a lit checkpoint, in place."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from lit_gpt.convert_hf import convert_hf_checkpoint  # noqa: E402


def main(
    checkpoint_dir: Path,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    model_name: Optional[str] = None,
) -> None:
    """Write lit_model.pth and model_config.yaml next to the transformers files in `checkpoint_dir`.

    Reads config.json and the weights (model.safetensors, pytorch_model.bin, or their shards with an index file) one
    tensor at a time. The model config is derived from the folder's own config.json, so fine-tuned variants and sizes
    missing from lit_gpt's named-config table convert as they are. Supported model types: llama, mistral, mixtral,
    qwen2, qwen2_moe, qwen3, qwen3_moe, phi, phi3, gemma, gemma2, gemma3_text, gpt2, gpt_neox, and the text model of a
    multimodal gemma3 (its vision tower is left out). Sliding attention windows (Mistral v0.1, Phi-3, Gemma 2 and 3,
    and Mixtral and the Qwen families where their config.json sets one) are kept as such, so the whole context
    (max_position_embeddings) is usable, computed as transformers computes it.

    Args:
        checkpoint_dir: A folder as `scripts/download.py` leaves it (e.g. checkpoints/meta-llama/Llama-2-7b-hf):
            config.json plus *.safetensors or pytorch_model*.bin. Types: llama, mistral, mixtral, qwen2, qwen2_moe,
            qwen3, qwen3_moe, phi, phi3 (Phi-3, Phi-4), gemma, gemma2, gemma3_text (Gemma3ForCausalLM), gemma3 (its
            text model), gpt2, gpt_neox.
        dtype: Cast the weights to this dtype; by default they keep the dtype they are stored in.
        model_name: Name recorded in model_config.yaml (e.g. meta-llama/Llama-2-7b-hf); defaults to the folder name.
            It only names the config: every size comes from config.json.
    """
    config = convert_hf_checkpoint(checkpoint_dir, dtype=dtype, model_name=model_name)
    print(
        f"Converted {config.name!r} ({config.n_layer} layers, width {config.n_embd}, vocabulary "
        f"{config.padded_vocab_size}) into {checkpoint_dir / 'lit_model.pth'}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    run_cli(main)
