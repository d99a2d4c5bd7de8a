"""Prepare your own instruction data from a CSV file with the columns instruction, input (optional), output."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.data.prompts import PromptStyleName
from lit_gpt.cli import run_cli
from lit_gpt.data.prepare import check_input_file, check_rows, prepare_instruction_data, read_csv_records


def prepare(
    csv_path: Path,
    destination_path: Optional[Path] = None,
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    test_split_fraction: float = 0.1,
    seed: int = 42,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    max_seq_length: Optional[int] = None,
    prompt_style: PromptStyleName = "alpaca",
    system_prompt: Optional[str] = None,
) -> Path:
    """Tokenize a CSV file (header line: instruction,input,output; input may be left out) into train.pt and test.pt.

    Args:
        csv_path: The CSV file (comma-separated, UTF-8), whatever its name ends with.
        destination_path: Output directory (default: <checkpoint_dir>/<csv file name>-t<max_seq_length>).
        checkpoint_dir: Checkpoint whose tokenizer to use.
        test_split_fraction: Fraction of rows held out as test.pt.
        seed: Seed of the train/test split.
        mask_inputs: Leave the prompt out of the loss (labels = ignore_index at prompt positions).
        ignore_index: Label value of positions without a loss (negative: -100 is PyTorch's default).
        max_seq_length: Truncate examples to this many tokens (default: the model's context length).
        prompt_style: Template the examples are written in (chatml or chat_template for chat models).
        system_prompt: System message for the chatml/chat_template styles.
    """
    csv_path = check_input_file(csv_path, "--csv_path")

    def load_rows(destination: Path):
        columns = dict(required=("instruction", "output"), optional=("input",))
        return check_rows(read_csv_records(csv_path, **columns), csv_path, **columns), None

    return prepare_instruction_data(
        dataset=csv_path.stem, checkpoint_dir=checkpoint_dir, destination_path=destination_path,
        max_seq_length=max_seq_length, load_rows=load_rows, test_split_fraction=test_split_fraction, seed=seed,
        mask_inputs=mask_inputs, ignore_index=ignore_index, prompt_style=prompt_style, system_prompt=system_prompt,
        extra={"source": str(csv_path)},
    )


if __name__ == "__main__":
    run_cli(prepare)
