"""Prepare subsets of the FLAN collection (Muennighoff/flan on the Hugging Face Hub) for instruction tuning."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.data.prompts import PromptStyleName
from lit_gpt.cli import run_cli
from lit_gpt.data.prepare import (
    DataPreparationError,
    Source,
    check_rows,
    fetch_data_file,
    local_data_file,
    note_unused_split_flags,
    prepare_instruction_data,
    read_records,
)

# the "*_10templates" subsets of Muennighoff/flan, as lit-gpt lists them
SUBSETS = tuple(f"{name}_10templates" for name in (
    "aeslc ag_news_subset anli_r1 anli_r2 anli_r3 arc_challenge arc_easy bool_q cb cnn_dailymail cola common_gen "
    "copa coqa cosmos_qa dart definite_pronoun_resolution drop e2e_nlg fix_punct gigaword glue_mrpc glue_qqp "
    "hellaswag imdb_reviews math_dataset mnli_matched mnli_mismatched multi_news multirc natural_questions "
    "openbookqa opinion_abstracts_idebate opinion_abstracts_rotten_tomatoes para_crawl_enes paws_wiki piqa qnli "
    "quac record rte samsum sentiment140 snli squad_v1 squad_v2 sst2 story_cloze stsb trec trivia_qa true_case "
    "web_nlg_en wic wiki_lingua_english_en wmt14_enfr wmt16_translate_csen wmt16_translate_deen "
    "wmt16_translate_fien wmt16_translate_roen wmt16_translate_ruen wmt16_translate_tren wnli word_segment wsc "
    "yelp_polarity_reviews"
).split())


def flan_rows(path: Path) -> list[dict]:
    return check_rows(read_records(path), path, required=("inputs", "targets"),
                      rename={"inputs": "instruction", "targets": "output"})


def prepare(
    destination_path: Optional[Path] = None,
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    subsets: Optional[str] = None,
    test_split_fraction: Optional[float] = None,
    seed: Optional[int] = None,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    max_seq_length: Optional[int] = None,
    data_repo_id: str = "Muennighoff/flan",
    data_file_path: Optional[Path] = None,
    prompt_style: PromptStyleName = "flan",
    system_prompt: Optional[str] = None,
) -> Path:
    """Tokenize FLAN subsets (inputs -> instruction, targets -> output) into train.pt and test.pt.

    Each subset's own train and test files are downloaded (a copy already in the destination, named
    <subset>_<split>.jsonl, is used as is). With --data_file_path, that one local FLAN JSON Lines file is used
    instead and split with --test_split_fraction and --seed.

    Args:
        destination_path: Output directory (default: <checkpoint_dir>/flan-t<max_seq_length>).
        checkpoint_dir: Checkpoint whose tokenizer to use.
        subsets: Comma-separated subset names, e.g. "arc_easy_10templates,piqa_10templates" (default: all 66).
        test_split_fraction: Fraction held out as test.pt when --data_file_path is used (default 0.1).
        seed: Seed of that split (default 42).
        mask_inputs: Leave the prompt out of the loss (labels = ignore_index at prompt positions).
        ignore_index: Label value of positions without a loss (negative: -100 is PyTorch's default).
        max_seq_length: Truncate examples to this many tokens (default: the model's context length).
        data_repo_id: Hugging Face dataset repository to download from.
        data_file_path: A local FLAN JSON Lines file (inputs/targets) to use instead of downloading.
        prompt_style: Template the examples are written in (chatml or chat_template for chat models).
        system_prompt: System message for the chatml/chat_template styles.
    """
    names = list(SUBSETS) if subsets is None else [s.strip() for s in subsets.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUBSETS]
    if not names:
        raise DataPreparationError(
            f"--subsets {subsets!r} names no subset; pass comma-separated names from {', '.join(SUBSETS)}, or leave "
            "it out for all of them."
        )
    if unknown:
        raise DataPreparationError(
            f"--subsets has unknown FLAN subsets {unknown}; choose from {', '.join(SUBSETS)}."
        )
    if data_file_path is not None and subsets is not None:
        print("Note: --subsets is not used with --data_file_path; every row of that file is used.", file=sys.stderr)
    if data_file_path is None:
        note_unused_split_flags(test_split_fraction, seed, "FLAN's own train and test files are (a split is made "
                                "only of a --data_file_path file)")

    def load_rows(destination: Path):
        if data_file_path is not None:
            return flan_rows(local_data_file(data_file_path)), None
        splits = {"train": [], "test": []}
        for name in names:
            for split, rows in splits.items():
                filename = f"{name}_{split}.jsonl"
                source = Source(hf_repo_id=data_repo_id, hf_filename=f"{split}/{filename}")
                rows.extend(flan_rows(fetch_data_file(destination, filename, source)))
        return splits["train"], splits["test"]

    return prepare_instruction_data(
        dataset="flan", checkpoint_dir=checkpoint_dir, destination_path=destination_path,
        max_seq_length=max_seq_length, load_rows=load_rows, test_split_fraction=test_split_fraction, seed=seed,
        mask_inputs=mask_inputs, ignore_index=ignore_index, prompt_style=prompt_style, system_prompt=system_prompt,
        # what was used: a local file's rows are whatever it holds, not the subsets named
        extra={"subsets": names} if data_file_path is None else {"source": str(data_file_path)},
    )


if __name__ == "__main__":
    run_cli(prepare)
