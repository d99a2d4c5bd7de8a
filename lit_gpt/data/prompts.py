"""Prompt styles: how an (instruction, input) pair becomes the text a model is trained on and prompted with.

The prepare scripts, chat and eval must format prompts identically, or a fine-tuned model is prompted in a format
it never saw. Every style therefore lives here, in a small registry, and a prepared data directory records the
style's name in `prepare_config.yaml` so that training, chat and eval can read it back (`load_prompt_style`).

Templates:

* `alpaca` — Stanford Alpaca's template (Taori et al., 2023, github.com/tatsu-lab/stanford_alpaca), with and without
  an input paragraph, ending in ``### Response:`` as in the lit-gpt scripts the ETHER reference trained with.
* `dolly`, `lima` — the Alpaca format: lit-gpt prepared Dolly (context -> input) and LIMA this way.
* `flan` — Alpaca's no-input template (FLAN rows carry the whole task in one `inputs` string).
* `longform` — lit-gpt's LongForm template: the "paired with an input" header over an instruction-only body.
* `chatml` — ChatML turns (``<|im_start|>role ... <|im_end|>``) for chat models that use them (SmolLM2, Qwen).
* `chat_template` — the checkpoint's own Jinja chat template, rendered by `lit_gpt.tokenizer.Tokenizer` the way
  Hugging Face tokenizers render it (sandboxed Jinja, ``add_generation_prompt=True``).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional, get_args

_ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
_ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


class PromptStyle(abc.ABC):
    """Turns an instruction (and an optional input) into the prompt text; the response follows it directly."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def apply(self, instruction: str, input: str = "") -> str:
        """The prompt text for `instruction` (and its optional `input`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Alpaca(PromptStyle):
    name = "alpaca"

    def apply(self, instruction: str, input: str = "") -> str:
        if input:
            return f"{_ALPACA_HEADER_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        return f"{_ALPACA_HEADER}### Instruction:\n{instruction}\n\n### Response:"


class Dolly(Alpaca):
    name = "dolly"


class LIMA(Alpaca):
    name = "lima"


class FLAN(PromptStyle):
    name = "flan"

    def apply(self, instruction: str, input: str = "") -> str:
        # FLAN has no separate input field; a user-supplied one is kept rather than silently dropped
        body = f"{instruction}\n\n{input}" if input else instruction
        return f"{_ALPACA_HEADER}### Instruction:\n{body}\n\n### Response:"


class LongForm(PromptStyle):
    name = "longform"

    def apply(self, instruction: str, input: str = "") -> str:
        body = f"{instruction}\n\n{input}" if input else instruction
        return f"{_ALPACA_HEADER_INPUT}### Instruction:\n{body}\n\n### Response:"


def user_message(instruction: str, input: str) -> str:
    return f"{instruction}\n\n{input}" if input else instruction


class ChatML(PromptStyle):
    """One user turn in ChatML, ending where the assistant's answer starts; the answer ends with EOS (im_end)."""

    name = "chatml"

    def __init__(self, system_prompt: Optional[str] = None) -> None:
        self.system_prompt = system_prompt

    def apply(self, instruction: str, input: str = "") -> str:
        return self.apply_messages([{"role": "user", "content": user_message(instruction, input)}])

    def apply_messages(self, messages: list[dict]) -> str:
        """A conversation (`[{"role": ..., "content": ...}]`, after the system prompt), ending where the next
        assistant answer starts."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in system + messages)
        return f"{turns}<|im_start|>assistant\n"

    def __repr__(self) -> str:
        return f"ChatML(system_prompt={self.system_prompt!r})"


class ChatTemplate(PromptStyle):
    """The checkpoint's own Jinja chat template (`tokenizer_config.json` or `chat_template.jinja`).

    Rendering is the tokenizer's (`Tokenizer.apply_chat_template`, sandboxed like transformers'), so chat and
    training format messages in one place.
    """

    name = "chat_template"

    def __init__(self, tokenizer: Any, system_prompt: Optional[str] = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            where = getattr(tokenizer, "checkpoint_dir", "the checkpoint")
            raise ValueError(
                f"The tokenizer in {str(where)!r} has no chat template; pass another --prompt_style "
                "(alpaca, chatml, ...)."
            )
        if hasattr(tokenizer, "compile_chat_template"):
            tokenizer.compile_chat_template()  # a template that does not parse stops chat and prepare at their start
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path | str, system_prompt: Optional[str] = None) -> "ChatTemplate":
        from lit_gpt.tokenizer import Tokenizer

        return cls(Tokenizer(checkpoint_dir), system_prompt=system_prompt)

    def apply(self, instruction: str, input: str = "") -> str:
        return self.apply_messages([{"role": "user", "content": user_message(instruction, input)}])

    def apply_messages(self, messages: list[dict]) -> str:
        """A conversation (`[{"role": ..., "content": ...}]`, after the system prompt), ending where the next
        assistant answer starts."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return self.tokenizer.apply_chat_template(system + messages, add_generation_prompt=True)

    def __repr__(self) -> str:
        return f"ChatTemplate({str(getattr(self.tokenizer, 'checkpoint_dir', ''))!r})"


PROMPT_STYLES: dict[str, Callable[..., PromptStyle]] = {
    cls.name: cls for cls in (Alpaca, Dolly, LIMA, FLAN, LongForm, ChatML)
}
PROMPT_STYLE_NAMES = tuple(PROMPT_STYLES) + (ChatTemplate.name,)
# for CLI signatures: jsonargparse lists and checks the choices
PromptStyleName = Literal["alpaca", "dolly", "lima", "flan", "longform", "chatml", "chat_template"]
assert set(get_args(PromptStyleName)) == set(PROMPT_STYLE_NAMES)


def prompt_style_from_name(name: str, checkpoint_dir: Optional[Path | str] = None,
                           system_prompt: Optional[str] = None, tokenizer: Any = None) -> PromptStyle:
    """Build a registered style; `chat_template` needs the `tokenizer` or the `checkpoint_dir` holding it."""
    if name == ChatTemplate.name:
        if tokenizer is not None:
            return ChatTemplate(tokenizer, system_prompt=system_prompt)
        if checkpoint_dir is None:
            raise ValueError("The `chat_template` prompt style needs the checkpoint directory holding the template.")
        return ChatTemplate.from_checkpoint(checkpoint_dir, system_prompt=system_prompt)
    if name not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {name!r}; choose one of {', '.join(PROMPT_STYLE_NAMES)}.")
    if name == ChatML.name:
        return ChatML(system_prompt=system_prompt)
    if system_prompt:
        raise ValueError(f"--system_prompt cannot be used with the {name!r} prompt style, which has a fixed header: "
                         "leave it out, or pick --prompt_style chatml or chat_template.")
    return PROMPT_STYLES[name]()
