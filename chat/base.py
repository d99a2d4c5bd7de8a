"""Chat with a lit checkpoint (merged, or base + adapter), streaming the answer as it is generated."""

import sys
import time
from pathlib import Path
from typing import Iterator, Literal, Optional, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lit_gpt.cli import run_cli, silence_stdout  # noqa: E402
from lit_gpt.data.prompts import PromptStyle, PromptStyleName, prompt_style_from_name  # noqa: E402
from lit_gpt.generate import PromptCache, check_sampling, generate_stream  # noqa: E402
from lit_gpt.merge import PRECISIONS, checkpoint_dir_for, load_finetuned, resolve_prompt_style  # noqa: E402
from lit_gpt.quantize import check_kind  # noqa: E402
from lit_gpt.tokenizer import Tokenizer, check_utf8  # noqa: E402
from lit_gpt.utils import check_checkpoint_dir, resolve_device  # noqa: E402

QUIT_COMMANDS = ("!quit", "!exit")
RESET_COMMAND = "!reset"
CONTINUATION = "\\"
RUN_CONFIG_FIX = ("chat with the run's adapter unmerged, --checkpoint_dir {base} --adapter_path {adapter}, or with "
                  "its merged checkpoint (scripts/merge_ether.py or merge_lora.py write {merged}) as --checkpoint_dir")


def read_message(stream: TextIO, interactive: bool) -> Optional[str]:
    """The next user message, or None at end of input. A line ending in a backslash continues on the next line
    (the backslash becomes a newline), so pasted multi-line text can be sent as one message."""
    lines: list[str] = []
    while True:
        if interactive:
            try:
                line = input(">> You: " if not lines else ".. ")
            except EOFError:
                return "\n".join(lines) if lines else None
        else:
            line = stream.readline()
            if not line:
                return "\n".join(lines) if lines else None
            line = line.rstrip("\n").rstrip("\r")
        if line.endswith(CONTINUATION):
            lines.append(line[: -len(CONTINUATION)])
            continue
        lines.append(line)
        return "\n".join(lines)


class Conversation:
    """Turns into prompt text: the whole history (multi-turn) for the styles that render conversations (the chat
    template, ChatML), or one message through a fixed-format style such as Alpaca (single-turn: those models were
    trained on single exchanges)."""

    def __init__(self, style: PromptStyle, multi_turn: bool) -> None:
        self.style = style
        self.multi_turn = multi_turn and hasattr(style, "apply_messages")
        self.history: list[dict] = []

    def prompt(self, message: str, drop_turns: int = 0) -> str:
        if not self.multi_turn:
            return self.style.apply(message)
        return self.style.apply_messages(self.history[2 * drop_turns:] + [{"role": "user", "content": message}])

    def add(self, message: str, answer: str) -> None:
        if self.multi_turn:
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.history = []


def encode_prompt(conversation: Conversation, tokenizer: Tokenizer, message: str, block_size: int,
                  device: torch.device, max_new_tokens: int = 1) -> tuple[torch.Tensor, int]:
    """Token ids of the prompt, and how many of the oldest exchanges were dropped (forgotten) to leave room for a
    whole answer of `max_new_tokens`; the message alone, with less room, when even that does not leave it."""
    turns = len(conversation.history) // 2
    for drop in range(turns + 1):
        ids = tokenizer.encode(conversation.prompt(message, drop_turns=drop), device=device)
        if ids.numel() + max_new_tokens <= block_size or (drop == turns and ids.numel() < block_size):
            if drop:
                conversation.history = conversation.history[2 * drop:]
            return ids, drop
    raise ValueError(
        f"The message is {ids.numel()} tokens long with its prompt format; the model's context is {block_size} "
        "tokens: send a shorter one."
    )


