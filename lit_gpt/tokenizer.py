"""One tokenizer class over Hugging Face `tokenizers` (`tokenizer.json`) and SentencePiece (`tokenizer.model`).

Which ids are BOS/EOS and whether prompts start with BOS are read from the checkpoint's `tokenizer_config.json` and
`generation_config.json`, the way transformers and litgpt read them, so a checkpoint converted from the Hugging Face
hub or imported from a GGUF file behaves like the original model. Special tokens are added by this class, never by
the backend's post-processor, so `encode(text, bos=False)` means exactly that whatever the backend.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _token_content(token: Any) -> Optional[str]:
    # tokenizer_config.json spells a special token either as a string or as an AddedToken dict
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_json(path: Path) -> dict:
    from lit_gpt.utils import read_json_object

    if not path.is_file():
        return {}
    return read_json_object(path, "fix or delete the file")


def _unloadable(path: Path, library: str, error: BaseException) -> ValueError:
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    detail = detail.replace(". at line", " at line")  # tokenizers: "Model missing. at line 1 column 17"
    return ValueError(
        f"{str(path)!r} could not be loaded by the {library} library ({detail}); copy the tokenizer files from the "
        "original model again."
    )


class ChatTemplateError(ValueError):
    """The checkpoint's chat template refused a conversation (its own `raise_exception` message)."""


