"""Instruction data: prompt styles, the prepare scripts, collate and the resumable sampler.

Everything runs on local files. The expected token ids are computed with the `tokenizers` library directly (not our
`Tokenizer`) from template text written out here, so a wrong template, a lost BOS/EOS or a shifted mask shows up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch

import lit_gpt.data.prepare as prep
from lit_gpt.config import Config
from lit_gpt.data import (
    DataPreparationError,
    MicroBatchLoader,
    SFTDataset,
    collate,
    epoch_order,
    load_prompt_style,
    prompt_style_from_name,
    read_prepare_config,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import prepare_alpaca  # noqa: E402
import prepare_csv  # noqa: E402
import prepare_dolly  # noqa: E402
import prepare_flan  # noqa: E402
import prepare_json  # noqa: E402
import prepare_lima  # noqa: E402
import prepare_longform  # noqa: E402

# Stanford Alpaca's template (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), written out by hand
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat well, exercise and sleep enough."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Summarise the text.", "input": "The cat sat on the mat all day long.",
     "output": "A cat rested."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"instruction": "Write a haiku about rain.", "input": "",
     "output": "Soft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth"},
    {"instruction": "Classify the sentiment.", "input": "I love this film", "output": "positive"},
    {"instruction": "Spell the word backwards.", "input": "stressed", "output": "desserts"},
    {"instruction": "Is water wet?", "input": "", "output": "It makes things wet."},
]


# --------------------------------------------------------------------------------------------- a tiny tokenizer


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A checkpoint directory with only a tiny byte-level BPE tokenizer (BOS <s>, EOS </s>) and a model config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [ALPACA_INPUT, ALPACA_NO_INPUT] + [" ".join(r.values()) for r in ROWS]
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("ckpt")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    Config(name="tiny", block_size=512, n_layer=1, n_head=2, n_embd=8, vocab_size=400).save(d)
    return d


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
    return tok, tok.token_to_id("<s>"), tok.token_to_id("</s>")


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load_split(d: Path, split: str) -> list[dict]:
    return torch.load(d / f"{split}.pt", weights_only=True)


def no_download(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no download may happen in this test")

    monkeypatch.setattr(prep, "download_url", fail)
    monkeypatch.setattr(prep, "download_hf", fail)


# --------------------------------------------------------------------------------------------- prompt styles


def test_alpaca_template_text_with_and_without_input():
    style = prompt_style_from_name("alpaca")
    assert style.apply("Do X.", "some input") == ALPACA_INPUT.format(instruction="Do X.", input="some input")
    assert style.apply("Do X.") == ALPACA_NO_INPUT.format(instruction="Do X.")
    assert style.apply("Do X.", "") == ALPACA_NO_INPUT.format(instruction="Do X.")
    # Dolly and LIMA were prepared in the Alpaca format by lit-gpt
    for name in ("dolly", "lima"):
        assert prompt_style_from_name(name).apply("Do X.", "ctx") == style.apply("Do X.", "ctx")


def test_other_prompt_styles():
    assert prompt_style_from_name("flan").apply("Premise: a. Hypothesis: b.") == ALPACA_NO_INPUT.format(
        instruction="Premise: a. Hypothesis: b.")
    # FLAN has no input field: a row's input is kept, after the instruction, not dropped
    assert prompt_style_from_name("flan").apply("Summarise.", "The cat sat.") == ALPACA_NO_INPUT.format(
        instruction="Summarise.\n\nThe cat sat.")
    assert prompt_style_from_name("longform").apply("Write an essay.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nWrite an essay.\n\n"
        "### Response:")
    assert prompt_style_from_name("chatml").apply("Hi", "there") == (
        "<|im_start|>user\nHi\n\nthere<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_style_from_name("chatml", system_prompt="Be brief.").apply("Hi") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="Unknown prompt style 'nope'; choose one of alpaca"):
        prompt_style_from_name("nope")
    with pytest.raises(ValueError, match="no chat template"):
        prompt_style_from_name("chat_template", checkpoint_dir=None, tokenizer=type("T", (), {"chat_template": None})())


def test_chat_template_style_matches_transformers(tmp_path, checkpoint_dir):
    """The `chat_template` style renders the checkpoint's template as transformers does."""
    from transformers import PreTrainedTokenizerFast

    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    d = tmp_path / "chat"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((checkpoint_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template}))
    style = prompt_style_from_name("chat_template", checkpoint_dir=d, system_prompt="Be brief.")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token="<|im_end|>")
    expected = hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"}],
        chat_template=template, tokenize=False, add_generation_prompt=True)
    assert style.apply("Hi", "there") == expected
    assert expected == prompt_style_from_name("chatml", system_prompt="Be brief.").apply("Hi", "there")


# --------------------------------------------------------------------------------------------- prepare: Alpaca


def expected_tokens(reference, row: dict, max_seq_length: int = 10**9):
    tok, bos, eos = reference
    template = ALPACA_INPUT if row["input"] else ALPACA_NO_INPUT
    prompt = [bos] + tok.encode(template.format(**row), add_special_tokens=False).ids
    response = tok.encode(row["output"], add_special_tokens=False).ids + [eos]
    ids = (prompt + response)[:max_seq_length]
    labels = ([-100] * len(prompt) + response)[:max_seq_length]
    return ids, labels


def test_prepare_alpaca_tokens_masks_and_files(tmp_path, checkpoint_dir, reference, monkeypatch):
    no_download(monkeypatch)
    data = write_json(tmp_path / "alpaca.json", ROWS)
    out = prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                                 data_file_path=data, test_split_fraction=0.2, max_seq_length=512)
    assert out == tmp_path / "out"
    train, test = load_split(out, "train"), load_split(out, "test")
    assert (len(train), len(test)) == (8, 2)
    by_instruction = {r["instruction"]: r for r in ROWS}
    tok, bos, eos = reference
    for sample in train + test:
        row = by_instruction[sample["instruction"]]
        assert (sample["input"], sample["output"]) == (row["input"], row["output"])
        ids, labels = expected_tokens(reference, row)
        assert sample["input_ids"].dtype == torch.long and sample["labels"].dtype == torch.long
        assert sample["input_ids"].tolist() == ids
        assert sample["labels"].tolist() == labels
        assert sample["input_ids"][0] == bos and sample["input_ids"][-1] == eos
        template = ALPACA_INPUT if row["input"] else ALPACA_NO_INPUT
        assert tok.decode(sample["input_ids"][1:-1].tolist()) == template.format(**row) + row["output"]
    config = read_prepare_config(out)
    assert config["prompt_style"] == "alpaca" and config["max_seq_length"] == 512
    assert config["checkpoint_dir"] == str(checkpoint_dir) and config["eos_id"] == eos
    assert config["splits"]["train"]["truncated"] == 0
    assert load_prompt_style(out).apply("Do X.") == ALPACA_NO_INPUT.format(instruction="Do X.")
    # the training side reads the same files
    ds = SFTDataset.from_dir(out, "train")
    assert len(ds) == 8 and ds.longest_seq_length == max(len(s["input_ids"]) for s in train)


def test_bos_follows_the_tokenizer_default(tmp_path, checkpoint_dir, reference, monkeypatch):
    """A model whose prompts start without BOS (add_bos_token false, like SmolLM2) gets none; EOS stays."""
    no_download(monkeypatch)
    d = tmp_path / "nobos"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((checkpoint_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}))
    out = prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=d, max_seq_length=512,
                                 data_file_path=write_json(tmp_path / "alpaca.json", ROWS))
    for sample in load_split(out, "train"):
        ids, labels = expected_tokens(reference, by_name(sample["instruction"]))
        assert sample["input_ids"].tolist() == ids[1:] and sample["labels"].tolist() == labels[1:]


def test_prepare_without_masking_keeps_prompt_labels(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    data = write_json(tmp_path / "alpaca.json", ROWS)
    out = prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                                 data_file_path=data, mask_inputs=False, max_seq_length=512)
    for sample in load_split(out, "train"):
        assert torch.equal(sample["input_ids"], sample["labels"])


