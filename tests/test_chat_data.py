"""Chat data in `scripts/prepare_json.py`: conversations as `messages` (role/content, the format of OpenAI, Hugging
Face datasets and TRL) or ShareGPT's `conversations` (from/value) become an example per assistant message, whose
prompt is the conversation before it rendered as chat renders it (against ChatML written out here, and against
transformers' own `apply_chat_template` of the real SmolLM2 chat template); a conversation stays on one side of
the train/test split; what a prompt style would drop, and malformed conversations, are refused in one sentence."""

from __future__ import annotations

import json

import pytest
import torch

from lit_gpt.data.prepare import DataPreparationError
from lit_gpt.tokenizer import Tokenizer
from test_data import checkpoint_dir, load_split, no_download, prepare_json, write_jsonl  # noqa: F401

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be terse."},
                  {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
                  {"role": "user", "content": "And 4?"}, {"role": "assistant", "content": "9"}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]},
] + [{"messages": [{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": str(n)},
                   {"role": "user", "content": "Again."}, {"role": "assistant", "content": f"{n} {n}"}]}
     for n in range(8)]


def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


def expected_examples(conversation: list[dict]) -> list[tuple[str, str]]:
    """(prompt text, answer) of each assistant message: ChatML of everything before it."""
    return [(chatml(conversation[:i]), m["content"]) for i, m in enumerate(conversation) if m["role"] == "assistant"]


@pytest.mark.parametrize("layout", ["messages", "sharegpt"])
def test_every_answer_is_an_example_prompted_with_the_conversation_before_it(layout, tmp_path, checkpoint_dir,
                                                                              monkeypatch):  # noqa: F811
    no_download(monkeypatch)
    rows = CONVERSATIONS
    if layout == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        rows = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
                for r in CONVERSATIONS]
    out = prepare_json.prepare(json_path=write_jsonl(tmp_path / "chats.jsonl", rows), destination_path=tmp_path / "d",
                               checkpoint_dir=checkpoint_dir, max_seq_length=512, prompt_style="chatml",
                               test_split_fraction=0.2)
    tokenizer = Tokenizer(checkpoint_dir)
    expected = {}
    for r in CONVERSATIONS:
        for prompt, answer in expected_examples(r["messages"]):
            ids = tokenizer.encode(prompt).tolist()
            expected[prompt] = (ids, ids + tokenizer.encode(answer, bos=False, eos=True).tolist())
    splits = {split: load_split(out, split) for split in ("train", "test")}
    got = {}
    for split, samples in splits.items():
        for sample in samples:
            ids = sample["input_ids"].tolist()
            n = sample["prompt_length"]
            got[tokenizer.decode(torch.tensor(ids[:n]), skip_special_tokens=False)] = (split, ids, n, sample)
    assert len(got) == len(expected) == 2 + 1 + 2 * 8
    for prompt, (prompt_ids, ids) in expected.items():
        split, got_ids, n, sample = next(v for k, v in got.items() if v[1][:v[2]] == prompt_ids)
        assert got_ids == ids and n == len(prompt_ids)
        assert sample["labels"].tolist() == [-100] * n + ids[n:]  # the answer (and EOS) only
    # two of the ten conversations are test rows: their examples (two answers each, here) all went there
    assert len(splits["test"]) in (3, 4) and len(splits["train"]) + len(splits["test"]) == 19
    test_first = {s["instruction"] for s in splits["test"]}
    train_first = {s["instruction"] for s in splits["train"]}
    said = [s for s in test_first if s.startswith("Say ")]
    assert all(f"{s}" not in train_first for s in said)
    config = (out / "prepare_config.yaml").read_text()
    assert "prompt_style: chatml" in config


def test_the_real_chat_template_renders_the_prompts_as_transformers_does(smollm2_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_checkpoint)
    out = prepare_json.prepare(json_path=write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS[:1]),
                               destination_path=tmp_path / "d", checkpoint_dir=smollm2_checkpoint,
                               max_seq_length=512, prompt_style="chat_template", val_json_path=write_jsonl(
                                   tmp_path / "val.jsonl", CONVERSATIONS[1:2]))
    samples = load_split(out, "train")
    conversation = CONVERSATIONS[0]["messages"]
    assert len(samples) == 2
    for sample, end in zip(samples, (2, 4)):
        theirs = hf.apply_chat_template(conversation[:end], add_generation_prompt=True, tokenize=False)
        ours = Tokenizer(smollm2_checkpoint).decode(sample["input_ids"][:sample["prompt_length"]],
                                                    skip_special_tokens=False)
        assert ours == theirs


