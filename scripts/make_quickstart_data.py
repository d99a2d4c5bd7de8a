"""Write the offline quickstart's synthetic instruction data: train.json (Alpaca rows) and a held-out test.jsonl."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.cli import run_cli  # noqa: E402
from lit_gpt.data.quickstart import FAMILIES, write_dataset  # noqa: E402
from lit_gpt.utils import check_output_dir  # noqa: E402


def main(out_dir: Path = Path("data/quickstart"), seed: int = 0, n_train: int = 3000, n_test: int = 200) -> None:
    """Generate short questions with one checkable answer (arithmetic, unit conversion, weekdays, months, letters).

    The same seed always writes byte-identical files. `train.json` is for `scripts/prepare_json.py`; `test.jsonl`
    is the held-out set the lm-eval task `eval/tasks/quickstart` reads (its default location is this script's
    default `--out_dir`, data/quickstart under the repository root; elsewhere pass
    `--metadata '{"data_file": "<out_dir>/test.jsonl"}'` to lm-eval).

    Args:
        out_dir: Directory to write train.json and test.jsonl into (created if missing).
        seed: Random seed; the same seed gives identical files.
        n_train: Number of training rows.
        n_test: Number of held-out rows; none of their questions appears in train.json.
    """
    check_output_dir(out_dir, "--out_dir")
    paths = write_dataset(out_dir, n_train=n_train, n_test=n_test, seed=seed)
    print(f"Wrote {n_train} training rows to {paths['train']} and {n_test} held-out rows to {paths['test']} "
          f"({len(FAMILIES)} task families: {', '.join(sorted(FAMILIES))}).")


if __name__ == "__main__":
    run_cli(main)
