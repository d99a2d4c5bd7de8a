"""Prepare the LIMA instruction data (1k curated conversations; gated on the Hugging Face Hub)."""

import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsonargparse.typing import SecretStr

from lit_gpt.data.prompts import PromptStyleName
from lit_gpt.cli import run_cli
from lit_gpt.utils import secret_text
from lit_gpt.data.prepare import (
    DataPreparationError,
    Source,
    check_not_wrapped,
    check_rows,
    fetch_data_file,
    prepare_instruction_data,
    read_records,
)


def conversation_rows(conversations: list, path: Path, include_multiturn_conversations: bool) -> list[dict]:
    """The first (user, assistant) pair of each conversation, or every pair as its own row; a later pair's row carries
    the turns before it as `history`, which the chat prompt styles render before its question (the others, lit-gpt's
    convention, leave it out)."""
    rows = []
    for number, turns in enumerate(conversations, start=1):
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, str) for t in turns):
            raise DataPreparationError(
                f"{str(path)!r} row {number} field 'conversations' must be a list of at least two texts "
                "(user, assistant, ...)."
            )
        pairs = range(0, len(turns) - 1, 2) if include_multiturn_conversations else range(0, 1)
        for i in pairs:
            row = {"instruction": turns[i], "input": "", "output": turns[i + 1]}
            if i:
                row["history"] = [{"role": ("user", "assistant")[j % 2], "content": turns[j]} for j in range(i)]
            rows.append(row)
    return rows


def prepare(
    destination_path: Optional[Path] = None,
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    test_split_fraction: float = 0.1,
    seed: int = 42,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    max_seq_length: Optional[int] = None,
    include_multiturn_conversations: bool = False,
    data_repo_id: str = "GAIR/lima",
    data_file_name: str = "train.jsonl",
    data_file_path: Optional[Path] = None,
    access_token: Optional[SecretStr] = None,
    prompt_style: PromptStyleName = "lima",
    system_prompt: Optional[str] = None,
) -> Path:
    """Tokenize LIMA conversations into train.pt and test.pt.

    LIMA's own test set has no answers, so test.pt is split off the training rows.

    Args:
        destination_path: Output directory (default: <checkpoint_dir>/lima-t<max_seq_length>).
        checkpoint_dir: Checkpoint whose tokenizer to use.
        test_split_fraction: Fraction of rows held out as test.pt.
        seed: Seed of the train/test split.
        mask_inputs: Leave the prompt out of the loss (labels = ignore_index at prompt positions).
        ignore_index: Label value of positions without a loss (negative: -100 is PyTorch's default).
        max_seq_length: Truncate examples to this many tokens (default: the model's context length).
        include_multiturn_conversations: Make a row of every (user, assistant) pair instead of only the first; with
            --prompt_style chatml or chat_template a later pair's prompt holds the conversation before it, with
            the other styles (single-turn formats) it is the pair's question alone.
        data_repo_id: Hugging Face dataset repository to download from (gated: accept its terms on the Hub first).
        data_file_name: File in that repository, and its name in the destination (a copy there is used as is).
        data_file_path: A local LIMA JSON Lines file to use instead of downloading.
        access_token: Hugging Face token for the gated download (default: the HF_TOKEN environment variable).
        prompt_style: Template the examples are written in (chatml or chat_template for chat models).
        system_prompt: System message for the chatml/chat_template styles.
    """
    # typed SecretStr so that --print_config masks it
    token = secret_text(access_token) or os.getenv("HF_TOKEN") or None
    if token:
        gated_hint = (f"{data_repo_id} is gated: accept its terms on the Hugging Face Hub with the account your token "
                      "belongs to, and check that the token is valid.")
    else:
        gated_hint = (f"{data_repo_id} is gated: accept its terms on the Hugging Face Hub, then pass --access_token "
                      "TOKEN or set HF_TOKEN.")

    def load_rows(destination: Path):
        source = Source(hf_repo_id=data_repo_id, hf_filename=data_file_name, token=token, hint=gated_hint)
        path = fetch_data_file(destination, data_file_name, source, data_file_path)
        records = read_records(path)
        for number, record in enumerate(records, start=1):
            if not isinstance(record, dict) or "conversations" not in record:
                if len(records) == 1:
                    check_not_wrapped(record, path)
                raise DataPreparationError(f"{str(path)!r} row {number} has no 'conversations' field.")
        rows = conversation_rows([r["conversations"] for r in records], path, include_multiturn_conversations)
        checked = check_rows(rows, path, required=("instruction", "output"), optional=("input",))
        for row, kept in zip(rows, checked):  # (the turns of `history` are texts: `conversation_rows` checked them)
            if "history" in row:
                kept["history"] = row["history"]
        return checked, None

    return prepare_instruction_data(
        dataset="lima", checkpoint_dir=checkpoint_dir, destination_path=destination_path,
        max_seq_length=max_seq_length, load_rows=load_rows, test_split_fraction=test_split_fraction, seed=seed,
        mask_inputs=mask_inputs, ignore_index=ignore_index, prompt_style=prompt_style, system_prompt=system_prompt,
        extra={"include_multiturn_conversations": include_multiturn_conversations},
    )


if __name__ == "__main__":
    run_cli(prepare)