def main(
    checkpoint_dir: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    max_new_tokens: int = 512,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    precision: Optional[Literal["bf16-true", "16-true", "32-true"]] = None,
    device: Optional[str] = None,
    prompt_style: Optional[PromptStyleName] = None,
    system_prompt: Optional[str] = None,
    multi_turn: bool = True,
    seed: int = 1234,
    quantize: Optional[str] = None,
) -> None:
    """Chat with a model, streaming each answer as it is generated.

    Controls: end a line with a backslash (\\) to continue the message on the next line; !quit, !exit, Ctrl-D (end
    of input) or Ctrl-C ends the chat; !reset forgets the conversation so far.

    Prompt format, unless --prompt_style is given: with --adapter_path, the prompt style the run trained with (from
    its hyperparameters.yaml, from the adapter file itself when it is alone, or from the prompt_style.yaml in a
    PEFT adapter folder); else the checkpoint's prompt_style.yaml (written by merge_ether.py and merge_lora.py: the
    format the run was trained with, e.g. Alpaca); otherwise the checkpoint's chat template if its tokenizer has one
    (multi-turn); otherwise Alpaca. An adapter whose format is unknown gets a warning naming the one used.

    With piped standard input only the answers are printed to stdout, one per message. Speed (tokens/s, time to
    first token) goes to stderr after each answer, with how many prompt tokens came from the KV cache, which stays
    from one answer to the next: a turn computes what it adds to the conversation, not all of it again.

    Args:
        checkpoint_dir: A lit checkpoint: a merged one (scripts/merge_ether.py, merge_lora.py) or the base model
            (default with --adapter_path: the base model its run recorded).
        adapter_path: An adapter file (lit_model_*_finetuned.pth, or a .safetensors one `save_adapters` wrote)
            applied to --checkpoint_dir without merging, a Hugging Face PEFT adapter folder (imported in memory for
            --checkpoint_dir, which it needs), or a full fine-tuning state dict (lit_model_finetuned.pth).
        max_new_tokens: Stop each answer after this many tokens (fewer when the context ends first).
        temperature: Sampling temperature; 0 always picks the most likely token (greedy).
        top_k: Sample among the k most likely tokens only (null: all).
        top_p: Sample from the smallest set of tokens whose probability adds up to top_p (1.0: all).
        precision: Weight dtype: bf16-true, 16-true or 32-true; default bf16-true on a GPU that supports it, else
            32-true.
        device: "cpu", "cuda", "cuda:1", ...; default the first GPU if there is one.
        prompt_style: Force a prompt format (alpaca, chatml, chat_template, ...) instead of the rule above.
        system_prompt: A system message (chat template and chatml styles only).
        multi_turn: Keep the conversation with the chat template and chatml styles (when the context cannot hold
            it and a whole answer, the oldest exchanges are forgotten, with a note on stderr); fixed-format styles
            such as Alpaca are always single-turn.
        seed: Random seed for sampling.
        quantize: `nf4` (QLoRA's 4-bit NormalFloat, 0.56 bytes per weight), `nf4-dq` (with QLoRA's double
            quantization, 0.52) or `int8` (1 byte): keep the linear weights of the transformer blocks,
            adapted ones too, in that format (`lit_gpt/quantize.py`), for a model that would not fit on the
            device otherwise; each weight is decoded at every forward pass, so tokens come slower.
    """
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {max_new_tokens}.")
    check_sampling(temperature, top_k, top_p, flag_prefix="--")
    check_kind(quantize)
    torch_device = resolve_device(device)
    if precision is None:
        precision = "bf16-true" if torch_device.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    dtype = PRECISIONS[precision]

    checkpoint_dir = checkpoint_dir_for(checkpoint_dir, adapter_path)
    check_checkpoint_dir(checkpoint_dir)  # before the tokenizer, whose error would blame a "tokenizer directory"
    tokenizer = Tokenizer(checkpoint_dir)
    # the prompt format before the model: its mistakes (a --system_prompt Alpaca cannot take) need no weights
    if prompt_style is not None:
        style = prompt_style_from_name(prompt_style, checkpoint_dir, system_prompt=system_prompt, tokenizer=tokenizer)
    else:
        style = resolve_prompt_style(checkpoint_dir, adapter_path, tokenizer=tokenizer)
        if system_prompt is not None:
            style = prompt_style_from_name(
                getattr(style, "name"), checkpoint_dir, system_prompt=system_prompt, tokenizer=tokenizer
            )
    model = load_finetuned(checkpoint_dir, adapter_path, device=torch_device, dtype=dtype, quantize=quantize)
    conversation = Conversation(style, multi_turn)
    generator = torch.Generator(device=torch_device).manual_seed(seed)

    # a byte that is not UTF-8 (a Latin-1 file or terminal) reaches the tokenizer, which refuses that message in one
    # line, rather than ending the chat in a decoding error
    sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            # line editing and history; it also reads a pasted message whole, which the terminal's own line buffer
            # would cut at 4 KiB
            import readline  # noqa: F401
        except ImportError:  # not on Windows
            pass
        print(f"Chatting with {checkpoint_dir}{f' + {adapter_path}' if adapter_path else ''} "
              f"({getattr(style, 'name', type(style).__name__)} prompts). End a line with \\ to continue it; "
              f"{', '.join(QUIT_COMMANDS)} or Ctrl-D to leave, {RESET_COMMAND} to forget the conversation.",
              file=sys.stderr)

    try:
        refused = chat_loop(model, tokenizer, conversation, generator, interactive, max_new_tokens, temperature,
                            top_k, top_p)
    except KeyboardInterrupt:  # Ctrl-C leaves like !quit, without a traceback
        print(file=sys.stderr)
        return
    except BrokenPipeError:  # `| head` closed stdout: the reader has what it wanted
        silence_stdout()
        return
    if refused and not interactive:
        raise SystemExit(f"error: {refused} of the messages were refused (see above); their answers are empty lines.")