def check_utf8(text: str, what: str = "The text") -> None:
    """Refuse text holding bytes that are not UTF-8: Python reads them from argv, stdin or a file opened with
    `errors="surrogateescape"` as lone surrogates (U+DC80-U+DCFF), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        byte = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"character U+{ord(char):04X}"
        raise ValueError(
            f"{what} is not valid UTF-8 ({byte} at character {e.start}, e.g. from a file or terminal in Latin-1): "
            "convert it to UTF-8."
        ) from None


class Tokenizer:
    """The tokenizer of a checkpoint folder: `tokenizer.json` (Hugging Face `tokenizers`) or `tokenizer.model`
    (SentencePiece), with `tokenizer_config.json` and `generation_config.json` for the special tokens, whether
    prompts start with BOS, the stop tokens (`stop_ids`) and the chat template (`apply_chat_template`)."""

    def __init__(self, checkpoint_dir: Union[Path, str]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if checkpoint_dir.is_file():
            from lit_gpt.utils import not_a_directory_error

            raise not_a_directory_error(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            from lit_gpt.utils import missing_checkpoint_dir_error

            raise missing_checkpoint_dir_error(checkpoint_dir)
        self.checkpoint_dir = checkpoint_dir
        config = _read_json(checkpoint_dir / "tokenizer_config.json")
        generation_config = _read_json(checkpoint_dir / "generation_config.json")

        if (checkpoint_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            path = checkpoint_dir / "tokenizer.json"
            try:
                self.processor = HFTokenizer.from_file(str(path))
            except Exception as e:  # the library raises a bare Exception ("EOF while parsing", "Model missing.")
                raise _unloadable(path, "tokenizers", e) from None
            self._special_pattern = None
        elif (checkpoint_dir / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            self.backend = "sentencepiece"
            path = checkpoint_dir / "tokenizer.model"
            try:
                self.processor = SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, ValueError) as e:  # "could not parse ModelProto", "unk is not defined."
                raise _unloadable(path, "sentencepiece", e) from None
            self._special_pattern = self._sentencepiece_special_pattern(config)
        else:
            from lit_gpt.utils import finetuning_run_hint

            run = finetuning_run_hint(checkpoint_dir)
            if run is not None:
                raise ValueError(f"{run}.")
            raise FileNotFoundError(
                f"{str(checkpoint_dir)!r} has no tokenizer: looked for {' and '.join(TOKENIZER_FILES)}. Copy the "
                "tokenizer files of the model into it (scripts/download.py and scripts/convert_gguf_checkpoint.py "
                "write them)."
            )

        self.special_tokens: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(config.get(name))
            if content is not None:
                self.special_tokens[name] = content

        self.bos_id = self._id_or_none(self.special_tokens.get("bos_token"))
        self.eos_id = self._id_or_none(self.special_tokens.get("eos_token"))
        if self.bos_id is None:
            self.bos_id = generation_config.get("bos_token_id")
        generation_eos = generation_config.get("eos_token_id")
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        if self.eos_id is None and generation_eos:
            self.eos_id = generation_eos[0]
        if self.backend == "sentencepiece":
            # SentencePiece returns -1 for a piece the model was trained without
            if self.bos_id is None and self.processor.bos_id() >= 0:
                self.bos_id = self.processor.bos_id()
            if self.eos_id is None and self.processor.eos_id() >= 0:
                self.eos_id = self.processor.eos_id()
        # chat models end a turn with a token other than the pretraining EOS; generation stops on either
        self.stop_ids: list[int] = []
        for i in [self.eos_id, *generation_eos]:
            if i is not None and i not in self.stop_ids:
                self.stop_ids.append(i)

        self.use_bos = self._uses_bos(config)
        self.chat_template, self.chat_template_file = self._read_chat_template(checkpoint_dir, config)
        self._compiled_template = None

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        if self.backend == "huggingface":
            return self.processor.get_vocab_size(with_added_tokens=True)
        return self.processor.get_piece_size()

    def token_to_id(self, token: str) -> int:
        """The id of `token` (a whole vocabulary entry, e.g. "<|im_end|>"); a `ValueError` when it has none."""
        id_ = self._id_or_none(token)
        if id_ is None:
            raise ValueError(
                f"Token {token!r} is not in the vocabulary of the tokenizer in {str(self.checkpoint_dir)!r}."
            )
        return id_

    def _id_or_none(self, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        if self.backend == "huggingface":
            return self.processor.token_to_id(token)
        id_ = self.processor.piece_to_id(token)
        # piece_to_id maps every unknown piece to the unk id
        return id_ if self.processor.id_to_piece(id_) == token else None

    def _uses_bos(self, config: dict) -> bool:
        if "add_bos_token" in config:
            return bool(config["add_bos_token"]) and self.bos_id is not None
        if self.bos_id is None:
            return False
        if self.backend == "huggingface":
            # without the flag the tokenizer's own post-processor is what transformers would follow
            with_special = self.processor.encode("a", add_special_tokens=True).ids
            return bool(with_special) and with_special[0] == self.bos_id
        # SentencePiece models (Llama-1/2, Mistral-v0.1) are trained with a BOS on every sequence
        return True

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self,
        text: str,
        bos: Optional[bool] = None,
        eos: bool = False,
        max_length: int = -1,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """Token ids of `text` (1-D `torch.long`); `bos=None` adds BOS when the model's prompts start with it."""
        if not text.isascii():
            check_utf8(text)
        if self.backend == "huggingface":
            tokens = self.processor.encode(text, add_special_tokens=False).ids
        else:
            tokens = self._sentencepiece_encode(text)
        if bos is None:
            bos = self.use_bos
        if bos:
            if self.bos_id is None:
                raise ValueError(f"The tokenizer in {str(self.checkpoint_dir)!r} has no BOS token; pass bos=False.")
            # a chat template may already have written the BOS token into the text
            if not tokens or tokens[0] != self.bos_id:
                tokens = [self.bos_id] + tokens
        if eos:
            if self.eos_id is None:
                raise ValueError(f"The tokenizer in {str(self.checkpoint_dir)!r} has no EOS token; pass eos=False.")
            tokens = tokens + [self.eos_id]
        if max_length > 0:
            tokens = tokens[:max_length]
        return torch.tensor(tokens, dtype=torch.long, device=device)

    def decode(self, ids: Union[torch.Tensor, Iterable[int]], skip_special_tokens: bool = False) -> str:
        """The text of token `ids` (a tensor of any shape, or ints); `skip_special_tokens` leaves out control
        tokens such as BOS/EOS."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        else:
            ids = [int(i) for i in ids]
        if self.backend == "huggingface":
            return self.processor.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if not self.processor.is_control(i)]
        return self.processor.decode(ids)

    def decode_stream(self, ids: Iterable[Union[int, torch.Tensor]]) -> Iterator[str]:
        """Text pieces as token ids arrive, for streaming output.

        A token may be half of a UTF-8 character, and SentencePiece drops a word's leading space when it is decoded
        alone; so each step decodes the new tokens together with the previous ones and emits only the text that is
        complete (the scheme text-generation servers use).
        """
        tokens: list[int] = []
        prefix_offset = read_offset = 0
        for token in ids:
            tokens.append(int(token))
            prefix_text = self.decode(tokens[prefix_offset:read_offset])
            new_text = self.decode(tokens[prefix_offset:])
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                yield new_text[len(prefix_text):]
                prefix_offset, read_offset = read_offset, len(tokens)
        if read_offset < len(tokens):
            prefix_text = self.decode(tokens[prefix_offset:read_offset])
            new_text = self.decode(tokens[prefix_offset:])
            if len(new_text) > len(prefix_text):
                yield new_text[len(prefix_text):]

    # ------------------------------------------------------------------ SentencePiece special tokens
    def _sentencepiece_special_pattern(self, config: dict) -> Optional[re.Pattern]:
        # SentencePiece reads "<s>" in text as characters; transformers matches special tokens first. Control
        # pieces and the special tokens named in tokenizer_config.json are matched here, longest first.
        sp = self.processor
        specials = {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)}
        for value in config.get("added_tokens_decoder", {}).values():
            content = _token_content(value)
            if content:
                specials.add(content)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(config.get(name))
            if content:
                specials.add(content)
        # a name that is not a piece of this model cannot encode as one id; leave it to SentencePiece
        specials = sorted((s for s in specials if self._id_or_none(s) is not None), key=len, reverse=True)
        if not specials:
            return None
        return re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    def _sentencepiece_encode(self, text: str) -> list[int]:
        if self._special_pattern is None:
            return self.processor.encode(text)
        tokens: list[int] = []
        for i, part in enumerate(self._special_pattern.split(text)):
            if i % 2:
                tokens.append(self.processor.piece_to_id(part))
            elif part:
                tokens.extend(self.processor.encode(part))
        return tokens

    # ------------------------------------------------------------------ chat template
    @staticmethod
    def _read_chat_template(checkpoint_dir: Path, config: dict) -> tuple[Optional[str], Path]:
        """The template and the file it comes from."""
        # as transformers: a separate chat_template.jinja takes priority over tokenizer_config.json's entry (Hub
        # repos that moved their template to the file often keep an older one in the config)
        path = checkpoint_dir / "chat_template.jinja"
        if path.is_file():
            from lit_gpt.utils import read_text_file

            return read_text_file(path, "copy the tokenizer files from the original model again"), path
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template, checkpoint_dir / "tokenizer_config.json"

    def compile_chat_template(self):
        """The compiled Jinja template (compiled once); a template that does not parse is a ValueError naming its
        file."""
        if self._compiled_template is None:
            try:
                self._compiled_template = _compile_template(self.chat_template)
            except ValueError as e:
                raise ValueError(f"{str(self.chat_template_file)!r}: {e}") from None
        return self._compiled_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the checkpoint's Jinja chat template.

        The environment matches the one transformers renders templates in (sandboxed, `trim_blocks`,
        `lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII characters), so the
        text equals what the model was trained on. Extra keyword arguments become template variables.
        `continue_final_message`: the text ends with the last message's content, its turn left open for the model
        to go on (as transformers' option of that name: an answer prefix to continue, e.g. lm-eval's `gen_prefix`).
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message continues the last message, and add_generation_prompt opens a "
                             "new one: pass add_generation_prompt=False with it.")
        if self.chat_template is None:
            raise ValueError(
                f"The tokenizer in {str(self.checkpoint_dir)!r} has no chat template (no `chat_template` in "
                "tokenizer_config.json and no chat_template.jinja); format the prompt yourself."
            )
        template = self.compile_chat_template()
        variables = dict(self.special_tokens)
        variables.update(kwargs)
        import jinja2

        try:
            text = template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.exceptions.TemplateError as e:
            # templates raise on bad conversations ("roles must alternate"); the message is the template's own
            raise ChatTemplateError(
                f"The chat template in {str(self.checkpoint_dir)!r} rejected the messages: {e}") from None
        return _end_at_final_message(text, messages) if continue_final_message else text


def _end_at_final_message(text: str, messages: list[dict]) -> str:
    """`text` cut right after the last message's content (kept with its trailing whitespace when the template kept
    it; templates that strip contents get the stripped end)."""
    content = messages[-1].get("content") if messages else None
    core = content.strip() if isinstance(content, str) else ""
    at = text.rfind(core) if core else -1
    if at < 0:
        raise ValueError("continue_final_message needs the last message's text in the rendered conversation, and "
                         "the chat template did not write it (or it is empty).")
    end = at + len(core)
    trailing = content[len(content.rstrip()):]
    if text[end:end + len(trailing)] == trailing:
        end += len(trailing)
    return text[:end]


def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
               sort_keys: bool = False) -> str:
        # jinja2's own tojson escapes HTML characters, which would change the prompt text
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}…{% endgeneration %}` marks assistant text for transformers' loss masks; it renders as
        # its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    # templates are data from the checkpoint: the sandbox keeps them from reaching Python internals
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlock]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse as Jinja ({e.message}, line {e.lineno}); fix the "
                         "template, or copy the tokenizer files from the original model again.") from None