def test_a_single_turn_chat_file_prepares_in_any_style_and_what_a_style_would_drop_is_refused(
        tmp_path, checkpoint_dir, monkeypatch):  # noqa: F811
    no_download(monkeypatch)
    single = [{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]}
              ] * 3
    out = prepare_json.prepare(json_path=write_jsonl(tmp_path / "one.jsonl", single), destination_path=tmp_path / "a",
                               checkpoint_dir=checkpoint_dir, max_seq_length=512, test_split_fraction=0.34)
    sample = load_split(out, "train")[0]
    assert (sample["instruction"], sample["output"]) == ("Name a colour.", "Blue")  # (Alpaca: instruction, answer)

    path = write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    with pytest.raises(DataPreparationError, match=r"^The data holds multi-turn conversations or system messages, "
                                                   r"which --prompt_style alpaca drops \(it writes one instruction and "
                                                   r"its answer\): pass --prompt_style chat_template \(the checkpoint's "
                                                   r"own chat template\) or chatml\.$"):
        prepare_json.prepare(json_path=path, destination_path=tmp_path / "b", checkpoint_dir=checkpoint_dir,
                             max_seq_length=512)
    with pytest.raises(DataPreparationError, match=r"^The data's conversations have system messages of their own, "
                                                   r"and --system_prompt would add a second one: leave --system_prompt "
                                                   r"out\.$"):
        prepare_json.prepare(json_path=path, destination_path=tmp_path / "c", checkpoint_dir=checkpoint_dir,
                             max_seq_length=512, prompt_style="chatml", system_prompt="Be kind.")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("messages,error", [
    ([{"role": "user", "content": "Hi"}], r"row 1 ends with a user message that has no answer: a conversation ends "
                                          r"with an assistant message, whose text is what the model learns\.$"),
    ([{"role": "assistant", "content": "Hi"}], r"row 1 message 1 is a assistant message where a user message "
                                               r"belongs: a conversation is an optional system message first, then "
                                               r"user and assistant messages in turn\.$"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi?"}],
     r"row 1 message 2 is a user message where an assistant message belongs"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}],
     r"row 1 message 2 has role 'tool'; it must be one of system, user, assistant\.$"),
    ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Yo"}],
     r"row 1 message 1 field 'content' is a list; it must be text\.$"),
    ([{"role": "system", "content": "Be terse."}], r"row 1 has no user and assistant messages, only a system "
                                                   r"message\.$"),
    ([], r"row 1 field 'messages' must be a non-empty list of messages\.$"),
])
def test_a_malformed_conversation_is_one_sentence_naming_the_row_and_message(messages, error, tmp_path,
                                                                            checkpoint_dir, monkeypatch):  # noqa: F811
    no_download(monkeypatch)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}])
    with pytest.raises(DataPreparationError, match=rf"^{str(path)!r} {error}"):
        prepare_json.prepare(json_path=path, destination_path=tmp_path / "d", checkpoint_dir=checkpoint_dir,
                             max_seq_length=512, prompt_style="chatml", test_split_fraction=0)


def test_a_row_without_a_conversation_in_a_chat_file_is_refused(tmp_path, checkpoint_dir, monkeypatch):  # noqa: F811
    no_download(monkeypatch)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([CONVERSATIONS[1], {"instruction": "Hi", "output": "Yo"}]))
    with pytest.raises(DataPreparationError, match=r"row 2 has no 'messages' \(or 'conversations'\) list, which row 1 "
                                                   r"has: every row of a chat data file is a conversation\.$"):
        prepare_json.prepare(json_path=path, destination_path=tmp_path / "d", checkpoint_dir=checkpoint_dir,
                             max_seq_length=512, prompt_style="chatml")