def test_truncation_is_reported_and_prompt_only_rows_are_dropped(tmp_path, checkpoint_dir, reference, monkeypatch,
                                                                 capsys):
    no_download(monkeypatch)
    data = write_json(tmp_path / "alpaca.json", ROWS)
    full = {r["instruction"]: expected_tokens(reference, r) for r in ROWS}
    prompt_lengths = {k: labels.count(-100) for k, (_, labels) in full.items()}
    limit = min(prompt_lengths.values()) + 1  # the shortest prompts keep one response token, longer ones none
    out = prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                                 data_file_path=data, test_split_fraction=0.0, max_seq_length=limit)
    samples = load_split(out, "train")
    expected_dropped = sum(length >= limit for length in prompt_lengths.values())
    expected_truncated = sum(len(ids) > limit for ids, _ in full.values())
    assert 0 < expected_dropped < expected_truncated
    assert len(samples) == len(ROWS) - expected_dropped
    for sample in samples:
        ids, labels = expected_tokens(reference, by_name(sample["instruction"]), max_seq_length=limit)
        assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == labels
        assert len(ids) <= limit and any(x != -100 for x in labels)
    stats = read_prepare_config(out)["splits"]["train"]
    assert (stats["truncated"], stats["dropped"], stats["kept"]) == (
        expected_truncated, expected_dropped, len(ROWS) - expected_dropped)
    printed = capsys.readouterr().out
    assert f"{expected_truncated:,} of {len(ROWS):,} rows truncated to max_seq_length={limit}" in printed
    assert f"{expected_dropped:,} dropped" in printed


def by_name(instruction: str) -> dict:
    return next(r for r in ROWS if r["instruction"] == instruction)


def test_split_is_deterministic_per_seed(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    data = write_json(tmp_path / "alpaca.json", ROWS * 3)  # 30 rows: enough for seeds to disagree
    tests = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = prepare_alpaca.prepare(destination_path=tmp_path / run, checkpoint_dir=checkpoint_dir,
                                     data_file_path=data, seed=seed, test_split_fraction=0.3, max_seq_length=512)
        tests[run] = [s["input_ids"].tolist() for s in load_split(out, "test")]
        assert len(tests[run]) == 9 and len(load_split(out, "train")) == 21
    assert tests["a"] == tests["b"]
    assert tests["a"] != tests["c"]
    # the split itself: disjoint and complete, as torch's random_split would draw it
    train, test = prep.split_rows(list(range(30)), 0.3, seed=1)
    assert sorted(train + test) == list(range(30)) and len(test) == 9
    assert (train, test) == prep.split_rows(list(range(30)), 0.3, seed=1)
    for n, fraction, seed in ((30, 0.3, 1), (52002, 0.03865, 42), (7, 0.5, 3)):
        ours = prep.split_rows(list(range(n)), fraction, seed=seed)
        theirs = torch.utils.data.random_split(list(range(n)), [len(ours[0]), len(ours[1])],
                                               generator=torch.Generator().manual_seed(seed))
        assert ours == tuple(list(part) for part in theirs)
    with warnings.catch_warnings():  # random_split warns of its empty test split: we do not
        warnings.simplefilter("error")
        assert prep.split_rows([{"a": 1}], 0.0, seed=1) == ([{"a": 1}], [])
        assert sorted(prep.split_rows(list(range(5)), 0.0, seed=1)[0]) == list(range(5))
    with pytest.raises(DataPreparationError, match="--test_split_fraction must be in"):
        prep.split_rows(list(range(30)), 1.0, seed=1)


def test_default_destination_names(tmp_path, checkpoint_dir, monkeypatch, capsys):
    no_download(monkeypatch)
    ckpt = tmp_path / "checkpoints" / "org" / "model"
    ckpt.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "model_config.yaml"):
        (ckpt / f).write_bytes((checkpoint_dir / f).read_bytes())
    data = write_json(tmp_path / "alpaca.json", ROWS)
    assert prepare_alpaca.prepare(checkpoint_dir=ckpt, data_file_path=data, max_seq_length=256) == ckpt / "alpaca-t256"
    assert (ckpt / "alpaca-t256" / "train.pt").is_file() and (ckpt / "alpaca-t256" / "test.pt").is_file()
    # without --max_seq_length the model's context length (block_size 512 in model_config.yaml) is used
    assert prepare_alpaca.prepare(checkpoint_dir=ckpt, data_file_path=data) == ckpt / "alpaca-t512"
    assert read_prepare_config(ckpt / "alpaca-t512")["max_seq_length"] == 512
    assert "longer than the model's context" not in capsys.readouterr().err
    # beyond the context it is kept (the user asked for it) with a note that training cuts to the context
    out = prepare_alpaca.prepare(checkpoint_dir=ckpt, data_file_path=data, max_seq_length=4096)
    assert out == ckpt / "alpaca-t4096"
    assert ("--max_seq_length 4096 is longer than the model's context of 512 tokens; training cuts every example to "
            "512 tokens") in capsys.readouterr().err
    (ckpt / "model_config.yaml").unlink()
    with pytest.raises(DataPreparationError, match="Pass --max_seq_length"):
        prepare_alpaca.prepare(checkpoint_dir=ckpt, data_file_path=data)


def test_file_in_destination_is_used_without_download(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    dest = tmp_path / "out"
    dest.mkdir()
    write_json(dest / "alpaca_data_cleaned_archive.json", ROWS)
    prepare_alpaca.prepare(destination_path=dest, checkpoint_dir=checkpoint_dir, max_seq_length=512)
    assert len(load_split(dest, "train")) + len(load_split(dest, "test")) == len(ROWS)


def test_download_is_used_when_online(tmp_path, checkpoint_dir, monkeypatch):
    calls = []

    def fake_download(url, target):
        calls.append(url)
        write_json(target, ROWS)

    monkeypatch.setattr(prep, "download_url", fake_download)
    out = prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                                 max_seq_length=512)
    assert calls == [prepare_alpaca.DATA_FILE_URL]
    assert (out / "alpaca_data_cleaned_archive.json").is_file()


def test_offline_without_file_says_how_to_pass_it(tmp_path, checkpoint_dir, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(prep, "download_url", offline)
    monkeypatch.setattr(prep, "download_hf", offline)
    with pytest.raises(DataPreparationError, match=r"Could not download https://.*pass it with --data_file_path FILE"):
        prepare_alpaca.prepare(destination_path=tmp_path / "a", checkpoint_dir=checkpoint_dir, max_seq_length=64)
    assert not (tmp_path / "a" / "alpaca_data_cleaned_archive.json").exists()
    with pytest.raises(DataPreparationError, match="databricks/databricks-dolly-15k.*--data_file_path FILE"):
        prepare_dolly.prepare(destination_path=tmp_path / "d", checkpoint_dir=checkpoint_dir, max_seq_length=64)
    with pytest.raises(DataPreparationError, match="gated.*--access_token TOKEN or set HF_TOKEN.*--data_file_path"):
        prepare_lima.prepare(destination_path=tmp_path / "l", checkpoint_dir=checkpoint_dir, max_seq_length=64)
    with pytest.raises(DataPreparationError, match="--data_file_path 'nope.json' does not exist"):
        prepare_alpaca.prepare(destination_path=tmp_path / "a", checkpoint_dir=checkpoint_dir, max_seq_length=64,
                               data_file_path=Path("nope.json"))


def test_malformed_row_names_file_row_and_field(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    rows = [dict(r) for r in ROWS]
    del rows[2]["output"]
    data = write_json(tmp_path / "bad.json", rows)
    with pytest.raises(DataPreparationError) as e:
        prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                               data_file_path=data, max_seq_length=64)
    assert str(e.value) == (f"{str(data)!r} row 3 has no 'output' field (every row needs 'instruction' and "
                            "'output').")
    rows = [dict(r) for r in ROWS]
    rows[4]["instruction"] = 7
    with pytest.raises(DataPreparationError, match=r"row 5 field 'instruction' is a int; it must be text"):
        prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                               data_file_path=write_json(tmp_path / "bad2.json", rows), max_seq_length=64)
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    with pytest.raises(DataPreparationError, match=r"line 2 is not valid JSON"):
        prepare_json.prepare(json_path=tmp_path / "bad.jsonl", destination_path=tmp_path / "out",
                             checkpoint_dir=checkpoint_dir, max_seq_length=64)
    (tmp_path / "bad.csv").write_text("instruction,output\nq1,a1\nq2\n")
    with pytest.raises(DataPreparationError, match=r"bad.csv' row 2 has no 'output' field"):
        prepare_csv.prepare(csv_path=tmp_path / "bad.csv", destination_path=tmp_path / "out",
                            checkpoint_dir=checkpoint_dir, max_seq_length=64)


def test_missing_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    no_download(monkeypatch)
    data = write_json(tmp_path / "alpaca.json", ROWS)
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=empty, data_file_path=data,
                               max_seq_length=64)
    assert not (tmp_path / "out" / "train.pt").exists()


