"""The offline quickstart's synthetic instruction data: short questions with one checkable answer.

The task families were picked for what SmolLM2-135M-Instruct gets wrong before fine-tuning but can learn within a
few hundred CPU steps of ETHER on the attention queries and values: each has a short prompt, a one-to-three-token
answer, and a rule the model half knows already (weekdays, months, the alphabet, unit factors, comparing numbers).
Answers are computed here, the tests recompute them independently from the question text.

The held-out rows carry `prompt`, the Alpaca-formatted question (`prompt_style_from_name("alpaca").apply(...)`), so
the base and the fine-tuned model are asked the same text in the same format by the lm-eval task
(`eval/tasks/quickstart/`). Why Alpaca rather than the base model's chat template: the fine-tuned model is trained on
Alpaca prompts, and one prompt for both sides keeps the comparison about the weights, not the wrapper.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from lit_gpt.utils import atomic_write_text

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# (question unit, answer unit, factor): "How many <small> are in N <large>?" -> N * factor
UNITS = (
    ("meters", "kilometers", 1000),
    ("grams", "kilograms", 1000),
    ("seconds", "minutes", 60),
    ("minutes", "hours", 60),
    ("hours", "days", 24),
    ("days", "weeks", 7),
    ("months", "years", 12),
    ("centimeters", "meters", 100),
)
WORDS = (
    "apple", "river", "planet", "garden", "window", "yellow", "market", "silver", "pencil", "forest", "bridge",
    "candle", "doctor", "engine", "island", "jacket", "kitten", "ladder", "mirror", "needle", "orange", "pocket",
    "rabbit", "saddle", "tunnel", "violet", "wallet", "zipper", "anchor", "basket", "castle", "dragon", "falcon",
    "guitar", "hammer", "insect", "jungle", "kettle", "lemon", "magnet", "number", "object", "parrot", "quiet",
    "rocket", "spider", "ticket", "umbrella", "valley", "winter", "button", "cherry", "dinner", "flower", "gentle",
    "honey", "letter", "monkey", "nickel", "oxygen", "pepper", "rescue", "summer", "tomato", "wizard", "yogurt",
    "bottle", "cloud", "desert", "feather", "glass", "horse", "ocean", "piano", "stone", "table", "tiger", "train",
    "water", "cookie", "sugar", "travel", "velvet", "circle", "shadow", "butter", "copper", "marble", "lizard",
)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 1000), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


def _weekday(rng: random.Random) -> tuple[str, str]:
    day, n = rng.randrange(7), rng.randint(1, 20)
    return f"What day of the week is {n} days after {WEEKDAYS[day]}?", WEEKDAYS[(day + n) % 7]


def _month(rng: random.Random) -> tuple[str, str]:
    month, n = rng.randrange(12), rng.randint(1, 23)
    return f"What month is {n} months after {MONTHS[month]}?", MONTHS[(month + n) % 12]


def _convert(rng: random.Random) -> tuple[str, str]:
    small, large, factor = rng.choice(UNITS)
    n = rng.randint(2, 19)
    return f"How many {small} are in {n} {large}?", str(n * factor)


def _next_letter(rng: random.Random) -> tuple[str, str]:
    i, n = rng.randrange(20), rng.randint(1, 5)
    return f"Which letter comes {n} after '{LETTERS[i]}' in the alphabet?", LETTERS[i + n]


def _last_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"What is the last letter of the word '{word}'?", word[-1]


def _length(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in the word '{word}'?", str(len(word))


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "larger": _larger,
    "weekday": _weekday,
    "month": _month,
    "convert": _convert,
    "next_letter": _next_letter,
    "last_letter": _last_letter,
    "length": _length,
}


def generate_rows(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and test rows (`instruction`, `input`, `output`, `family`), families taken in turn.

    The test set is drawn first, without repeats; the train set never contains a test question but may repeat its
    own questions (the letter and calendar families have only a few hundred distinct questions), so a held-out
    question is always unseen. Raises ValueError when the families cannot supply `n_test` distinct questions.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"--n_train ({n_train}) and --n_test ({n_test}) must not be negative.")
    rng = random.Random(seed)
    names = sorted(FAMILIES)

    def draw(n: int, exclude: set[str], distinct: bool) -> list[dict]:
        rows: list[dict] = []
        misses = 0  # consecutive draws that hit an excluded question: the families are running dry
        while len(rows) < n:
            if misses > 10_000:
                raise ValueError(f"Could not draw {n} distinct questions from {len(FAMILIES)} families; "
                                 "lower --n_test.")
            family = names[len(rows) % len(names)]
            question, answer = FAMILIES[family](rng)
            if question in exclude:
                misses += 1
                continue
            misses = 0
            if distinct:
                exclude.add(question)
            rows.append({"instruction": question, "input": "", "output": answer, "family": family})
        return rows

    held_out: set[str] = set()
    test = draw(n_test, held_out, distinct=True)
    train = draw(n_train, held_out, distinct=False)
    rng.shuffle(train)
    return train, test


def write_dataset(out_dir: Path | str, n_train: int = 3000, n_test: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write `train.json` (Alpaca rows for `scripts/prepare_json.py`) and `test.jsonl` (held out, with the Alpaca
    `prompt`) into `out_dir`; returns their paths."""
    from lit_gpt.data.prompts import prompt_style_from_name

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = generate_rows(n_train, n_test, seed)
    style = prompt_style_from_name("alpaca")
    train_rows = [{k: row[k] for k in ("instruction", "input", "output")} for row in train]
    test_rows = [dict(row, prompt=style.apply(row["instruction"], row["input"])) for row in test]
    paths = {"train": out_dir / "train.json", "test": out_dir / "test.jsonl"}
    atomic_write_text(paths["train"], json.dumps(train_rows, indent=1) + "\n")
    atomic_write_text(paths["test"], "".join(json.dumps(row) + "\n" for row in test_rows))
    return paths