def chat_loop(model, tokenizer: Tokenizer, conversation: Conversation, generator: torch.Generator,
              interactive: bool, max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float) -> int:
    """Answer messages until the input ends or the user quits; returns how many messages were refused (each
    answered with an empty line when the input is piped, so that answers stay one line per message)."""
    device = model.transformer.wte.weight.device
    block_size = model.config.block_size
    refused = 0
    # the conversation's KV cache stays from one answer to the next: a turn prefills what it adds, not it all again
    cache = PromptCache(model)
    while True:
        message = read_message(sys.stdin, interactive)
        if message is None or message.strip() in QUIT_COMMANDS:
            return refused
        if interactive and message.strip().lower() in ("quit", "exit"):  # litgpt's words, typed alone in a terminal
            return refused
        if message.strip() == RESET_COMMAND:
            conversation.reset()
            cache.reset()
            continue
        if not message.strip():
            continue
        try:
            check_utf8(message, "The message")
            ids, dropped = encode_prompt(conversation, tokenizer, message, block_size, device, max_new_tokens)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            refused += 1
            if not interactive:
                print(flush=True)
            continue
        if dropped:
            print(f"[the context is full: the {dropped} oldest exchange{'s' if dropped > 1 else ''} "
                  f"forgotten; {RESET_COMMAND} forgets them all]", file=sys.stderr)

        count, first_token_at = 0, None
        start = time.perf_counter()

        def counted(tokens: Iterator[int]) -> Iterator[int]:
            nonlocal count, first_token_at
            for token in tokens:
                if first_token_at is None:
                    first_token_at = time.perf_counter() - start
                count += 1
                yield token

        stream = generate_stream(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos_id=tokenizer.stop_ids, generator=generator, prompt_cache=cache)
        if interactive:
            print(">> Model: ", end="", flush=True)
        pieces = []
        for piece in tokenizer.decode_stream(counted(stream)):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        elapsed = time.perf_counter() - start
        conversation.add(message, "".join(pieces))
        ttft = f"{first_token_at:.2f} s" if first_token_at is not None else "-"
        cut = ("; stopped at the end of the model's context" if count < max_new_tokens
               and ids.numel() + count >= block_size else "")
        print(f"[{count} tokens in {elapsed:.2f} s: {count / max(elapsed, 1e-9):.2f} tokens/s, first token after "
              f"{ttft}, prompt {ids.numel()} tokens ({cache.reused} of them cached){cut}]", file=sys.stderr,
              flush=True)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(main, run_config_fix=RUN_CONFIG_FIX)