def test_a_prepare_that_drops_every_row_writes_nothing_and_says_why(tmp_path, checkpoint_dir, reference,
                                                                   monkeypatch):
    no_download(monkeypatch)
    data = write_json(tmp_path / "alpaca.json", ROWS)
    shortest = min(expected_tokens(reference, r)[1].count(-100) for r in ROWS)  # prompt tokens of the shortest
    out = tmp_path / "out"
    with pytest.raises(DataPreparationError) as e:
        prepare_alpaca.prepare(destination_path=out, checkpoint_dir=checkpoint_dir, data_file_path=data,
                               test_split_fraction=0.0, max_seq_length=shortest)
    assert str(e.value) == (
        f"All {len(ROWS)} training rows were dropped because their prompt alone fills --max_seq_length {shortest} "
        f"(the shortest such prompt has {shortest} tokens), leaving no response token to learn from: raise "
        f"--max_seq_length above {shortest}; nothing was written to {str(out)!r}."
    )
    assert not any((out / name).exists() for name in ("train.pt", "test.pt", "prepare_config.yaml"))


def test_input_paths_and_the_checkpoint_are_checked_in_a_useful_order(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    with pytest.raises(DataPreparationError, match=r"--json_path '.*' is a directory without train.json or "
                                                   r"train.jsonl and val.json or val.jsonl: put .* or pass the data "
                                                   r"file itself"):
        prepare_json.prepare(json_path=tmp_path, checkpoint_dir=checkpoint_dir, max_seq_length=64)
    with pytest.raises(DataPreparationError, match=r"--csv_path '.*' is a directory without train.csv"):
        prepare_csv.prepare(csv_path=tmp_path, checkpoint_dir=checkpoint_dir, max_seq_length=64)
    with pytest.raises(DataPreparationError, match=r"--data_file_path '.*' is a directory"):
        prepare_alpaca.prepare(destination_path=tmp_path / "a", checkpoint_dir=checkpoint_dir, max_seq_length=64,
                               data_file_path=tmp_path)
    # a missing (default) checkpoint is named first, not the --max_seq_length that would be read from it
    data = write_json(tmp_path / "alpaca.json", ROWS)
    with pytest.raises(FileNotFoundError, match="--checkpoint_dir '.*nowhere' does not exist: download and convert"):
        prepare_alpaca.prepare(checkpoint_dir=tmp_path / "nowhere", data_file_path=data)


def test_prepare_config_records_the_tokenizer_fingerprint(tmp_path, checkpoint_dir, monkeypatch):
    from lit_gpt.tokenizer import Tokenizer

    no_download(monkeypatch)
    out = prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                                 data_file_path=write_json(tmp_path / "alpaca.json", ROWS), max_seq_length=64)
    recorded = read_prepare_config(out)["tokenizer_fingerprint"]
    assert recorded == prep.tokenizer_fingerprint(Tokenizer(checkpoint_dir)) and recorded.startswith("sha256:")
    # the same tokens under other ids (two swapped) is another tokenizer, with another fingerprint
    other = tmp_path / "other"
    other.mkdir()
    spec = json.loads((checkpoint_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (next(k for k, v in vocab.items() if v == i) for i in (300, 301))
    vocab[a], vocab[b] = 301, 300
    (other / "tokenizer.json").write_text(json.dumps(spec))
    (other / "tokenizer_config.json").write_bytes((checkpoint_dir / "tokenizer_config.json").read_bytes())
    assert prep.tokenizer_fingerprint(Tokenizer(other)) != recorded


# --------------------------------------------------------------------------------------------- other datasets


def test_prepare_dolly_maps_context_and_response(tmp_path, checkpoint_dir, reference, monkeypatch):
    no_download(monkeypatch)
    rows = [{"instruction": r["instruction"], "context": r["input"], "response": r["output"], "category": "qa"}
            for r in ROWS]
    data = write_jsonl(tmp_path / "dolly.jsonl", rows)
    out = prepare_dolly.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                                data_file_path=data, max_seq_length=512)
    samples = load_split(out, "train") + load_split(out, "test")
    assert len(samples) == len(ROWS)
    for sample in samples:
        ids, labels = expected_tokens(reference, by_name(sample["instruction"]))
        assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == labels
    assert read_prepare_config(out)["prompt_style"] == "dolly"


def test_prepare_dolly_downloads_from_the_hub(tmp_path, checkpoint_dir, monkeypatch):
    calls = []

    def fake_hf(repo_id, filename, target, token=None):
        calls.append((repo_id, filename))
        write_jsonl(target, [{"instruction": "q", "context": "", "response": "a"}] * 4)

    monkeypatch.setattr(prep, "download_hf", fake_hf)
    out = prepare_dolly.prepare(checkpoint_dir=checkpoint_dir, destination_path=tmp_path / "out", max_seq_length=64)
    assert calls == [("databricks/databricks-dolly-15k", "databricks-dolly-15k.jsonl")]
    assert len(load_split(out, "train")) == 3


def test_prepare_lima_turns(tmp_path, checkpoint_dir, reference, monkeypatch):
    no_download(monkeypatch)
    conversations = [
        {"conversations": ["What is 2+2?", "4", "And 3+3?", "6"], "source": "x"},
        {"conversations": ["Name a colour.", "Blue"], "source": "y"},
    ]
    data = write_jsonl(tmp_path / "lima.jsonl", conversations)
    out = prepare_lima.prepare(destination_path=tmp_path / "first", checkpoint_dir=checkpoint_dir,
                               data_file_path=data, test_split_fraction=0.0, max_seq_length=512)
    pairs = {(s["instruction"], s["output"]) for s in load_split(out, "train")}
    assert pairs == {("What is 2+2?", "4"), ("Name a colour.", "Blue")}
    tok, bos, eos = reference
    sample = next(s for s in load_split(out, "train") if s["output"] == "Blue")
    prompt = [bos] + tok.encode(ALPACA_NO_INPUT.format(instruction="Name a colour."), add_special_tokens=False).ids
    assert sample["input_ids"].tolist() == prompt + tok.encode("Blue", add_special_tokens=False).ids + [eos]
    out = prepare_lima.prepare(destination_path=tmp_path / "all", checkpoint_dir=checkpoint_dir,
                               data_file_path=data, test_split_fraction=0.0, max_seq_length=512,
                               include_multiturn_conversations=True)
    pairs = {(s["instruction"], s["output"]) for s in load_split(out, "train")}
    assert pairs == {("What is 2+2?", "4"), ("And 3+3?", "6"), ("Name a colour.", "Blue")}
    second = next(s for s in load_split(out, "train") if s["output"] == "6")
    prompt = [bos] + tok.encode(ALPACA_NO_INPUT.format(instruction="And 3+3?"), add_special_tokens=False).ids
    assert second["input_ids"][:second["prompt_length"]].tolist() == prompt  # single-turn formats: the pair alone
    # a chat format renders the conversation so far before a later turn's question
    out = prepare_lima.prepare(destination_path=tmp_path / "chat", checkpoint_dir=checkpoint_dir,
                               data_file_path=data, test_split_fraction=0.0, max_seq_length=512,
                               include_multiturn_conversations=True, prompt_style="chatml")
    second = next(s for s in load_split(out, "train") if s["output"] == "6")
    chat = ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
            "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert second["input_ids"][:second["prompt_length"]].tolist() == [bos] + tok.encode(
        chat, add_special_tokens=False).ids
    assert (second["labels"][:second["prompt_length"]] == -100).all()
    assert second["labels"][second["prompt_length"]:].tolist() == second["input_ids"][second["prompt_length"]:].tolist()
    bad = write_jsonl(tmp_path / "bad.jsonl", conversations + [{"conversations": ["only a question"]}])
    with pytest.raises(DataPreparationError, match=r"bad.jsonl' row 3 field 'conversations' must be a list"):
        prepare_lima.prepare(destination_path=tmp_path / "bad", checkpoint_dir=checkpoint_dir,
                             data_file_path=bad, max_seq_length=64)


def test_ignore_index_must_not_be_a_token_id(tmp_path, checkpoint_dir):
    """A token id as the mask marker also masks every answer token with that id (the EOS: the model never learns to
    stop)."""
    rows = write_jsonl(tmp_path / "rows.json", ROWS)
    for value in (0, 1, True):
        with pytest.raises(ValueError, match=f"--ignore_index must be a negative integer, not a token id \\(got "
                                             f"{value!r}\\).*use -100"):
            prepare_json.prepare(json_path=rows, destination_path=tmp_path / "d", checkpoint_dir=checkpoint_dir,
                                 max_seq_length=64, ignore_index=value)
    assert not (tmp_path / "d").exists()


