"""chat/base.py driven through piped standard input: the streamed answer is the greedy `generate` answer on the
same prompt; !quit and end of input exit cleanly; an unmerged adapter answers like its merged checkpoint."""

import os
import re
import subprocess
import sys
import time
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
    # no --checkpoint_dir: the base model the run recorded
    unmerged = chat("--adapter_path", str(adapter), *GREEDY, stdin=messages)
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


@pytest.mark.slow
def test_piped_refused_messages_keep_one_line_per_message(tiny):
    """Scripts pair answers with messages: a refused one (here not UTF-8, from a Latin-1 file) is answered with an
    empty line and a one-line error, the chat goes on, and the exit status says not all went well."""
    base, _, _ = tiny
    r = subprocess.run([sys.executable, "chat/base.py", "--checkpoint_dir", str(base), *GREEDY],
                       input="Add two and three.\ncaf\xe9 au lait\nWrite a response.\n".encode("latin-1"),
                       capture_output=True, cwd=REPO, timeout=300)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 1, err
    lines = out.split("\n")
    assert len(lines) == 4 and lines[0] and lines[1] == "" and lines[2] and lines[3] == "", out
    assert "error: The message is not valid UTF-8 (byte 0xe9 at character 3" in err and "Traceback" not in err
    assert err.rstrip().endswith("error: 1 of the messages were refused (see above); their answers are empty lines.")
    # an Alpaca model takes no system prompt: said before the model loads, naming the flag
    r = chat("--checkpoint_dir", str(base), "--system_prompt", "Be brief.", *GREEDY, stdin="hi\n")
    assert r.returncode == 1 and r.stderr.startswith("error: --system_prompt cannot be used with the 'alpaca'")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs a pseudo-terminal (Linux)")
def test_a_long_pasted_message_arrives_whole_on_a_terminal(tiny):
    """A terminal's own line buffer cuts a line at 4 KiB; the chat reads through readline, which does not."""
    import pty
    import select

    base, _, _ = tiny
    message = "x " * 3000
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat, on the terminal
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "chat/base.py", "--checkpoint_dir", str(base), *GREEDY])
    out = b""

    def read_until(text: bytes, timeout: float = 120) -> None:
        nonlocal out
        end = time.time() + timeout
        while text not in out[start:] and time.time() < end:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    return
                if not data:
                    return
                out += data

    start = 0
    try:
        read_until(b">> You: ")
        time.sleep(0.5)  # readline takes the terminal over once it waits for input
        for i in range(0, len(message), 512):  # as a paste arrives, its echo read meanwhile
            os.write(fd, message[i:i + 512].encode())
            read_until(b"\0", timeout=0.02)
        start = len(out)
        os.write(fd, b"\r")
        read_until(b"send a shorter one")  # the tiny model's context is shorter than the message
        read_until(b">> You: ", timeout=30)
        os.write(fd, b"\x04")
        deadline = time.time() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.time() > deadline:
                raise AssertionError(f"the chat did not end at Ctrl-D: {out[-500:]!r}")
            read_until(b"\0", timeout=0.1)
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    tokens = len(Tokenizer(base).encode(prompt_style_from_name("alpaca").apply(message)))
    assert f"The message is {tokens} tokens long".encode() in out, out[-300:]


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
    # the oldest exchanges are dropped until a whole answer fits, then the message alone with what room is left
    full = len(tok.encode(conv.prompt("again")))
    alone = len(tok.encode(conv.prompt("again", drop_turns=1)))
    cpu = torch.device("cpu")
    assert chat_base.encode_prompt(conv, tok, "again", full + 3, cpu, max_new_tokens=3)[1] == 0
    assert len(conv.history) == 2
    ids, dropped = chat_base.encode_prompt(conv, tok, "again", full + 3, cpu, max_new_tokens=4)
    assert dropped == 1 and conv.history == [] and len(ids) == alone
    conv.add("hi", "hello")
    ids, dropped = chat_base.encode_prompt(conv, tok, "again", alone + 1, cpu, max_new_tokens=50)
    assert dropped == 1 and tok.decode(ids).endswith("<|user|>\nagain</s>\n<|assistant|>\n")
    with pytest.raises(ValueError, match="the model's context is"):
        chat_base.encode_prompt(conv, tok, "again", alone, cpu)
    # ChatML renders conversations too
    chatml = chat_base.Conversation(prompt_style_from_name("chatml", system_prompt="Be brief."), multi_turn=True)
    chatml.add("hi", "hello")
    assert chatml.prompt("again") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
        "<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_style_from_name("chatml").apply("x") == chat_base.Conversation(
        prompt_style_from_name("chatml"), multi_turn=True).prompt("x")
    alpaca = chat_base.Conversation(prompt_style_from_name("alpaca"), multi_turn=True)
    alpaca.add("hi", "hello")
    assert alpaca.prompt("x") == prompt_style_from_name("alpaca").apply("x")


@pytest.mark.slow
def test_real_smollm2_chat_template_multi_turn(smollm2_checkpoint):
    """The real SmolLM2-135M-Instruct: its chat template, two turns, each the greedy `generate` answer; the second
    turn takes the first one's prompt and answer from the KV cache kept between turns (`PromptCache`)."""
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
    cached = [int(n) for n in re.findall(r"\((\d+) of them cached\)", r.stderr)]
    first_prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:1])).numel()
    assert cached[0] == 0 and cached[1] >= first_prompt + len(tokenizer.encode(a1, bos=False)) - 1, r.stderr


@pytest.mark.parametrize("typed", ["quit", "exit", "  Exit "])
def test_quit_or_exit_typed_alone_on_a_terminal_leaves(typed, monkeypatch):
    """litgpt's chat leaves on `quit` or `exit`; here they went to the model, which answered and kept them in the
    conversation. On a terminal they leave too (piped input sends them as they are)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "chat"))
    import base as chat_base

    typed_lines = iter([typed, "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed_lines))
    model = SimpleNamespace(transformer=SimpleNamespace(wte=SimpleNamespace(weight=torch.zeros(1))),
                            config=SimpleNamespace(block_size=8))
    assert chat_base.chat_loop(model, None, None, None, True, 4, 0.0, None, 1.0) == 0
    assert next(typed_lines) == "never read"
