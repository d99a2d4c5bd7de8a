"""Prepare the Alpaca instruction data (cleaned, 51.8k rows) for instruction tuning."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.data.prompts import PromptStyleName
from lit_gpt.cli import run_cli
from lit_gpt.data.prepare import Source, check_rows, fetch_data_file, prepare_instruction_data, read_records

DATA_FILE_URL = "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json"


def prepare(
    destination_path: Optional[Path] = None,
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    test_split_fraction: float = 0.03865,
    seed: int = 42,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    max_seq_length: Optional[int] = None,
    data_file_name: str = "alpaca_data_cleaned_archive.json",
    data_file_url: str = DATA_FILE_URL,
    data_file_path: Optional[Path] = None,
    prompt_style: PromptStyleName = "alpaca",
    system_prompt: Optional[str] = None,
) -> Path:
    """Tokenize the Alpaca data with a checkpoint's tokenizer into train.pt and test.pt.

    Args:
        destination_path: Output directory (default: <checkpoint_dir>/alpaca-t<max_seq_length>, where the finetune
            scripts look with --io.train_data_dir).
        checkpoint_dir: Checkpoint whose tokenizer to use.
        test_split_fraction: Fraction of rows held out as test.pt (0.03865 gives the 2,000 of lit-gpt).
        seed: Seed of the train/test split.
        mask_inputs: Leave the prompt out of the loss (labels = ignore_index at prompt positions).
        ignore_index: Label value of positions without a loss (negative: -100 is PyTorch's default).
        max_seq_length: Truncate examples to this many tokens (default: the model's context length).
        data_file_name: Name of the raw file in the destination; a copy already there is used without downloading.
        data_file_url: Where to download the raw JSON from.
        data_file_path: A local raw JSON/JSON Lines file to use instead of downloading.
        prompt_style: Template the examples are written in (chatml or chat_template for chat models).
        system_prompt: System message for the chatml/chat_template styles.
    """

    def load_rows(destination: Path):
        path = fetch_data_file(destination, data_file_name, Source(url=data_file_url), data_file_path)
        return check_rows(read_records(path), path, required=("instruction", "output"), optional=("input",)), None

    return prepare_instruction_data(
        dataset="alpaca", checkpoint_dir=checkpoint_dir, destination_path=destination_path,
        max_seq_length=max_seq_length, load_rows=load_rows, test_split_fraction=test_split_fraction, seed=seed,
        mask_inputs=mask_inputs, ignore_index=ignore_index, prompt_style=prompt_style, system_prompt=system_prompt,
    )


if __name__ == "__main__":
    run_cli(prepare)