def test_prepare_flan_subsets_and_local_file(tmp_path, checkpoint_dir, reference, monkeypatch):
    calls = []

    def fake_hf(repo_id, filename, target, token=None):
        calls.append((repo_id, filename))
        split = filename.split("/")[0]
        write_jsonl(target, [{"inputs": f"{split} question {i}", "targets": f"answer {i}", "task": "t"}
                             for i in range(3)])

    monkeypatch.setattr(prep, "download_hf", fake_hf)
    out = prepare_flan.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                               subsets="arc_easy_10templates,piqa_10templates", max_seq_length=512)
    assert calls == [("Muennighoff/flan", "train/arc_easy_10templates_train.jsonl"),
                     ("Muennighoff/flan", "test/arc_easy_10templates_test.jsonl"),
                     ("Muennighoff/flan", "train/piqa_10templates_train.jsonl"),
                     ("Muennighoff/flan", "test/piqa_10templates_test.jsonl")]
    train, test = load_split(out, "train"), load_split(out, "test")
    assert len(train) == len(test) == 6
    assert all(s["instruction"].startswith("train") for s in train)
    assert all(s["instruction"].startswith("test") for s in test)
    tok, bos, eos = reference
    prompt = [bos] + tok.encode(ALPACA_NO_INPUT.format(instruction=train[0]["instruction"]),
                                add_special_tokens=False).ids
    assert train[0]["input_ids"][: len(prompt)].tolist() == prompt
    with pytest.raises(DataPreparationError, match="unknown FLAN subsets \\['nope'\\]"):
        prepare_flan.prepare(checkpoint_dir=checkpoint_dir, subsets="nope", max_seq_length=64)
    no_download(monkeypatch)
    data = write_jsonl(tmp_path / "flan.jsonl", [{"inputs": f"q{i}", "targets": f"a{i}"} for i in range(10)])
    out = prepare_flan.prepare(destination_path=tmp_path / "local", checkpoint_dir=checkpoint_dir,
                               data_file_path=data, max_seq_length=512)
    assert (len(load_split(out, "train")), len(load_split(out, "test"))) == (9, 1)


def test_prepare_longform(tmp_path, checkpoint_dir, reference, monkeypatch):
    def fake_download(url, target):
        write_json(target, [{"input": f"{target.stem} essay {i}", "output": "text", "source": "s"}
                            for i in range(2)])

    monkeypatch.setattr(prep, "download_url", fake_download)
    out = prepare_longform.prepare(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                                   max_seq_length=512)
    train, test = load_split(out, "train"), load_split(out, "test")
    assert {s["instruction"] for s in train} == {"train essay 0", "train essay 1"}
    assert {s["instruction"] for s in test} == {"val essay 0", "val essay 1"}
    tok, bos, eos = reference
    prompt_text = prompt_style_from_name("longform").apply("train essay 0")
    sample = next(s for s in train if s["instruction"] == "train essay 0")
    assert sample["input_ids"].tolist() == ([bos] + tok.encode(prompt_text, add_special_tokens=False).ids
                                            + tok.encode("text", add_special_tokens=False).ids + [eos])


def test_prepare_csv_and_json(tmp_path, checkpoint_dir, reference, monkeypatch):
    no_download(monkeypatch)
    import csv

    with open(tmp_path / "mine.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "output"])  # no input column at all
        for r in ROWS:
            writer.writerow([r["instruction"], r["output"]])
    out = prepare_csv.prepare(csv_path=tmp_path / "mine.csv", checkpoint_dir=checkpoint_dir, max_seq_length=512)
    assert out == checkpoint_dir / "mine-t512"
    for sample in load_split(out, "train") + load_split(out, "test"):
        row = dict(by_name(sample["instruction"]), input="")
        ids, labels = expected_tokens(reference, row)
        assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == labels
    for name, writer in (("mine.json", write_json), ("mine.jsonl", write_jsonl)):
        out = prepare_json.prepare(json_path=writer(tmp_path / name, ROWS), destination_path=tmp_path / name[:-5],
                                   checkpoint_dir=checkpoint_dir, max_seq_length=512)
        samples = load_split(out, "train") + load_split(out, "test")
        assert len(samples) == len(ROWS)
        for sample in samples:
            ids, labels = expected_tokens(reference, by_name(sample["instruction"]))
            assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == labels


# --------------------------------------------------------------------------------------------- training side


def test_missing_prepared_data_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.pt' does not exist: run scripts/prepare_alpaca.py first"):
        SFTDataset.from_dir(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="run scripts/prepare_alpaca.py first"):
        read_prepare_config(tmp_path)


def test_cut_prepared_data_is_one_sentence_saying_prepare_again(tmp_path):
    """An interrupted copy of a prepared folder: a cut train.pt or prepare_config.yaml, not a torch/yaml traceback."""
    samples = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}] * 4
    torch.save(samples, tmp_path / "train.pt")
    data = (tmp_path / "train.pt").read_bytes()
    (tmp_path / "train.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as e:
        SFTDataset.from_dir(tmp_path, "train")
    assert str(e.value).startswith(f"{str(tmp_path / 'train.pt')!r} could not be read (")
    assert str(e.value).endswith("): it is truncated or was not written by a scripts/prepare_*.py script; prepare "
                                 "the data again.")
    (tmp_path / "prepare_config.yaml").write_text("prompt_style: alpaca\nsplits:\n  train: {rows: 3\n")
    with pytest.raises(ValueError) as e:
        read_prepare_config(tmp_path)
    assert str(e.value) == (f"{str(tmp_path / 'prepare_config.yaml')!r} is not valid YAML (expected ',' or '}}', but "
                            "got '<stream end>' at line 4, column 1); prepare the data again.")


def test_collate_pads_and_truncates():
    batch = [
        {"input_ids": torch.tensor([5, 6, 7, 8]), "labels": torch.tensor([-100, -100, 7, 8])},
        {"input_ids": torch.tensor([9, 10]), "labels": torch.tensor([-100, 10])},
    ]
    out = collate(batch, pad_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 2, 2]]
    assert out["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert out["input_ids"].dtype == out["labels"].dtype == torch.long
    out = collate(batch, pad_id=0, ignore_index=-1, max_seq_length=3)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 10, 0]]
    assert out["labels"].tolist() == [[-100, -100, 7], [-100, 10, -1]]
    out = collate(batch, pad_to_length=6)
    assert out["input_ids"].shape == (2, 6) and out["labels"][1].tolist() == [-100, 10] + [-100] * 4
    with pytest.raises(ValueError, match="shorter than the longest example"):
        collate(batch, pad_to_length=3)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_epoch_order_depends_on_seed_and_epoch_only_and_puts_the_longest_first():
    a = epoch_order(50, seed=7, epoch=3)
    assert a == epoch_order(50, seed=7, epoch=3) and sorted(a) == list(range(50))
    assert a != epoch_order(50, seed=7, epoch=4) and a != epoch_order(50, seed=8, epoch=3)
    assert epoch_order(10, seed=0, epoch=0, shuffle=False) == list(range(10))
    lengths = [int(x) for x in torch.randint(1, 100, (41,), generator=torch.Generator().manual_seed(0))]
    lengths[17] = lengths[30] = 1000
    plain, first = epoch_order(41, 5, 0), epoch_order(41, 5, 0, lengths=lengths)
    longest = min((17, 30), key=plain.index)  # the first of the two in the permutation
    assert first[0] == longest and first[1:] == [i for i in plain if i != longest]
    assert epoch_order(41, 5, 1, lengths=lengths) == epoch_order(41, 5, 1)  # later epochs as drawn


def stream_of(n: int, micro_batch_size: int, world_size: int, micro_steps: int, **kwargs) -> list[list[int]]:
    """The examples of each global micro-step, the ranks' micro-batches one after another (make_dataset's example
    i is made of the token i)."""
    ds = make_dataset(n)
    loaders = [iter(MicroBatchLoader(ds, micro_batch_size, seed=1, rank=r, world_size=world_size, **kwargs))
               for r in range(world_size)]
    return [[e for it in loaders for e in next(it)["input_ids"][:, 0].tolist()] for _ in range(micro_steps)]


