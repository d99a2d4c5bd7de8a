"""Data loading and exact-match scoring for the quickstart task (`quickstart.yaml`).

lm-eval imports this file by path (`!function utils.…`), so it must not import lit_gpt.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# scripts/make_quickstart_data.py's default --out_dir, under the repository root (this file is
# <repo>/eval/tasks/quickstart/utils.py), so the task finds the data whatever the working directory is.
DEFAULT_DATA_FILE = Path(__file__).resolve().parents[3] / "data" / "quickstart" / "test.jsonl"
_TRAILING = string.punctuation + string.whitespace


def load_test_set(data_file: str | None = None, **metadata):
    """The held-out rows as a `datasets.DatasetDict` with one `test` split.

    `data_file` comes from lm-eval's task metadata (`--metadata '{"data_file": "…/test.jsonl"}'` or
    `TaskManager(metadata={"data_file": …})`); without it, the generator's default location.
    """
    import datasets

    path = Path(data_file) if data_file else DEFAULT_DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The quickstart test set {str(path)!r} does not exist; write it with "
            f"`python scripts/make_quickstart_data.py --out_dir {path.parent}` or pass the path of an existing one "
            """with --metadata '{"data_file": "PATH"}'."""
        )
    # JSON Lines ends a line at "\n" only: splitlines() would also cut at a U+2028 / U+0085 inside a string
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", "output") if k not in row]
        if missing:
            raise ValueError(f"Row {i + 1} of {str(path)!r} lacks {missing}; regenerate it with "
                             "scripts/make_quickstart_data.py.")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def normalize(text: str) -> str:
    """Compare answers the way a person would: the first non-empty line, case-folded, without surrounding quotes
    or trailing punctuation ("Friday." == "friday", "'t'" == "t"). The base model tends to start its answer with a
    newline after "### Response:", so leading blank lines are skipped rather than read as an empty answer."""
    text = text.strip().split("\n", 1)[0].strip().casefold()
    text = text.strip("'\"`").rstrip(_TRAILING).strip("'\"`").strip()
    return text


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the greedy answer against the row's `output`, both normalised."""
    return {"exact_match": float(normalize(results[0]) == normalize(doc["output"]))}
