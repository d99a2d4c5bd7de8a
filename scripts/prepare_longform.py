"""Prepare the LongForm instruction data (Köksal et al., 2023) for instruction tuning."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.data.prompts import PromptStyleName
from lit_gpt.cli import run_cli
from lit_gpt.data.prepare import (
    Source,
    check_rows,
    fetch_data_file,
    local_data_file,
    note_unused_split_flags,
    prepare_instruction_data,
    read_records,
)

DATA_URL = "https://raw.githubusercontent.com/akoksal/LongForm/main/dataset"


def longform_rows(path: Path) -> list[dict]:
    # LongForm's "input" is the instruction itself (the dataset has no separate context field)
    return check_rows(read_records(path), path, required=("input", "output"), rename={"input": "instruction"})


def prepare(
    destination_path: Optional[Path] = None,
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    test_split_fraction: Optional[float] = None,
    seed: Optional[int] = None,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    max_seq_length: Optional[int] = None,
    data_url: str = DATA_URL,
    data_file_path: Optional[Path] = None,
    prompt_style: PromptStyleName = "longform",
    system_prompt: Optional[str] = None,
) -> Path:
    """Tokenize LongForm (input -> instruction) into train.pt and test.pt.

    LongForm's train.json becomes train.pt and its val.json test.pt (its test.json stays unseen for evaluation);
    copies already in the destination are used as is. With --data_file_path, that one local LongForm JSON file is
    used instead and split with --test_split_fraction and --seed.

    Args:
        destination_path: Output directory (default: <checkpoint_dir>/longform-t<max_seq_length>).
        checkpoint_dir: Checkpoint whose tokenizer to use.
        test_split_fraction: Fraction held out as test.pt when --data_file_path is used (default 0.1).
        seed: Seed of that split (default 42).
        mask_inputs: Leave the prompt out of the loss (labels = ignore_index at prompt positions).
        ignore_index: Label value of positions without a loss (negative: -100 is PyTorch's default).
        max_seq_length: Truncate examples to this many tokens (default: the model's context length).
        data_url: Folder URL holding LongForm's train.json and val.json.
        data_file_path: A local LongForm JSON file (input/output) to use instead of downloading.
        prompt_style: Template the examples are written in (chatml or chat_template for chat models).
        system_prompt: System message for the chatml/chat_template styles.
    """
    if data_file_path is None:
        note_unused_split_flags(test_split_fraction, seed, "LongForm's own train.json and val.json are (a split is "
                                "made only of a --data_file_path file)")

    def load_rows(destination: Path):
        if data_file_path is not None:
            return longform_rows(local_data_file(data_file_path)), None
        train = fetch_data_file(destination, "train.json", Source(url=f"{data_url}/train.json"))
        test = fetch_data_file(destination, "val.json", Source(url=f"{data_url}/val.json"))
        return longform_rows(train), longform_rows(test)

    return prepare_instruction_data(
        dataset="longform", checkpoint_dir=checkpoint_dir, destination_path=destination_path,
        max_seq_length=max_seq_length, load_rows=load_rows, test_split_fraction=test_split_fraction, seed=seed,
        mask_inputs=mask_inputs, ignore_index=ignore_index, prompt_style=prompt_style, system_prompt=system_prompt,
    )


if __name__ == "__main__":
    run_cli(prepare)
