"""The quickstart's synthetic data and its lm-eval task: determinism, correct answers, no train/test overlap."""

import datetime
import json
import re
import sys
from pathlib import Path

import pytest

from lit_gpt.data.quickstart import FAMILIES, generate_rows, write_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = REPO_ROOT / "eval" / "tasks" / "quickstart"

# Written out here rather than imported, so a wrong factor or list in the generator cannot pass unnoticed.
FACTORS = {("meters", "kilometers"): 1000, ("grams", "kilograms"): 1000, ("seconds", "minutes"): 60,
           ("minutes", "hours"): 60, ("hours", "days"): 24, ("days", "weeks"): 7, ("months", "years"): 12,
           ("centimeters", "meters"): 100}


def expected_answer(question: str) -> str:
    """The answer to a generated question, worked out from its text with the standard library."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", question):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"What day of the week is (\d+) days after (\w+)\?", question):
        # 2024-01-01 was a Monday; walk the real calendar
        start = datetime.date(2024, 1, 1)
        while start.strftime("%A") != m[2]:
            start += datetime.timedelta(days=1)
        return (start + datetime.timedelta(days=int(m[1]))).strftime("%A")
    if m := re.fullmatch(r"What month is (\d+) months after (\w+)\?", question):
        month = datetime.datetime.strptime(m[2], "%B").month
        return datetime.date(2024, (month - 1 + int(m[1])) % 12 + 1, 1).strftime("%B")
    if m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question):
        return str(int(m[2]) * FACTORS[(m[1], m[3])])
    if m := re.fullmatch(r"Which letter comes (\d+) after '([a-z])' in the alphabet\?", question):
        return chr(ord(m[2]) + int(m[1]))
    if m := re.fullmatch(r"What is the last letter of the word '([a-z]+)'\?", question):
        return m[1][-1]
    if m := re.fullmatch(r"How many letters are in the word '([a-z]+)'\?", question):
        return str(len(m[1]))
    raise AssertionError(f"unrecognised question {question!r}")


def test_same_seed_writes_identical_files_and_another_seed_differs(tmp_path):
    a = write_dataset(tmp_path / "a", n_train=300, n_test=40, seed=3)
    b = write_dataset(tmp_path / "b", n_train=300, n_test=40, seed=3)
    c = write_dataset(tmp_path / "c", n_train=300, n_test=40, seed=4)
    for split in ("train", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()


def test_every_answer_is_correct_and_every_family_is_present():
    train, test = generate_rows(n_train=3000, n_test=200, seed=0)
    assert len(train) == 3000 and len(test) == 200
    for row in train + test:
        assert row["output"] == expected_answer(row["instruction"]), row
        assert row["input"] == ""
    assert {row["family"] for row in test} == set(FAMILIES)


def test_no_test_question_is_in_the_training_set_and_test_questions_are_distinct():
    train, test = generate_rows(n_train=3000, n_test=200, seed=0)
    test_questions = [row["instruction"] for row in test]
    assert len(set(test_questions)) == len(test_questions)
    assert not set(test_questions) & {row["instruction"] for row in train}


def test_files_hold_alpaca_rows_and_the_alpaca_prompt(tmp_path):
    paths = write_dataset(tmp_path, n_train=50, n_test=16, seed=0)
    train = json.loads(paths["train"].read_text())
    assert all(set(row) == {"instruction", "input", "output"} for row in train)
    test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert len(test) == 16
    header = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n")  # Stanford Alpaca's template, written out by hand
    for row in test:
        assert row["prompt"] == f"{header}### Instruction:\n{row['instruction']}\n\n### Response:"


def test_impossible_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="n_train"):
        generate_rows(n_train=-1, n_test=5)
    with pytest.raises(ValueError, match="--n_test"):
        generate_rows(n_train=0, n_test=100_000)


@pytest.fixture(scope="module")
def task_utils():
    sys.path.insert(0, str(TASK_DIR))
    try:
        import utils as quickstart_utils
    finally:
        sys.path.remove(str(TASK_DIR))
    sys.modules.pop("utils", None)
    return quickstart_utils


@pytest.mark.parametrize("prediction, target, right", [
    ("Friday", "Friday", True),
    (" friday.\n### Instruction: more", "Friday", True),
    ("'t'", "t", True),
    ("122!", "122", True),
    ("\n\n122\nbecause 59 + 63 = 122", "122", True),
    ("Thursday", "Friday", False),
    ("1220", "122", False),
    ("The answer is 122.", "122", False),
])
def test_exact_match_normalisation(task_utils, prediction, target, right):
    assert task_utils.process_results({"output": target}, [prediction]) == {"exact_match": float(right)}


def test_missing_test_set_is_a_clear_error(task_utils, tmp_path):
    with pytest.raises(FileNotFoundError, match="make_quickstart_data.py"):
        task_utils.load_test_set(data_file=str(tmp_path / "missing.jsonl"))


@pytest.mark.slow
def test_lm_eval_loads_the_task_and_scores_with_it(tmp_path):
    from lm_eval.tasks import TaskManager

    paths = write_dataset(tmp_path, n_train=10, n_test=24, seed=0)
    rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                          metadata={"data_file": str(paths["test"])})
    if hasattr(manager, "load"):  # lm-eval's newer API; load_task_or_group is deprecated there
        task = manager.load(["quickstart"])["tasks"]["quickstart"]
    else:
        task = manager.load_task_or_group(["quickstart"])["quickstart"]
    docs = list(task.test_docs())
    assert len(docs) == 24
    assert [task.doc_to_text(d) for d in docs] == [r["prompt"] for r in rows]
    assert [task.doc_to_target(d) for d in docs] == [r["output"] for r in rows]
    assert task.OUTPUT_TYPE == "generate_until"
    until = task.config.generation_kwargs["until"]
    assert "\n\n" in until and "\n" not in until
    doc = docs[0]
    assert task.process_results(doc, [doc["output"].upper() + "."]) == {"exact_match": 1.0}
    assert task.process_results(doc, [doc["output"] + "0"]) == {"exact_match": 0.0}


def test_test_set_lines_end_at_newline_only(task_utils, tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 unescaped in a string: they must not cut a row in two."""
    rows = [{"prompt": "p\u2028q", "output": "a\u0085"}, {"prompt": "r", "output": "s\u2029"}]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert task_utils.load_test_set(data_file=str(path))["test"].to_list() == rows


def test_out_dir_that_is_a_file_is_one_sentence(tmp_path, capsys):
    from lit_gpt.cli import run_cli

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import make_quickstart_data
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    path = tmp_path / "rows.json"
    path.write_text("[]")
    with pytest.raises(SystemExit) as e:
        run_cli(make_quickstart_data.main, args=["--out_dir", str(path), "--n_train", "2", "--n_test", "2"])
    assert e.value.code == 1
    assert capsys.readouterr().err == (f"error: --out_dir {str(path)!r} is an existing file; pass a folder to write "
                                       "into (it is created if new).\n")
    assert path.read_text() == "[]"
