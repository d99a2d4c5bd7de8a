"""Prepare your own instruction data from JSON (a list of objects) or JSON Lines (one object per line)."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.data.prompts import PromptStyleName
from lit_gpt.cli import run_cli
from lit_gpt.data.prepare import chat_rows, check_rows, is_chat_data, prepare_own_rows, read_records


def prepare(
    json_path: Path,
    val_json_path: Optional[Path] = None,
    destination_path: Optional[Path] = None,
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    test_split_fraction: Optional[float] = None,
    seed: Optional[int] = None,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    max_seq_length: Optional[int] = None,
    prompt_style: PromptStyleName = "alpaca",
    system_prompt: Optional[str] = None,
) -> Path:
    """Tokenize a JSON or JSON Lines file of instruction/input/output objects, or of conversations, into train.pt
    and test.pt.

    Each object needs "instruction" and "output"; "input" is optional. A chat data file instead holds a
    conversation per object, as "messages" (role and content: OpenAI's, Hugging Face's and TRL's format) or
    "conversations" (ShareGPT's from and value): an optional system message, then user and assistant messages in
    turn. Each assistant message becomes an example whose prompt is the conversation before it, so the model learns
    every answer. Pass --prompt_style chat_template (or chatml), which renders conversations as chat does: other
    styles write one instruction, and refuse earlier turns and system messages.
    The file is split at random into train.pt and test.pt (a conversation's examples stay together), unless the
    validation rows come in a file of their own (--val_json_path, or a --json_path folder holding train.json and
    val.json, as litgpt takes them): then all of those rows are test.pt.

    Args:
        json_path: The JSON (a list of objects) or JSON Lines (one object per line) file, UTF-8, or a folder
            holding train.json (or .jsonl) and val.json (or .jsonl); a CSV file goes to scripts/prepare_csv.py.
        val_json_path: A JSON or JSON Lines file of validation rows, all written to test.pt (no random split).
        destination_path: Output directory (default: <checkpoint_dir>/<json file or folder name>-t<max_seq_length>).
        checkpoint_dir: Checkpoint whose tokenizer to use.
        test_split_fraction: Fraction of rows held out as test.pt (default 0.1); not with a validation file.
        seed: Seed of the train/test split (default 42); not with a validation file.
        mask_inputs: Leave the prompt out of the loss (labels = ignore_index at prompt positions).
        ignore_index: Label value of positions without a loss (negative: -100 is PyTorch's default).
        max_seq_length: Truncate examples to this many tokens (default: the model's context length).
        prompt_style: Template the examples are written in (chatml or chat_template for chat models).
        system_prompt: System message for the chatml/chat_template styles.
    """
    def read(path: Path, flag: str) -> list[dict]:
        records = read_records(path, flag)
        if is_chat_data(records):
            return chat_rows(records, path)
        return check_rows(records, path, required=("instruction", "output"), optional=("input",))

    return prepare_own_rows(
        json_path, "--json_path", val_json_path, "--val_json_path", (".json", ".jsonl"), read,
        test_split_fraction=test_split_fraction, seed=seed, checkpoint_dir=checkpoint_dir,
        destination_path=destination_path, max_seq_length=max_seq_length, mask_inputs=mask_inputs,
        ignore_index=ignore_index, prompt_style=prompt_style, system_prompt=system_prompt,
    )

if __name__ == "__main__":
    run_cli(prepare)