@pytest.mark.parametrize("n, micro_batch_size, world_size", [(48, 4, 3), (50, 4, 3), (7, 2, 4), (5, 1, 1), (3, 4, 2)])
def test_the_loader_deals_one_stream_of_whole_epochs_to_the_ranks(n, micro_batch_size, world_size):
    """Every example once per pass, nothing padded or repeated: the passes follow each other, a micro-batch at the end
    of one takes the first examples of the next (before, each epoch was padded with repeats, and `--train.epochs 3`
    saw 40% of the examples only twice)."""
    steps = -(-3 * n // (micro_batch_size * world_size)) + 1
    flat = [e for step in stream_of(n, micro_batch_size, world_size, steps) for e in step]
    expected = [i for epoch in range(len(flat) // n + 1) for i in epoch_order(n, 1, epoch)]
    assert flat == expected[:len(flat)]
    for epoch in range(3):
        assert sorted(flat[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_an_optimizer_step_holds_the_same_examples_for_any_devices_and_micro_batch_size():
    """A global batch of 4 as 1 x 4, 2 x 2, 4 x 1 and 1 x 1 with accumulation: the same examples in every step, so a
    run may resume on another number of processes or micro-batch size and train on what it would have."""
    steps = {}
    for world_size, micro_batch_size in ((1, 4), (2, 2), (4, 1), (1, 1)):
        per_step = 4 // (world_size * micro_batch_size)
        stream = stream_of(11, micro_batch_size, world_size, 6 * per_step, longest_first=True)
        steps[world_size, micro_batch_size] = [sorted(sum(stream[i:i + per_step], []))
                                               for i in range(0, len(stream), per_step)]
    assert len({str(v) for v in steps.values()}) == 1, steps


def test_epochs_are_whole_passes_over_the_data():
    """27 examples, 3 epochs, a global batch of 8: ceil(81 / 8) = 11 steps, every example seen 3 times (the 8 x 11 -
    81 = 7 left are the start of a fourth pass)."""
    from lit_gpt.args import TrainArgs
    from lit_gpt.training import total_steps

    train = TrainArgs(epochs=3, global_batch_size=8, micro_batch_size=8)
    assert total_steps(train, 27) == 11
    flat = [e for step in stream_of(27, 8, 1, 11) for e in step]
    counts = [flat.count(i) for i in range(27)]
    assert min(counts) == 3 and sum(counts) == 88 and flat[81:] == epoch_order(27, 1, 3)[:7]
    assert total_steps(TrainArgs(epochs=2, global_batch_size=4), 28) == 14
    assert total_steps(TrainArgs(epochs=1, epoch_size=10, global_batch_size=4), 28) == 3
    assert total_steps(TrainArgs(max_steps=5, global_batch_size=4), 28) == 5


def make_dataset(n: int) -> SFTDataset:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        length = int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.full((length,), i)
        samples.append({"input_ids": ids, "labels": torch.cat([torch.full((1,), -100), ids[1:]])})
    return SFTDataset(samples)


def test_loader_resumes_with_the_exact_same_batches():
    ds = make_dataset(11)
    kwargs = dict(micro_batch_size=2, seed=3, rank=1, world_size=2, pad_id=0, max_seq_length=6)
    reference = MicroBatchLoader(ds, **kwargs)
    it = iter(reference)
    seen = [next(it) for _ in range(5)]
    state = reference.state_dict()
    assert (state["position"], state["epoch"]) == (20, 1)
    upcoming = [next(it) for _ in range(4)]  # crosses into epoch 2
    resumed = MicroBatchLoader(ds, **kwargs)
    resumed.load_state_dict(state)
    again = [b for _, b in zip(range(4), resumed)]
    for a, b in zip(upcoming, again):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # batch contents are the stream's indices (rank 1 takes the second micro-batch of each global micro-step),
    # collated and cut to max_seq_length
    assert [row[0].item() for row in seen[0]["input_ids"]] == epoch_order(11, 3, 0)[2:4]
    assert max(b["input_ids"].shape[1] for b in seen + upcoming) <= 6
    with pytest.raises(ValueError, match="seed was 3, now 4"):
        MicroBatchLoader(ds, **dict(kwargs, seed=4)).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples was 11, now 12"):
        MicroBatchLoader(make_dataset(12), **kwargs).load_state_dict(state)


# --------------------------------------------------------------------------------------------- the CLIs


@pytest.mark.slow
def test_every_prepare_cli_runs(tmp_path, checkpoint_dir):
    """Each script once as a subprocess from the repo root, without install (no network: local files only)."""
    write_json(tmp_path / "alpaca.json", ROWS)
    write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": r["instruction"], "context": r["input"],
                                            "response": r["output"]} for r in ROWS])
    write_jsonl(tmp_path / "lima.jsonl", [{"conversations": [r["instruction"], r["output"]]} for r in ROWS])
    write_jsonl(tmp_path / "flan.jsonl", [{"inputs": r["instruction"], "targets": r["output"]} for r in ROWS])
    write_json(tmp_path / "longform.json", [{"input": r["instruction"], "output": r["output"]} for r in ROWS])
    write_json(tmp_path / "mine.json", ROWS)
    (tmp_path / "mine.csv").write_text("instruction,input,output\n" + "".join(
        f"\"{r['instruction']}\",\"{r['input']}\",\"{r['output']}\"\n" for r in ROWS), encoding="utf-8")
    commands = {
        "alpaca": ["--data_file_path", tmp_path / "alpaca.json"],
        "dolly": ["--data_file_path", tmp_path / "dolly.jsonl"],
        "lima": ["--data_file_path", tmp_path / "lima.jsonl"],
        "flan": ["--data_file_path", tmp_path / "flan.jsonl"],
        "longform": ["--data_file_path", tmp_path / "longform.json"],
        "csv": ["--csv_path", tmp_path / "mine.csv"],
        "json": ["--json_path", tmp_path / "mine.json"],
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name, args in commands.items():
        dest = tmp_path / f"out_{name}"
        cmd = [sys.executable, f"scripts/prepare_{name}.py", "--checkpoint_dir", checkpoint_dir,
               "--destination_path", dest, "--max_seq_length", "128", *args]
        result = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)
        assert "truncated to max_seq_length=128" in result.stdout
        samples = torch.load(dest / "train.pt", weights_only=True) + torch.load(dest / "test.pt", weights_only=True)
        assert len(samples) == len(ROWS), name
    # a user error prints one line, no traceback
    result = subprocess.run(
        [sys.executable, "scripts/prepare_alpaca.py", "--checkpoint_dir", str(tmp_path / "nowhere"),
         "--max_seq_length", "64", "--data_file_path", str(tmp_path / "alpaca.json")],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --checkpoint_dir ")


# --------------------------------------------------------------------------------------------- audit fixes


def test_a_failed_write_leaves_no_mix_of_two_runs(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    data = write_json(tmp_path / "mine.json", ROWS)
    out = tmp_path / "out"
    prepare_json.prepare(json_path=data, destination_path=out, checkpoint_dir=checkpoint_dir, max_seq_length=512)
    before = {name: (out / name).read_bytes() for name in ("train.pt", "test.pt", "prepare_config.yaml")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # the last file fails: the first two must not have replaced the old ones
    monkeypatch.setattr(prep.yaml, "safe_dump", full_disk)
    with pytest.raises(DataPreparationError, match=r"Could not write the prepared data into --destination_path "
                                                   r".*No space left on device"):
        prepare_json.prepare(json_path=data, destination_path=out, checkpoint_dir=checkpoint_dir,
                             max_seq_length=512, prompt_style="chatml")
    monkeypatch.undo()
    no_download(monkeypatch)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary file left either

    # a rename that fails after train.pt was replaced: train.pt goes, so nothing trains on a mix (as in the audit)
    (out / "test.pt").unlink()
    (out / "test.pt").mkdir()
    with pytest.raises(DataPreparationError, match="Is a directory"):
        prepare_json.prepare(json_path=data, destination_path=out, checkpoint_dir=checkpoint_dir,
                             max_seq_length=512, prompt_style="chatml")
    assert not (out / "train.pt").exists()
    assert read_prepare_config(out)["prompt_style"] == "alpaca"


def test_lima_token_is_masked_by_print_config(checkpoint_dir, capsys):
    from lit_gpt.cli import run_cli

    secret = "hf_SECRETtoken123456"
    with pytest.raises(SystemExit) as e:
        run_cli(prepare_lima.prepare, args=["--access_token", secret, "--checkpoint_dir", str(checkpoint_dir),
                                            "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert secret not in out and "access_token: '**********'" in out
    with pytest.raises(ValueError, match=r"--access_token must be text .* read as a YAML number"):
        prepare_lima.prepare(checkpoint_dir=checkpoint_dir, access_token=12345, max_seq_length=64)


def test_the_script_decides_the_file_format(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    csv_text = "instruction,input,output\n" + "".join(f"q{i},,a{i}\n" for i in range(5))
    (tmp_path / "data.txt").write_text(csv_text)
    out = prepare_csv.prepare(csv_path=tmp_path / "data.txt", destination_path=tmp_path / "o_txt",
                              checkpoint_dir=checkpoint_dir, max_seq_length=64, test_split_fraction=0.0)
    assert sorted(s["instruction"] for s in load_split(out, "train")) == [f"q{i}" for i in range(5)]
    (tmp_path / "data.tsv").write_text(csv_text.replace(",", "\t"))
    with pytest.raises(DataPreparationError) as e:
        prepare_csv.prepare(csv_path=tmp_path / "data.tsv", destination_path=tmp_path / "o_tsv",
                            checkpoint_dir=checkpoint_dir, max_seq_length=64)
    assert str(e.value).startswith(f"{str(tmp_path / 'data.tsv')!r} is not comma-separated (header: "
                                   "'instruction\\tinput\\toutput')")
    (tmp_path / "data.csv").write_text(csv_text)
    with pytest.raises(DataPreparationError, match=r"data.csv' is not valid JSON .* use scripts/prepare_csv.py"):
        prepare_json.prepare(json_path=tmp_path / "data.csv", destination_path=tmp_path / "o_csv",
                             checkpoint_dir=checkpoint_dir, max_seq_length=64)
    # JSON Lines in a .json file is still JSON Lines
    out = prepare_json.prepare(json_path=write_jsonl(tmp_path / "lines.json", ROWS), checkpoint_dir=checkpoint_dir,
                               destination_path=tmp_path / "o_lines", max_seq_length=512)
    assert len(load_split(out, "train")) + len(load_split(out, "test")) == len(ROWS)


def test_csv_column_errors_show_the_header(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    cases = {
        "caps.csv": ("Instruction,Input,Output\nq,,a\n",
                     "has no instruction, output columns: the header has columns Instruction, Input, Output; "
                     "expected instruction, output (input optional)."),
        "other.csv": ("question,answer\nq,a\n",
                      "has no instruction, output columns: the header has columns question, answer; expected "
                      "instruction, output (input optional)."),
        "dup.csv": ("instruction,output,instruction\nq,a,z\n",
                    "names the column instruction more than once; keep one."),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataPreparationError) as e:
            prepare_csv.prepare(csv_path=tmp_path / name, destination_path=tmp_path / "out",
                                checkpoint_dir=checkpoint_dir, max_seq_length=64)
        assert str(e.value).endswith(expected) and str(tmp_path / name) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_no_folder_and_flags_are_checked_before_a_download(tmp_path, checkpoint_dir,
                                                                               monkeypatch):
    no_download(monkeypatch)
    failing = {
        "empty.json": "",
        "broken.json": "[{",
        "missing.json": json.dumps([{"instruction": "q"}]),
    }
    for name, text in failing.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataPreparationError):
            prepare_json.prepare(json_path=tmp_path / name, destination_path=tmp_path / "out" / name,
                                 checkpoint_dir=checkpoint_dir, max_seq_length=64)
    with pytest.raises(DataPreparationError, match="nothing was written"):
        prepare_json.prepare(json_path=write_json(tmp_path / "ok.json", ROWS), destination_path=tmp_path / "out" / "a",
                             checkpoint_dir=checkpoint_dir, max_seq_length=1)
    assert not (tmp_path / "out").exists()
    # no_download: these would fail with an AssertionError if the download came first
    for fraction in (1.0, -0.5, float("nan")):
        for script in (prepare_alpaca, prepare_dolly, prepare_lima):
            with pytest.raises(DataPreparationError, match="--test_split_fraction must be in"):
                script.prepare(destination_path=tmp_path / "d", checkpoint_dir=checkpoint_dir, max_seq_length=64,
                               test_split_fraction=fraction)
    assert not (tmp_path / "d").exists()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(prep, "download_url", offline)
    with pytest.raises(DataPreparationError, match="Could not download"):
        prepare_alpaca.prepare(destination_path=tmp_path / "d", checkpoint_dir=checkpoint_dir, max_seq_length=64)
    assert not (tmp_path / "d").exists()


def test_lima_offline_says_the_hub_is_unreachable(tmp_path, checkpoint_dir, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    def http_error(cls, status):
        return cls("a long paragraph from the Hub", response=SimpleNamespace(status_code=status, headers={},
                                                                             request=None))

    def raising(error):
        def fail(*args, **kwargs):
            raise error
        return fail

    network = (LocalEntryNotFoundError("An error happened ... Please check your connection"),
               OfflineModeIsEnabled("offline"), ConnectionError("[Errno 101] Network is unreachable"))
    for error in network:
        monkeypatch.setattr(prep, "download_hf", raising(error))
        with pytest.raises(DataPreparationError) as e:
            prepare_lima.prepare(destination_path=tmp_path / "l", checkpoint_dir=checkpoint_dir, max_seq_length=64,
                                 access_token="hf_x")
        message = str(e.value)
        assert message.startswith("Could not reach the Hugging Face Hub to download the Hugging Face dataset "
                                  "'GAIR/lima'") and "--data_file_path FILE" in message
        assert "gated" not in message and "check your connection" not in message
    monkeypatch.setattr(prep, "download_hf", raising(http_error(GatedRepoError, 403)))
    with pytest.raises(DataPreparationError) as e:
        prepare_lima.prepare(destination_path=tmp_path / "l", checkpoint_dir=checkpoint_dir, max_seq_length=64,
                             access_token="hf_x")
    assert "(GatedRepoError, HTTP 403). GAIR/lima is gated: accept its terms" in str(e.value)
    assert "with the account your token belongs to" in str(e.value) and "paragraph" not in str(e.value)
    monkeypatch.setattr(prep, "download_hf", raising(http_error(HfHubHTTPError, 503)))
    with pytest.raises(DataPreparationError) as e:
        prepare_lima.prepare(destination_path=tmp_path / "l", checkpoint_dir=checkpoint_dir, max_seq_length=64)
    assert "(HfHubHTTPError, HTTP 503). If you have the file" in str(e.value) and "gated" not in str(e.value)


def test_minor_input_mistakes_are_one_sentence(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    (tmp_path / "latin1.csv").write_bytes("instruction,output\ncaf\xe9,a\n".encode("latin-1"))
    (tmp_path / "latin1.json").write_bytes(json.dumps(ROWS, ensure_ascii=False).replace("Paris", "Par\xeds")
                                           .encode("latin-1"))
    for script, flag, name in ((prepare_csv, "--csv_path", "latin1.csv"), (prepare_json, "--json_path",
                                                                          "latin1.json")):
        with pytest.raises(DataPreparationError) as e:
            script.prepare(**{flag[2:]: tmp_path / name}, destination_path=tmp_path / "out",
                           checkpoint_dir=checkpoint_dir, max_seq_length=64)
        assert str(e.value).startswith(f"{flag} {str(tmp_path / name)!r} is not UTF-8 text (byte 0x")
        assert str(e.value).endswith("save it with UTF-8 encoding and run again.")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"^--destination_path '.*afile' is an existing file; pass a folder"):
        prepare_json.prepare(json_path=write_json(tmp_path / "ok.json", ROWS), destination_path=tmp_path / "afile",
                             checkpoint_dir=checkpoint_dir, max_seq_length=64)
    with pytest.raises(DataPreparationError) as e:
        prepare_json.prepare(json_path=write_json(tmp_path / "one.json", ROWS[0]), destination_path=tmp_path / "o1",
                             checkpoint_dir=checkpoint_dir, max_seq_length=64)
    assert str(e.value) == ("1 row leaves nothing to train on with --test_split_fraction 0.1: pass "
                            "--test_split_fraction 0 to train on all of it.")
    with pytest.raises(DataPreparationError, match=r"^--subsets ',' names no subset; pass comma-separated names"):
        prepare_flan.prepare(checkpoint_dir=checkpoint_dir, subsets=",", max_seq_length=64)


def test_flan_records_the_local_file_not_ignored_subsets(tmp_path, checkpoint_dir, monkeypatch, capsys):
    no_download(monkeypatch)
    data = write_jsonl(tmp_path / "flan.jsonl", [{"inputs": f"q{i}", "targets": f"a{i}"} for i in range(10)])
    out = prepare_flan.prepare(destination_path=tmp_path / "local", checkpoint_dir=checkpoint_dir,
                               subsets="piqa_10templates", data_file_path=data, max_seq_length=512)
    config = read_prepare_config(out)
    assert "subsets" not in config and config["source"] == str(data)
    assert "--subsets is not used with --data_file_path" in capsys.readouterr().err



# --------------------------------------------------------------------------------------------- reading rows (audit 6)


def test_json_lines_end_at_newline_only(tmp_path, checkpoint_dir, monkeypatch):
    """JSON allows U+2028, U+2029 and U+0085 unescaped inside a string (`json.dumps(ensure_ascii=False)`, and
    pandas' and datasets' `force_ascii=False`, write them so); only "\\n" ends a JSON Lines line, as in pandas,
    datasets and Python's own file iteration, so they must not cut a row in two."""
    no_download(monkeypatch)
    rows = [dict(r) for r in ROWS]
    rows[1]["instruction"] = "First paragraph.\u2028Second paragraph."
    rows[3]["input"] = "Wait\u0085 what\u2029"
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == rows  # the reference: Python's file iteration
    assert prep.read_records(path) == rows
    out = prepare_json.prepare(json_path=path, destination_path=tmp_path / "o", checkpoint_dir=checkpoint_dir,
                               max_seq_length=512, test_split_fraction=0.0)
    assert sorted(s["input"] for s in load_split(out, "train")) == sorted(r["input"] for r in rows)
    # and a broken line after them is still named by its number in the file
    path.write_text(path.read_text(encoding="utf-8") + '{"instruction": \n', encoding="utf-8")
    with pytest.raises(DataPreparationError, match=f"line {len(rows) + 1} is not valid JSON"):
        prep.read_records(path)


def test_an_unpaired_surrogate_names_file_row_and_field(tmp_path, checkpoint_dir, monkeypatch):
    """A JSON escape of half an emoji ("\\ud83d") is no character: the file is valid UTF-8, so the message names
    the row and field to fix rather than the file's encoding. A whole pair ("\\ud83d\\ude00") is an emoji."""
    no_download(monkeypatch)
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"instruction": "smile", "output": "\\ud83d\\ude00"}\n'
                    '{"instruction": "Hi \\ud83d there", "output": "ok"}\n', encoding="utf-8")
    with pytest.raises(DataPreparationError) as e:
        prepare_json.prepare(json_path=path, destination_path=tmp_path / "o", checkpoint_dir=checkpoint_dir,
                             max_seq_length=64, test_split_fraction=0.0)
    assert str(e.value) == (f"{str(path)!r} row 2 field 'instruction' holds an unpaired surrogate (\\ud83d at "
                            "character 4, e.g. half of an emoji cut off), which is no character: remove it or "
                            "replace it.")
    path.write_text('{"instruction": "smile", "output": "\\ud83d\\ude00"}\n{"instruction": "b", "output": "c"}\n',
                    encoding="utf-8")
    out = prepare_json.prepare(json_path=path, destination_path=tmp_path / "o", checkpoint_dir=checkpoint_dir,
                               max_seq_length=64, test_split_fraction=0.0)
    assert "\U0001F600" in [s["output"] for s in load_split(out, "train")]


def test_rows_under_a_key_are_refused_saying_where_they_are(tmp_path, checkpoint_dir, monkeypatch):
    """`{"train": [...]}` (as many exports write) is not read as one row lacking 'instruction'."""
    no_download(monkeypatch)
    for name, data, where in (
        ("wrapped.json", {"train": ROWS, "version": "1.0"}, "'train' holds 10 rows"),
        ("both.json", {"train": ROWS[:8], "val": ROWS[8:]}, "'train' holds 8 rows and 'val' holds 2 rows"),
    ):
        path = write_json(tmp_path / name, data)
        with pytest.raises(DataPreparationError) as e:
            prepare_json.prepare(json_path=path, destination_path=tmp_path / "o", checkpoint_dir=checkpoint_dir,
                                 max_seq_length=64)
        assert str(e.value) == (f"{str(path)!r} is an object whose {where}; the file must be the list of rows itself "
                                "(or JSON Lines, one row per line).")
    lima = write_json(tmp_path / "lima.json", {"train": [{"conversations": ["q", "a"]}]})
    with pytest.raises(DataPreparationError, match=r"lima.json' is an object whose 'train' holds 1 row; the file"):
        prepare_lima.prepare(data_file_path=lima, destination_path=tmp_path / "o", checkpoint_dir=checkpoint_dir,
                             max_seq_length=64)
    assert not (tmp_path / "o").exists()


def test_a_csv_with_another_separator_says_to_save_it_with_commas(tmp_path, checkpoint_dir, monkeypatch):
    """Excel writes ";" in most European locales; "|" is the other common one. Both get the sentence tabs get."""
    no_download(monkeypatch)
    for separator in (";", "|"):
        path = tmp_path / "rows.csv"
        path.write_text(separator.join(("instruction", "input", "output")) + "\n" + separator.join("qxa") + "\n")
        with pytest.raises(DataPreparationError) as e:
            prepare_csv.prepare(csv_path=path, destination_path=tmp_path / "o", checkpoint_dir=checkpoint_dir,
                                max_seq_length=64)
        assert str(e.value) == (f"{str(path)!r} is not comma-separated (header: "
                                f"'instruction{separator}input{separator}output'); save it with commas between the "
                                "columns, or as JSON Lines for scripts/prepare_json.py.")


def test_a_tokenizer_without_eos_is_refused_before_any_download(tmp_path, checkpoint_dir, monkeypatch):
    """Every example ends with EOS: a checkpoint whose tokenizer has none stops when the tokenizer loads (no_download:
    before the download), naming the files that would say which it is, with a fix for a CLI user, not `eos=False`."""
    no_download(monkeypatch)
    d = tmp_path / "noeos"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((checkpoint_dir / "tokenizer.json").read_bytes())
    start = f"--checkpoint_dir {str(d)!r} has no EOS token, which ends every training example: "
    cases = [
        ({}, "its tokenizer.json comes without tokenizer_config.json and generation_config.json, which name it "
             "(eos_token, eos_token_id); copy them from the model's repository into it."),
        ({"generation_config.json": {"bos_token_id": 0}},
         "its tokenizer.json comes without tokenizer_config.json, which names it (eos_token); copy it from the model's "
         "repository into it."),
        ({"tokenizer_config.json": {"eos_token": "</nope>"}},
         "its tokenizer_config.json names eos_token '</nope>', which its tokenizer.json does not hold; copy the "
         "tokenizer files from the model's repository again."),
        ({"tokenizer_config.json": {}, "generation_config.json": {}},
         "neither its tokenizer_config.json (eos_token) nor its generation_config.json (eos_token_id) names one; copy "
         "them from the model's repository again."),
    ]
    for files, expected in cases:
        for name in ("tokenizer_config.json", "generation_config.json"):
            (d / name).unlink(missing_ok=True)
        for name, content in files.items():
            (d / name).write_text(json.dumps(content))
        with pytest.raises(DataPreparationError) as e:
            prepare_alpaca.prepare(destination_path=tmp_path / "out", checkpoint_dir=d, max_seq_length=64)
        assert str(e.value) == start + expected
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- own validation file


def instructions(out: Path, split: str) -> list[str]:
    return [s["instruction"] for s in load_split(out, split)]


def write_csv(path: Path, rows) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_an_own_validation_file_is_test_pt_whole(tmp_path, checkpoint_dir, monkeypatch):
    """--val_json_path / --val_csv_path, or a folder holding train.* and val.* (litgpt's JSON data module takes one):
    every validation row goes to test.pt in its order, none to training, and prepare_config.yaml says from where."""
    no_download(monkeypatch)
    train, val = ROWS[:7], ROWS[7:]
    own = tmp_path / "own"
    own.mkdir()
    write_json(own / "train.json", train)
    write_jsonl(own / "val.jsonl", val)
    write_csv(own / "train.csv", train)
    write_csv(own / "val.csv", val)
    runs = [
        (prepare_json, dict(json_path=own), own / "train.json", own / "val.jsonl"),
        (prepare_json, dict(json_path=own / "train.json", val_json_path=own / "val.jsonl"), own / "train.json",
         own / "val.jsonl"),
        (prepare_csv, dict(csv_path=own), own / "train.csv", own / "val.csv"),
        (prepare_csv, dict(csv_path=own / "train.csv", val_csv_path=own / "val.csv"), own / "train.csv",
         own / "val.csv"),
    ]
    for i, (script, flags, source, val_source) in enumerate(runs):
        out = script.prepare(**flags, destination_path=tmp_path / f"out{i}", checkpoint_dir=checkpoint_dir,
                             max_seq_length=512)
        assert sorted(instructions(out, "train")) == sorted(r["instruction"] for r in train)
        assert instructions(out, "test") == [r["instruction"] for r in val]
        config = read_prepare_config(out)
        assert (config["source"], config["val_source"]) == (str(source), str(val_source))
        assert "seed" not in config and "test_split_fraction" not in config
    # a folder names the default destination, as a file does
    assert prepare_json.prepare(json_path=own, checkpoint_dir=checkpoint_dir, max_seq_length=77) == (
        checkpoint_dir / "own-t77")
    # without one, a file is split at random and the split recorded, as before
    out = prepare_json.prepare(json_path=own / "train.json", destination_path=tmp_path / "split",
                               checkpoint_dir=checkpoint_dir, max_seq_length=512)
    config = read_prepare_config(out)
    assert (config["seed"], config["test_split_fraction"], "val_source" in config) == (42, 0.1, False)
    assert len(instructions(out, "test")) == 1


def test_an_own_validation_file_mistakes_are_one_sentence(tmp_path, checkpoint_dir, monkeypatch):
    no_download(monkeypatch)
    d = tmp_path / "d"
    d.mkdir()
    write_json(d / "train.json", ROWS[:7])

    def error(script=prepare_json, **flags) -> str:
        with pytest.raises(DataPreparationError) as e:
            script.prepare(**flags, destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir,
                           max_seq_length=64)
        return str(e.value)

    assert error(json_path=d) == (
        f"--json_path {str(d)!r} is a directory without val.json or val.jsonl: put the training rows in train.json "
        "(or .jsonl) and the validation rows in val.json (or .jsonl) there, or pass the data file itself.")
    assert error(prepare_csv, csv_path=d) == (
        f"--csv_path {str(d)!r} is a directory without train.csv and val.csv: put the training rows in train.csv "
        "and the validation rows in val.csv there, or pass the data file itself.")
    write_jsonl(d / "train.jsonl", ROWS[:7])
    assert error(json_path=d) == (f"--json_path {str(d)!r} holds both train.json and train.jsonl; keep the one that "
                                  "holds the training rows.")
    (d / "train.jsonl").unlink()
    write_json(d / "val.json", ROWS[7:])
    assert error(json_path=d, val_json_path=d / "val.json") == (
        f"--val_json_path {str(d / 'val.json')!r} goes with a data file, not with the folder --json_path {str(d)!r}, "
        f"whose val.json is the validation file: pass --json_path {str(d / 'train.json')!r} with --val_json_path, or "
        "the folder alone.")
    assert error(json_path=d / "train.json", val_json_path=d / "train.json") == (
        f"--val_json_path {str(d / 'train.json')!r} is the --json_path file itself: validation rows must not be "
        "trained on; pass a file of other rows, or leave it out to split the data file at random.")
    assert error(json_path=d / "train.json", val_json_path=d / "nope.json") == (
        f"--val_json_path {str(d / 'nope.json')!r} does not exist.")
    # the split flags would do nothing: said, as litgpt refuses val_split_fraction with a folder
    assert error(json_path=d, test_split_fraction=0.1) == (
        f"--test_split_fraction splits one file at random, but the validation rows come from "
        f"{str(d / 'val.json')!r}, all of which go to test.pt: leave it out.")
    assert error(json_path=d / "train.json", val_json_path=d / "val.json", test_split_fraction=0.2, seed=7) == (
        f"--test_split_fraction and --seed split one file at random, but the validation rows come from "
        f"{str(d / 'val.json')!r}, all of which go to test.pt: leave them out.")
    # what is wrong inside a validation file is named by its own flag, not the training file's
    (d / "empty.json").write_text("")
    assert error(json_path=d / "train.json", val_json_path=d / "empty.json") == (
        f"--val_json_path {str(d / 'empty.json')!r} is empty.")
    write_csv(d / "train.csv", ROWS[:7])
    (d / "bad.csv").write_bytes(b"instruction,input,output\n\xff,x,y\n")
    assert error(prepare_csv, csv_path=d / "train.csv", val_csv_path=d / "bad.csv").startswith(
        f"--val_csv_path {str(d / 'bad.csv')!r} is not UTF-8 text")
    assert not (tmp_path / "out").exists()


def test_flan_and_longform_say_their_own_test_files_leave_the_split_flags_unused(tmp_path, checkpoint_dir,
                                                                                  monkeypatch, capsys):
    no_download(monkeypatch)
    flan, longform = tmp_path / "flan", tmp_path / "longform"
    flan.mkdir()
    longform.mkdir()
    for split, n in (("train", 6), ("test", 2)):
        write_jsonl(flan / f"arc_easy_10templates_{split}.jsonl",
                    [{"inputs": f"{split} q{i}", "targets": f"a{i}"} for i in range(n)])
    for split, n in (("train", 6), ("val", 2)):
        write_json(longform / f"{split}.json", [{"input": f"{split} q{i}", "output": f"a{i}"} for i in range(n)])
    common = dict(checkpoint_dir=checkpoint_dir, max_seq_length=512)
    out = prepare_flan.prepare(destination_path=flan, subsets="arc_easy_10templates", test_split_fraction=0.5,
                               seed=7, **common)
    assert (len(instructions(out, "train")), len(instructions(out, "test"))) == (6, 2)
    assert ("Note: --test_split_fraction and --seed are not used: FLAN's own train and test files are (a split is "
            "made only of a --data_file_path file).\n") in capsys.readouterr().err
    prepare_longform.prepare(destination_path=longform, seed=7, **common)
    assert ("Note: --seed is not used: LongForm's own train.json and val.json are (a split is made only of a "
            "--data_file_path file).\n") in capsys.readouterr().err
    prepare_longform.prepare(destination_path=longform, **common)
    prepare_flan.prepare(destination_path=flan, subsets="arc_easy_10templates", **common)
    assert "Note" not in capsys.readouterr().err
    # with a local file they split it, and say nothing
    out = prepare_longform.prepare(destination_path=tmp_path / "local", data_file_path=longform / "train.json",
                                   test_split_fraction=0.5, seed=7, **common)
    assert (len(instructions(out, "train")), len(instructions(out, "test"))) == (3, 3)
    assert "Note" not in capsys.readouterr().err


def test_a_position_resumes_on_another_number_of_processes_and_older_states_convert():
    """A run checkpointed on 2 processes goes on with the same examples on 1, 3 or 4 (the stream does not depend on
    them); a state written before the stream (epoch and micro-step of padded epochs) resumes at the same place."""
    ds = make_dataset(41)

    def examples(batch):
        return batch["input_ids"][:, 0].tolist()

    loaders = [MicroBatchLoader(ds, 2, seed=3, rank=r, world_size=2, longest_first=True) for r in range(2)]
    two = [iter(loader) for loader in loaders]
    for _ in range(6):  # 3 optimizer steps of a global batch of 8: 2 micro-steps on each rank
        for it in two:
            next(it)
    state = loaders[0].state_dict()
    assert state["position"] == 24 and "world_size" not in state and "micro_batch_size" not in state
    after = [e for _ in range(6) for it in two for e in examples(next(it))]  # the next 3 optimizer steps
    for world_size in (1, 3, 4):
        moved = [MicroBatchLoader(ds, 2, seed=3, rank=r, world_size=world_size, longest_first=True)
                 for r in range(world_size)]
        for loader in moved:
            loader.load_state_dict(state)
        its = [iter(loader) for loader in moved]
        got = [e for _ in range(-(-24 // (2 * world_size))) for it in its for e in examples(next(it))]
        assert got[:24] == after
    old = {"epoch": 2, "step": 3, "seed": 3, "micro_batch_size": 2, "world_size": 2, "num_samples": 41,
           "shuffle": True, "drop_last": False, "longest_first": True}
    loader = MicroBatchLoader(ds, 2, seed=3, longest_first=True)
    loader.load_state_dict(old)
    assert loader.position == 2 * 41 + 12
    loader.load_state_dict(dict(old, step=11))  # the padded end of an epoch: the next one's start
    assert loader.position == 3 * 41
