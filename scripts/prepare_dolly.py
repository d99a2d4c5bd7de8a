"""Prepare Databricks' Dolly 15k instruction data for instruction tuning."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.data.prompts import PromptStyleName
from lit_gpt.cli import run_cli
from lit_gpt.data.prepare import Source, check_rows, fetch_data_file, prepare_instruction_data, read_records


def prepare(
    destination_path: Optional[Path] = None,
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    test_split_fraction: float = 0.1,
    seed: int = 42,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    max_seq_length: Optional[int] = None,
    data_repo_id: str = "databricks/databricks-dolly-15k",
    data_file_name: str = "databricks-dolly-15k.jsonl",
    data_file_path: Optional[Path] = None,
    prompt_style: PromptStyleName = "dolly",
    system_prompt: Optional[str] = None,
) -> Path:
    """Tokenize Dolly 15k (context -> input, response -> output) into train.pt and test.pt.

    Args:
        destination_path: Output directory (default: <checkpoint_dir>/dolly-t<max_seq_length>).
        checkpoint_dir: Checkpoint whose tokenizer to use.
        test_split_fraction: Fraction of rows held out as test.pt.
        seed: Seed of the train/test split.
        mask_inputs: Leave the prompt out of the loss (labels = ignore_index at prompt positions).
        ignore_index: Label value of positions without a loss (negative: -100 is PyTorch's default).
        max_seq_length: Truncate examples to this many tokens (default: the model's context length).
        data_repo_id: Hugging Face dataset repository to download from.
        data_file_name: File in that repository, and its name in the destination (a copy there is used as is).
        data_file_path: A local Dolly JSON Lines file to use instead of downloading.
        prompt_style: Template the examples are written in (chatml or chat_template for chat models).
        system_prompt: System message for the chatml/chat_template styles.
    """

    def load_rows(destination: Path):
        source = Source(hf_repo_id=data_repo_id, hf_filename=data_file_name)
        path = fetch_data_file(destination, data_file_name, source, data_file_path)
        rows = check_rows(read_records(path), path, required=("instruction", "response"), optional=("context",),
                          rename={"context": "input", "response": "output"})
        return rows, None

    return prepare_instruction_data(
        dataset="dolly", checkpoint_dir=checkpoint_dir, destination_path=destination_path,
        max_seq_length=max_seq_length, load_rows=load_rows, test_split_fraction=test_split_fraction, seed=seed,
        mask_inputs=mask_inputs, ignore_index=ignore_index, prompt_style=prompt_style, system_prompt=system_prompt,
    )


if __name__ == "__main__":
    run_cli(prepare)
