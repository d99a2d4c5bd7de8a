"""chat/base.py driven through piped standard input: the streamed answer is the greedy `generate` answer on the
same prompt; !quit and end of input exit cleanly; an unmerged adapter answers like its merged checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gpt import GPT, Tokenizer
from lit_gpt.adapters import AdapterConfig
from lit_gpt.data import prompt_style_from_name
from lit_gpt.generate import generate
from lit_gpt.merge import load_finetuned, merge_checkpoint

from test_merge import make_base, make_run

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--temperature", "0", "--max_new_tokens", "12", "--precision", "32-true", "--device", "cpu"]


def chat(*args: str, stdin: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "chat/base.py", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def greedy_answer(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    ids = tokenizer.encode(prompt)
    new = generate(model, ids, max_new_tokens, temperature=0, eos_id=tokenizer.stop_ids, include_prompt=False)
    return tokenizer.decode(new)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = make_base(root / "tiny-llama")
    adapter = make_run(root / "run", base, AdapterConfig(method="etherplus", nb=4, targets=["query", "value", "mlp"]),
                       prompt_style="flan")
    merged = merge_checkpoint(adapter, precision="32-true", log=lambda s: None)
    return base, adapter, merged


@pytest.mark.slow
def test_piped_chat_equals_generate_and_exits_at_eof(tiny):
    base, _, _ = tiny
    # two messages; the second spans two lines through a trailing backslash; then end of input
    r = chat("--checkpoint_dir", str(base), *GREEDY, stdin="Add two and three.\nWrite a\\\nresponse.\n")
    assert r.returncode == 0, r.stderr
    model, tokenizer = GPT.from_checkpoint(base).eval(), Tokenizer(base)
    alpaca = prompt_style_from_name("alpaca")  # no prompt_style.yaml and no chat template: Alpaca
    expected = [greedy_answer(model, tokenizer, alpaca.apply(m)) for m in ("Add two and three.", "Write a\nresponse.")]
    assert r.stdout == "".join(a + "\n" for a in expected)
    assert all(a for a in expected)
    assert r.stderr.count("tokens/s") == 2  # speed after each answer, on stderr only
    assert ">>" not in r.stdout


@pytest.mark.slow
def test_quit_command_exits_cleanly(tiny):
    base, _, _ = tiny
    r = chat("--checkpoint_dir", str(base), *GREEDY, stdin="Add two and three.\n!quit\nnever answered\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stderr.count("tokens/s") == 1
    r = chat("--checkpoint_dir", str(base), *GREEDY, stdin="!exit\n")
    assert r.returncode == 0 and r.stdout == ""


@pytest.mark.slow
def test_unmerged_adapter_answers_like_the_merged_checkpoint(tiny):
    base, adapter, merged = tiny
    messages = "Add two and three.\nWrite a response.\n"
    unmerged = chat("--checkpoint_dir", str(base), "--adapter_path", str(adapter), *GREEDY, stdin=messages)
    from_merged = chat("--checkpoint_dir", str(merged), *GREEDY, stdin=messages)
    assert unmerged.returncode == 0 and from_merged.returncode == 0, unmerged.stderr + from_merged.stderr
    assert unmerged.stdout == from_merged.stdout
    # both prompt with the style the run's data was prepared with (FLAN), not the base's default
    flan = prompt_style_from_name("flan")
    model, tokenizer = load_finetuned(base, adapter), Tokenizer(base)
    expected = [greedy_answer(model, tokenizer, flan.apply(m)) for m in ("Add two and three.", "Write a response.")]
    assert unmerged.stdout == "".join(a + "\n" for a in expected)


@pytest.mark.slow
def test_bad_input_is_one_line(tiny, tmp_path):
    base, _, _ = tiny
    r = chat("--checkpoint_dir", str(tmp_path / "missing"), stdin="")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_help_describes_the_controls_and_the_prompt_format_rule():
    r = chat("--help", stdin="")
    assert r.returncode == 0, r.stderr
    description = " ".join(r.stdout.split("options:")[0].split())  # argparse wraps it
    for text in ("!quit", "!exit", "!reset", "backslash", "Ctrl-D", "prompt_style.yaml", "chat template",
                 "otherwise Alpaca", "tokens/s"):
        assert text in description, text


def test_bad_device_is_one_line():
    r = chat("--checkpoint_dir", "unused", "--device", "foo", stdin="")
    assert r.returncode == 1 and r.stderr.startswith("error: --device 'foo' is not a device"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_read_message_and_conversation_rules(tiny):
    import io

    sys.path.insert(0, str(REPO / "chat"))
    import base as chat_base

    stream = io.StringIO("one\\\ntwo\\\nthree\nfour\nlast\\")
    assert chat_base.read_message(stream, False) == "one\ntwo\nthree"
    assert chat_base.read_message(stream, False) == "four"
    assert chat_base.read_message(stream, False) == "last"
    assert chat_base.read_message(stream, False) is None

    tmp = Path(tiny[0]).parent / "chatty"
    ckpt = make_base(tmp, chat_template=True)
    tok = Tokenizer(ckpt)
    conv = chat_base.Conversation(prompt_style_from_name("chat_template", tokenizer=tok), multi_turn=True)
    conv.add("hi", "hello")
    assert conv.prompt("again") == "<|user|>\nhi</s>\n<|assistant|>\nhello</s>\n<|user|>\nagain</s>\n<|assistant|>\n"
    # dropping the oldest turn when the context is full
    ids = chat_base.encode_prompt(conv, tok, "again", block_size=len(tok.encode(conv.prompt("again"))),
                                  device=torch.device("cpu"))
    assert conv.history == [] and tok.decode(ids).endswith("<|user|>\nagain</s>\n<|assistant|>\n")
    alpaca = chat_base.Conversation(prompt_style_from_name("alpaca"), multi_turn=True)
    alpaca.add("hi", "hello")
    assert alpaca.prompt("x") == prompt_style_from_name("alpaca").apply("x")


@pytest.mark.slow
def test_real_smollm2_chat_template_multi_turn(smollm2_checkpoint):
    """The real SmolLM2-135M-Instruct: its chat template, two turns, each the greedy `generate` answer."""
    first, second = "What is the capital of France?", "And of Italy?"
    r = chat("--checkpoint_dir", str(smollm2_checkpoint), *GREEDY, stdin=f"{first}\n{second}\n", timeout=600)
    assert r.returncode == 0, r.stderr
    model, tokenizer = GPT.from_checkpoint(smollm2_checkpoint).eval(), Tokenizer(smollm2_checkpoint)
    messages = [{"role": "user", "content": first}]
    a1 = greedy_answer(model, tokenizer, tokenizer.apply_chat_template(messages))
    messages += [{"role": "assistant", "content": a1}, {"role": "user", "content": second}]
    a2 = greedy_answer(model, tokenizer, tokenizer.apply_chat_template(messages))
    assert r.stdout == f"{a1}\n{a2}\n"
    assert "Paris" in a1
