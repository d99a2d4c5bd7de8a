"""Turn instruction data (instruction / input / output rows) into tokenized `train.pt` and `test.pt` files.

Every `scripts/prepare_*.py` is a thin CLI over these helpers: find or download the raw file, read and check its
rows, split them, tokenize with the checkpoint's tokenizer and write the result. A prepared directory holds

* `train.pt`, `test.pt`: lists of ``{"input_ids", "labels", "prompt_length", "instruction", "input", "output"}``;
  the two tensors are 1-D int64 of equal length, loadable with ``torch.load(weights_only=True)``; `prompt_length`
  counts the prompt's tokens (masked in `labels` or not: `--mask_inputs false`);
* `prepare_config.yaml`: what it was prepared with (prompt style, tokenizer directory, max_seq_length, ...), which
  training, chat and eval read back instead of guessing.

Tokenization. The prompt (BOS per the tokenizer's default) and the response (EOS appended) are encoded separately
and concatenated. At inference the prompt is encoded alone and the model continues it, so training on exactly
those prompt tokens matches what the model will see, and the masked positions are exactly the prompt's tokens
(encoding ``prompt + response`` as one string can merge tokens across the boundary). `labels` equals `input_ids`
with the prompt positions set to `ignore_index` when `mask_inputs`; the loss shifts them by one position.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import yaml

from lit_gpt.data.prompts import PromptStyle, prompt_style_from_name, user_message
from lit_gpt.utils import (atomic_path, atomic_paths, check_output_dir, error_chain, hub_unreachable,
                           hub_unreachable_sentence)

TRAIN_FILENAME = "train.pt"
TEST_FILENAME = "test.pt"
PREPARE_CONFIG_FILENAME = "prepare_config.yaml"


class DataPreparationError(ValueError):
    """A user-facing problem with the data or the flags; the message is one sentence that says how to fix it."""


# ----------------------------------------------------------------------------------------------------------------
# where the raw data comes from


def download_url(url: str, target: Path) -> None:
    """Fetch `url` into `target`; a failed download leaves nothing behind."""
    with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)


def download_hf(repo_id: str, filename: str, target: Path, token: Optional[str] = None) -> None:
    """Fetch one file of a Hugging Face dataset repository into `target` (through the hub's local cache)."""
    from huggingface_hub import hf_hub_download

    cached = hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", token=token)
    with atomic_path(target) as tmp:
        shutil.copyfile(cached, tmp)


@dataclass
class Source:
    """Where a raw data file is downloaded from: a plain URL, or a file in a Hugging Face dataset repository."""

    url: Optional[str] = None
    hf_repo_id: Optional[str] = None
    hf_filename: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)
    hint: str = ""  # extra advice when the download fails (e.g. a gated repository)

    def describe(self) -> str:
        if self.url:
            return self.url
        return f"the Hugging Face dataset {self.hf_repo_id!r} (file {self.hf_filename!r})"

    def fetch(self, target: Path) -> None:
        # module-level lookups so that tests can replace the downloaders
        module = sys.modules[__name__]
        if self.url:
            module.download_url(self.url, target)
        else:
            module.download_hf(self.hf_repo_id, self.hf_filename, target, token=self.token)


def check_input_file(path: Path | str, flag: str) -> Path:
    """`path` must be an existing file: a directory or a missing path is one sentence naming `flag`."""
    path = Path(path)
    if path.is_dir():
        raise DataPreparationError(f"{flag} {str(path)!r} is a directory: pass the data file itself.")
    if not path.is_file():
        raise DataPreparationError(f"{flag} {str(path)!r} does not exist.")
    return path


def train_and_val_files(
    path: Path | str, flag: str, val_path: Optional[Path | str], val_flag: str, suffixes: Sequence[str]
) -> tuple[Path, Optional[Path]]:
    """The training file and the validation file (None: split the training file) of `flag` and `val_flag`.

    `flag` names a data file, or a folder holding `train<suffix>` and `val<suffix>` (litgpt's JSON data module takes
    such a folder); `val_flag`, a validation file beside a data file. Every row of the validation file goes to
    `test.pt`, none to training."""
    path = Path(path)
    if path.is_dir():
        if val_path is not None:
            raise DataPreparationError(
                f"{val_flag} {str(val_path)!r} goes with a data file, not with the folder {flag} {str(path)!r}, whose "
                f"val{suffixes[0]} is the validation file: pass {flag} {str(path / ('train' + suffixes[0]))!r} with "
                f"{val_flag}, or the folder alone."
            )
        found = {}
        for split in ("train", "val"):
            files = [path / f"{split}{suffix}" for suffix in suffixes if (path / f"{split}{suffix}").is_file()]
            if len(files) > 1:
                raise DataPreparationError(
                    f"{flag} {str(path)!r} holds both {' and '.join(f.name for f in files)}; keep the one that "
                    f"holds the {'training' if split == 'train' else 'validation'} rows."
                )
            found[split] = files[0] if files else None
        missing = [" or ".join(f"{split}{suffix}" for suffix in suffixes) for split, f in found.items() if f is None]
        if missing:
            also = "".join(f" (or {suffix})" for suffix in suffixes[1:])
            raise DataPreparationError(
                f"{flag} {str(path)!r} is a directory without {' and '.join(missing)}: put the training rows in "
                f"train{suffixes[0]}{also} and the validation rows in val{suffixes[0]}{also} there, or pass the data "
                "file itself."
            )
        return found["train"], found["val"]
    path = check_input_file(path, flag)
    if val_path is None:
        return path, None
    val_path = check_input_file(val_path, val_flag)
    if val_path.resolve() == path.resolve():
        raise DataPreparationError(
            f"{val_flag} {str(val_path)!r} is the {flag} file itself: validation rows must not be trained on; pass "
            "a file of other rows, or leave it out to split the data file at random."
        )
    return path, val_path


def _given_split_flags(test_split_fraction: Optional[float], seed: Optional[int]) -> list[str]:
    """The split flags given (not None: their defaults are None until a split uses them)."""
    return [flag for flag, value in (("--test_split_fraction", test_split_fraction), ("--seed", seed))
            if value is not None]


def check_no_split_flags(test_split_fraction: Optional[float], seed: Optional[int], val_path: Path) -> None:
    """A validation file of one's own is used whole: a split fraction or seed given with it would do nothing."""
    given = _given_split_flags(test_split_fraction, seed)
    if given:
        them = "them" if len(given) > 1 else "it"
        raise DataPreparationError(
            f"{' and '.join(given)} split{'' if len(given) > 1 else 's'} one file at random, but the validation "
            f"rows come from {str(val_path)!r}, all of which go to test.pt: leave {them} out."
        )


def note_unused_split_flags(test_split_fraction: Optional[float], seed: Optional[int], why: str) -> None:
    """A dataset's own test files are used: say so if a split fraction or seed was given, rather than drop it."""
    given = _given_split_flags(test_split_fraction, seed)
    if given:
        print(f"Note: {' and '.join(given)} {'are' if len(given) > 1 else 'is'} not used: {why}.", file=sys.stderr)


def local_data_file(data_file_path: Path | str) -> Path:
    data_file_path = check_input_file(data_file_path, "--data_file_path")
    print(f"Using the local data file {str(data_file_path)!r}.")
    return data_file_path


def fetch_data_file(
    destination_path: Path, data_file_name: str, source: Source, data_file_path: Optional[Path] = None
) -> Path:
    """The raw data file: `--data_file_path` if given, else a copy already in the destination, else a download."""
    if data_file_path is not None:
        return local_data_file(data_file_path)
    target = Path(destination_path) / data_file_name
    if target.is_file() and target.stat().st_size > 0:
        print(f"Using the data file already at {str(target)!r}.")
        return target
    print(f"Downloading {source.describe()} to {str(target)!r} ...")
    new_folder = not target.parent.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.fetch(target)
    except Exception as e:  # network, HTTP, hub and file errors all mean the same thing to the user
        if new_folder and target.parent.is_dir() and not any(target.parent.iterdir()):
            target.parent.rmdir()  # a failed run leaves no empty destination behind
        if source.hf_repo_id and hub_unreachable(e):
            # no gating advice (nothing was asked of the Hub) and not the Hub's long text about its local cache
            raise DataPreparationError(
                f"{hub_unreachable_sentence(source.describe())}, or pass the file with --data_file_path FILE (or put "
                f"it at {str(target)!r}) and run again."
            ) from None
        detail, hint = f"{type(e).__name__}: {e}", f" {source.hint}" if source.hint else ""
        answer = _hub_answer(e) if source.hf_repo_id else None
        if answer is not None:
            detail, refused = answer
            hint = hint if refused else ""  # gating advice only where the Hub refused access, not for an HTTP 5xx
        raise DataPreparationError(
            f"Could not download {source.describe()} ({detail}).{hint} If you have the file, pass "
            f"it with --data_file_path FILE (or put it at {str(target)!r}) and run again."
        ) from e
    return target


def _hub_answer(error: BaseException) -> Optional[tuple[str, bool]]:
    """For a Hub call the Hub answered with an error: its short description (not the Hub's paragraph) and whether
    it refused access (401/403, or the gated/not-found answer a gated repo gives without a token); else None."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    answer = next((e for e in error_chain(error) if isinstance(e, HfHubHTTPError)), None)
    if answer is None:
        return None
    status = getattr(getattr(answer, "response", None), "status_code", None)
    refused = status in (401, 403) or isinstance(answer, (GatedRepoError, RepositoryNotFoundError))
    return f"{type(answer).__name__}, HTTP {status}", refused


# ----------------------------------------------------------------------------------------------------------------
# reading and checking rows


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, flag, e) from None


def _not_utf8(path: Path, flag: str, error: UnicodeDecodeError) -> DataPreparationError:
    return DataPreparationError(
        f"{flag} {str(path)!r} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at position {error.start}): "
        "save it with UTF-8 encoding and run again."
    )


def read_records(path: Path | str, flag: str = "The data file") -> list[dict]:
    """Rows of a JSON array or a JSON Lines file (a `.jsonl` suffix, or several values one per line), whatever the
    file is called: the script decides the format, so a CSV file gets an error rather than a guess."""
    path = Path(path)
    if not path.is_file():
        raise DataPreparationError(f"{flag} {str(path)!r} does not exist.")
    text = _read_text(path, flag)
    if not text.strip():
        raise DataPreparationError(f"{flag} {str(path)!r} is empty.")
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value means JSON Lines
                csv_hint = " (for a CSV file use scripts/prepare_csv.py --csv_path)" if path.suffix.lower() in (
                    ".csv", ".tsv") else ""
                raise DataPreparationError(
                    f"{str(path)!r} is not valid JSON (line {e.lineno}: {e.msg}); expected a list of objects or "
                    f"JSON Lines (one object per line){csv_hint}."
                ) from None
        else:
            if isinstance(data, dict):  # a single object is one row of JSON Lines
                return [data]
            if not isinstance(data, list):
                raise DataPreparationError(
                    f"{str(path)!r} holds a JSON {type(data).__name__}; expected a list of objects with "
                    "instruction/input/output keys."
                )
            return data
    rows = []
    # lines end at "\n" (a "\r" before it is whitespace to JSON), as JSON Lines says: str.splitlines() would also
    # cut at U+2028, U+2029 and U+0085, which JSON allows unescaped inside a string
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataPreparationError(
                f"{str(path)!r} line {line_number} is not valid JSON ({e.msg}); JSON Lines needs one object per line."
            ) from None
    return rows


def read_csv_records(
    path: Path | str, required: Sequence[str], optional: Sequence[str] = (), flag: str = "--csv_path"
) -> list[dict]:
    """Rows of a comma-separated file with a header line, whatever the file is called; the header must name the
    `required` columns (and may name the `optional` ones), each once."""
    path = Path(path)
    expected = f"expected {', '.join(required)}" + (f" ({', '.join(optional)} optional)" if optional else "")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise DataPreparationError(
                    f"The CSV file {str(path)!r} is empty; it needs a header line naming {', '.join(required)}"
                    f"{''.join(',' + c for c in optional)}."
                )
            if len(header) == 1 and any(sep in header[0] for sep in "\t;|"):  # Excel in most of Europe writes ";"
                raise DataPreparationError(
                    f"{str(path)!r} is not comma-separated (header: {header[0]!r}); save it with commas between the "
                    "columns, or as JSON Lines for scripts/prepare_json.py."
                )
            duplicated = sorted({c for c in header if header.count(c) > 1})
            if duplicated:  # DictReader would keep the last such column without a word
                raise DataPreparationError(
                    f"The header of {str(path)!r} names the column {', '.join(duplicated)} more than once; keep one."
                )
            missing = [c for c in required if c not in header]
            if missing:
                raise DataPreparationError(
                    f"{str(path)!r} has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}: the header "
                    f"has columns {', '.join(header)}; {expected}."
                )
            rows = []
            for row in reader:
                if None in row:  # more cells than header columns
                    raise DataPreparationError(
                        f"{str(path)!r} row {len(rows) + 1} has more cells than the header has columns "
                        f"({', '.join(header)}); quote cells that contain commas."
                    )
                rows.append(row)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, flag, e) from None
    return rows


def check_not_wrapped(record: Any, path: Path | str) -> None:
    """A file that is one object holding the rows under a key (`{"train": [...]}`, as many exports write) would
    be read as a single row: say where the rows are instead of that row's missing fields."""
    if not isinstance(record, dict):
        return
    lists = {k: len(v) for k, v in record.items()
             if isinstance(v, list) and v and all(isinstance(item, dict) for item in v)}
    if lists:
        where = " and ".join(f"{k!r} holds {n} row{'s' if n != 1 else ''}" for k, n in lists.items())
        raise DataPreparationError(
            f"{str(path)!r} is an object whose {where}; the file must be the list of rows itself (or JSON Lines, "
            "one row per line)."
        )


def check_no_surrogate(text: str, what: str) -> None:
    """Refuse an unpaired surrogate (a JSON escape such as "\\ud83d": half of an emoji, cut off by whatever wrote
    the data), which is no character: no tokenizer encodes it, and the file's encoding is not to blame."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataPreparationError(
            f"{what} holds an unpaired surrogate ({text[e.start].encode('unicode_escape').decode()} at character "
            f"{e.start + 1}, e.g. half of an emoji cut off), which is no character: remove it or replace it."
        ) from None


def check_rows(
    rows: Sequence[Any], path: Path | str, required: Sequence[str], optional: Sequence[str] = (),
    rename: Optional[dict[str, str]] = None,
) -> list[dict[str, str]]:
    """Keep the `required` and `optional` text fields of every row, renamed with `rename`.

    A row that is not an object, lacks a required field, or holds a non-text value or an unpaired surrogate stops
    preparation with one sentence naming the file, the row (counting from 1) and the field. A missing optional field
    becomes "". A file of one object that holds the rows under a key is refused as such (`check_not_wrapped`).
    """
    rename = rename or {}
    checked = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataPreparationError(
                f"{str(path)!r} row {number} is a {type(row).__name__}, not an object with the fields "
                f"{', '.join(required)}."
            )
        out = {}
        for key in (*required, *optional):
            value = row.get(key)
            if value is None:
                if key in required:
                    if len(rows) == 1:
                        check_not_wrapped(row, path)
                    raise DataPreparationError(
                        f"{str(path)!r} row {number} has no {key!r} field (every row needs "
                        f"{' and '.join(repr(k) for k in required)})."
                    )
                value = ""
            if not isinstance(value, str):
                raise DataPreparationError(
                    f"{str(path)!r} row {number} field {key!r} is a {type(value).__name__}; it must be text."
                )
            if not value.isascii():
                check_no_surrogate(value, f"{str(path)!r} row {number} field {key!r}")
            out[rename.get(key, key)] = value
        checked.append(out)
    if not checked:
        raise DataPreparationError(f"{str(path)!r} has no rows.")
    return checked


# chat data: the OpenAI / Hugging Face / TRL `messages` format, and ShareGPT's `conversations`
_CHAT_FIELDS = {"messages": ("role", "content"), "conversations": ("from", "value")}
_CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def is_chat_data(records: Sequence[Any]) -> bool:
    """Whether a data file's records are conversations (`messages` or `conversations`) rather than
    instruction/output rows: decided by its first record."""
    return bool(records) and isinstance(records[0], dict) and any(key in records[0] for key in _CHAT_FIELDS)


def chat_rows(records: Sequence[Any], path: Path | str) -> list[dict]:
    """The conversations of a chat data file, each `{"turns": [...]}` with a row per assistant message: its user
    message as the instruction, its text as the output, the messages before it as `history` and the conversation's
    system message as `system`. A conversation stays whole when rows are split into train and test.

    Each record holds `messages` (`{"role", "content"}`: system, user, assistant) or `conversations` (ShareGPT's
    `{"from", "value"}`: system, human, gpt): an optional system message, then user and assistant messages in turn,
    ending with an assistant's. Anything else stops preparation with one sentence naming the file, row and message."""
    out = []
    for number, record in enumerate(records, start=1):
        where = f"{str(path)!r} row {number}"
        field = next((k for k in _CHAT_FIELDS if isinstance(record, dict) and k in record), None)
        if field is None:
            raise DataPreparationError(
                f"{where} has no 'messages' (or 'conversations') list, which row 1 has: every row of a chat data "
                "file is a conversation.")
        role_key, text_key = _CHAT_FIELDS[field]
        messages = record[field]
        if not isinstance(messages, list) or not messages:
            raise DataPreparationError(f"{where} field {field!r} must be a non-empty list of messages.")
        system, turns, history = None, [], []
        for i, message in enumerate(messages, start=1):
            at = f"{where} message {i}"
            if not isinstance(message, dict):
                raise DataPreparationError(f"{at} is a {type(message).__name__}, not an object with {role_key!r} "
                                           f"and {text_key!r}.")
            role = _CHAT_ROLES.get(message.get(role_key)) if isinstance(message.get(role_key), str) else None
            if role is None:
                known = "system, user, assistant" if field == "messages" else "system, human, gpt"
                raise DataPreparationError(f"{at} has {role_key} {message.get(role_key)!r}; it must be one of "
                                           f"{known}.")
            text = message.get(text_key)
            if not isinstance(text, str):
                raise DataPreparationError(f"{at} field {text_key!r} is a {type(text).__name__}; it must be text.")
            if not text.isascii():
                check_no_surrogate(text, at)
            expected = "user" if len(history) % 2 == 0 else "assistant"
            if role == "system" and i == 1:
                system = text
                continue
            if role != expected:
                raise DataPreparationError(
                    f"{at} is a {role} message where a{'n' if expected == 'assistant' else ''} {expected} message "
                    f"belongs: a conversation is an optional system message first, then user and assistant "
                    f"messages in turn.")
            if role == "assistant":
                turn = {"instruction": history[-1]["content"], "input": "", "output": text,
                        "history": list(history[:-1]), "conversation": True}
                if system is not None:
                    turn["system"] = system
                turns.append(turn)
            history.append({"role": role, "content": text})
        if not history:
            raise DataPreparationError(f"{where} has no user and assistant messages, only a system message.")
        if len(history) % 2:
            raise DataPreparationError(f"{where} ends with a user message that has no answer: a conversation ends "
                                       "with an assistant message, whose text is what the model learns.")
        out.append({"turns": turns})
    if not out:
        raise DataPreparationError(f"{str(path)!r} has no rows.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# splitting, tokenizing, writing


DEFAULT_TEST_SPLIT_FRACTION = 0.1
DEFAULT_SEED = 42


def check_test_split_fraction(test_split_fraction: Optional[float]) -> None:
    if test_split_fraction is None:
        return
    if not 0.0 <= test_split_fraction < 1.0:
        raise DataPreparationError(f"--test_split_fraction must be in [0, 1), got {test_split_fraction}.")


def split_rows(rows: Sequence[dict], test_split_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A random train/test split that depends only on (len(rows), test_split_fraction, seed).

    The test set has ``floor(n * fraction)`` rows (at least one when the fraction is positive), drawn with
    `torch.utils.data.random_split` as lit-gpt did, so the same seed selects the same test rows as lit-gpt's
    prepare scripts (Alpaca with the default 0.03865 gets exactly 2,000 test rows).
    """
    check_test_split_fraction(test_split_fraction)
    n = len(rows)
    n_test = int(n * test_split_fraction)
    if test_split_fraction > 0 and n_test == 0:
        n_test = 1
    if n - n_test < 1:
        raise DataPreparationError(
            f"{n} row{'s leave' if n != 1 else ' leaves'} nothing to train on with --test_split_fraction "
            f"{test_split_fraction}: pass --test_split_fraction 0 to train on all of {'them' if n != 1 else 'it'}."
        )
    # the permutation `random_split` draws, taken directly: random_split warns of an empty split whenever
    # --test_split_fraction is 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[:n - n_test]], [rows[i] for i in order[n - n_test:]]


def resolve_max_seq_length(checkpoint_dir: Path, max_seq_length: Optional[int]) -> int:
    """`max_seq_length` if given, else the model's context length from the checkpoint's `model_config.yaml`."""
    from lit_gpt.config import CONFIG_FILENAME, Config

    if max_seq_length is not None:
        if max_seq_length < 1:
            raise DataPreparationError(f"--max_seq_length must be positive, got {max_seq_length}.")
        if (Path(checkpoint_dir) / CONFIG_FILENAME).is_file():
            block_size = Config.from_checkpoint(checkpoint_dir).block_size
            if max_seq_length > block_size:
                print(f"Note: --max_seq_length {max_seq_length} is longer than the model's context of {block_size} "
                      f"tokens; training cuts every example to {block_size} tokens, and --max_seq_length {block_size} "
                      "writes just what training will use.", file=sys.stderr)
        return max_seq_length
    if not (Path(checkpoint_dir) / CONFIG_FILENAME).is_file():
        raise DataPreparationError(
            f"Pass --max_seq_length: without it the model's context length is read from "
            f"{str(Path(checkpoint_dir) / CONFIG_FILENAME)!r}, which does not exist."
        )
    return Config.from_checkpoint(checkpoint_dir).block_size


def default_destination(checkpoint_dir: Path, dataset: str, max_seq_length: int) -> Path:
    """`<checkpoint_dir>/<dataset>-t<max_seq_length>`, the directory the ETHER recipes train from."""
    return Path(checkpoint_dir) / f"{dataset}-t{max_seq_length}"


def load_tokenizer(checkpoint_dir: Path) -> Any:
    from lit_gpt.tokenizer import Tokenizer

    return Tokenizer(checkpoint_dir)


def check_eos(tokenizer: Any, checkpoint_dir: Path) -> None:
    """Every example ends with the EOS token (the model learns to stop): a checkpoint whose tokenizer has none is
    refused when the tokenizer loads, before any download, naming the files that would have said which it is."""
    if getattr(tokenizer, "eos_id", 0) is not None:
        return
    from lit_gpt.tokenizer import TOKENIZER_FILES

    checkpoint_dir = Path(checkpoint_dir)
    vocabulary = next((name for name in TOKENIZER_FILES if (checkpoint_dir / name).is_file()), "tokenizer file")
    keys = {"tokenizer_config.json": "eos_token", "generation_config.json": "eos_token_id"}
    missing = [name for name in keys if not (checkpoint_dir / name).is_file()]
    named = getattr(tokenizer, "special_tokens", {}).get("eos_token")
    if named is not None:  # named, but not in the vocabulary
        why = f"its tokenizer_config.json names eos_token {named!r}, which its {vocabulary} does not hold"
        fix = "copy the tokenizer files from the model's repository again"
    elif missing:
        why = (f"its {vocabulary} comes without {' and '.join(missing)}, which name{'s' if len(missing) == 1 else ''}"
               f" it ({', '.join(keys[name] for name in missing)})")
        fix = f"copy {'it' if len(missing) == 1 else 'them'} from the model's repository into it"
    else:
        why = "neither its tokenizer_config.json (eos_token) nor its generation_config.json (eos_token_id) names one"
        fix = "copy them from the model's repository again"
    raise DataPreparationError(
        f"--checkpoint_dir {str(checkpoint_dir)!r} has no EOS token, which ends every training example: {why}; {fix}."
    )


def tokenizer_fingerprint(tokenizer: Any) -> Optional[str]:
    """A short hash of the tokenizer's vocabulary (every token and its id), recorded in `prepare_config.yaml` so that
    training can refuse data tokenized for another model; None for a tokenizer this does not know how to read."""
    processor, backend = getattr(tokenizer, "processor", None), getattr(tokenizer, "backend", None)
    if backend == "huggingface":
        items = sorted(processor.get_vocab(with_added_tokens=True).items(), key=lambda kv: (kv[1], kv[0]))
    elif backend == "sentencepiece":
        items = [(processor.id_to_piece(i), i) for i in range(processor.get_piece_size())]
    else:
        return None
    digest = hashlib.sha256()
    for token, i in items:
        digest.update(f"{i}\t{token}\n".encode("utf-8", "surrogatepass"))
    return f"sha256:{digest.hexdigest()[:16]}"


def encode_example(
    prompt: str, response: str, tokenizer: Any, max_seq_length: int, mask_inputs: bool = True,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Token ids and labels for one example, the prompt length, and whether it was cut to `max_seq_length`."""
    prompt_ids = tokenizer.encode(prompt).long()
    response_ids = tokenizer.encode(response, bos=False, eos=True).long()
    input_ids = torch.cat((prompt_ids, response_ids))
    labels = input_ids.clone()
    if mask_inputs:
        labels[: len(prompt_ids)] = ignore_index
    truncated = len(input_ids) > max_seq_length
    return input_ids[:max_seq_length].clone(), labels[:max_seq_length].clone(), len(prompt_ids), truncated


@dataclass
class SplitStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0  # the prompt alone filled max_seq_length: no response token left to learn from
    longest: int = 0
    shortest_dropped_prompt: int = 0  # tokens in the shortest prompt of a dropped row (0: none dropped)


def prompt_text(prompt_style: PromptStyle, row: dict) -> str:
    """A row's prompt; a multi-turn row's earlier turns (`history`), after its conversation's `system` message,
    come first where the style renders conversations (`apply_messages`: chatml, chat_template)."""
    history, system = row.get("history"), row.get("system")
    if (history or system) and hasattr(prompt_style, "apply_messages"):
        return prompt_style.apply_messages(
            ([{"role": "system", "content": system}] if system else []) + list(history or [])
            + [{"role": "user", "content": user_message(row["instruction"], row.get("input", ""))}])
    return prompt_style.apply(row["instruction"], row.get("input", ""))


def check_chat_rows(rows: Sequence[dict], prompt_style: PromptStyle, style_name: str) -> None:
    """Rows of a chat data file (`chat_rows`) whose earlier turns or system message the prompt style would drop
    (it renders one instruction), or whose system message `--system_prompt` would duplicate, are refused."""
    chat = [r for r in rows if r.get("conversation")]
    if any(r.get("history") or r.get("system") for r in chat) and not hasattr(prompt_style, "apply_messages"):
        raise DataPreparationError(
            f"The data holds multi-turn conversations or system messages, which --prompt_style {style_name} drops "
            "(it writes one instruction and its answer): pass --prompt_style chat_template (the checkpoint's own "
            "chat template) or chatml.")
    if any(r.get("system") for r in chat) and getattr(prompt_style, "system_prompt", None):
        raise DataPreparationError(
            "The data's conversations have system messages of their own, and --system_prompt would add a second "
            "one: leave --system_prompt out.")


def tokenize_rows(
    rows: Iterable[dict], tokenizer: Any, prompt_style: PromptStyle, max_seq_length: int, mask_inputs: bool,
    ignore_index: int, desc: str = "",
) -> tuple[list[dict], SplitStats]:
    from tqdm import tqdm

    rows = list(rows)
    samples, stats = [], SplitStats(rows=len(rows))
    for row in tqdm(rows, desc=desc, disable=None, mininterval=2.0):
        prompt = prompt_text(prompt_style, row)
        input_ids, labels, prompt_length, truncated = encode_example(
            prompt, row["output"], tokenizer, max_seq_length, mask_inputs, ignore_index
        )
        stats.truncated += truncated
        # a row without one response token left trains nothing, and a batch of only such rows has a NaN loss
        if mask_inputs and bool((labels == ignore_index).all()):
            stats.dropped += 1
            stats.shortest_dropped_prompt = min(stats.shortest_dropped_prompt or prompt_length, prompt_length)
            continue
        stats.longest = max(stats.longest, len(input_ids))
        samples.append({"input_ids": input_ids, "labels": labels, "prompt_length": min(prompt_length, len(input_ids)),
                        "instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]})
    stats.kept = len(samples)
    return samples, stats


def write_prepared(
    destination_path: Path, train_rows: Sequence[dict], test_rows: Sequence[dict], *, dataset: str,
    checkpoint_dir: Path, max_seq_length: int, prompt_style: str = "alpaca", system_prompt: Optional[str] = None,
    mask_inputs: bool = True, ignore_index: int = -100, tokenizer: Any = None, extra: Optional[dict] = None,
) -> dict:
    """Tokenize both splits and write `train.pt`, `test.pt` and `prepare_config.yaml`; returns the config."""
    destination_path = Path(destination_path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint_dir)
    style = prompt_style_from_name(prompt_style, checkpoint_dir=checkpoint_dir, system_prompt=system_prompt,
                                   tokenizer=tokenizer)
    stats, samples = {}, {}
    # a conversation (`chat_rows`) is a row per assistant message
    splits = {split: [turn for row in rows for turn in row.get("turns", [row])]
              for split, rows in (("train", train_rows), ("test", test_rows))}
    for rows in splits.values():
        check_chat_rows(rows, style, prompt_style)
    for split, rows in splits.items():
        samples[split], stats[split] = tokenize_rows(rows, tokenizer, style, max_seq_length, mask_inputs,
                                                     ignore_index, desc=f"{dataset} {split}")
    # nothing is written unless there is something to train on: a failed run leaves the directory as it was
    train_stats = stats["train"]
    if train_stats.kept == 0:
        raise DataPreparationError(
            f"All {train_stats.rows:,} training rows were dropped because their prompt alone fills --max_seq_length "
            f"{max_seq_length} (the shortest such prompt has {train_stats.shortest_dropped_prompt} tokens), leaving "
            f"no response token to learn from: raise --max_seq_length above {train_stats.shortest_dropped_prompt}; "
            f"nothing was written to {str(destination_path)!r}."
        )
    config = {
        "dataset": dataset,
        "prompt_style": prompt_style,
        "system_prompt": system_prompt,
        "checkpoint_dir": str(checkpoint_dir),
        "max_seq_length": max_seq_length,
        "mask_inputs": mask_inputs,
        "ignore_index": ignore_index,
        "bos_id": getattr(tokenizer, "bos_id", None),
        "eos_id": getattr(tokenizer, "eos_id", None),
        "vocab_size": getattr(tokenizer, "vocab_size", None),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "longest_seq_length": max(stats["train"].longest, stats["test"].longest),
        **(extra or {}),
        "splits": {split: vars(s) for split, s in stats.items()},
    }
    paths = [destination_path / name for name in (TRAIN_FILENAME, TEST_FILENAME, PREPARE_CONFIG_FILENAME)]
    try:
        # all three or none: new train.pt next to an earlier run's prepare_config.yaml would be trained with the
        # wrong prompt style; should a rename fail midway, train.pt is deleted, which training refuses by name
        with atomic_paths(*paths) as (train_tmp, test_tmp, config_tmp):
            torch.save(samples["train"], train_tmp)
            torch.save(samples["test"], test_tmp)
            config_tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    except OSError as e:  # a full disk, no permission, a folder in the way of a file
        where = e.filename2 or e.filename  # a failed rename names the temporary file first, then the target
        detail = f"{e.strerror}: {str(where)!r}" if e.strerror and where else (e.strerror or str(e))
        raise DataPreparationError(
            f"Could not write the prepared data into --destination_path {str(destination_path)!r} ({detail}); fix "
            "that (free disk space, permissions) and run again: its train.pt, test.pt and prepare_config.yaml "
            "were not left mixing this run with an earlier one."
        ) from None
    for split, s in stats.items():
        dropped = f", {s.dropped:,} dropped (prompt alone fills it)" if s.dropped else ""
        print(f"{split}: {s.kept:,} examples written; {s.truncated:,} of {s.rows:,} rows truncated to "
              f"max_seq_length={max_seq_length}{dropped}; longest {s.longest} tokens.")
    print(f"Wrote {str(destination_path / TRAIN_FILENAME)!r}, {TEST_FILENAME} and {PREPARE_CONFIG_FILENAME}.")
    return config


def _count(rows: Sequence[dict]) -> str:
    """"N rows", or for conversations (`chat_rows`) "N conversations (M answers)"."""
    if rows and "turns" in rows[0]:
        return f"{len(rows):,} conversations ({sum(len(r['turns']) for r in rows):,} answers)"
    return f"{len(rows):,} rows"


def check_ignore_index(ignore_index: int) -> None:
    """A token id as the mask marker would also mask every answer token with that id (often the EOS)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or ignore_index >= 0:
        raise ValueError(
            f"--ignore_index must be a negative integer, not a token id (got {ignore_index!r}): training would also "
            "drop every answer token with that id from the loss; use -100, PyTorch's default."
        )


def prepare_own_rows(
    path: Path | str, flag: str, val_path: Optional[Path | str], val_flag: str, suffixes: Sequence[str],
    read: Callable[[Path, str], list[dict]], *, test_split_fraction: Optional[float], seed: Optional[int],
    **settings: Any,
) -> Path:
    """prepare_json's and prepare_csv's steps: the rows of a data file `flag` (or of a folder holding
    `train<suffix>` and `val<suffix>`) and of the validation file `val_flag` if any, each read with
    `read(path, flag)`, into `prepare_instruction_data` (which takes `settings`); `prepare_config.yaml` records the
    source, and the validation file or the split."""
    folder = Path(path).is_dir()
    train_path, val = train_and_val_files(path, flag, val_path, val_flag, suffixes)
    if val is not None:
        check_no_split_flags(test_split_fraction, seed, val)

    def load_rows(destination: Path):
        return read(train_path, flag), read(val, flag if folder else val_flag) if val is not None else None

    return prepare_instruction_data(
        dataset=Path(path).resolve().name if folder else train_path.stem, load_rows=load_rows,
        test_split_fraction=test_split_fraction, seed=seed,
        # test.pt's rows: a random split of the source (seed and test_split_fraction are recorded), or val_source
        extra={"source": str(train_path), **({"val_source": str(val)} if val is not None else {})}, **settings,
    )


def prepare_instruction_data(
    *, dataset: str, checkpoint_dir: Path, destination_path: Optional[Path], max_seq_length: Optional[int],
    load_rows: Callable[[Path], tuple[list[dict], Optional[list[dict]]]], test_split_fraction: Optional[float] = None,
    seed: Optional[int] = None, mask_inputs: bool = True, ignore_index: int = -100, prompt_style: str = "alpaca",
    system_prompt: Optional[str] = None, extra: Optional[dict] = None,
) -> Path:
    """The steps every prepare script shares, in the order that fails fastest.

    `load_rows(destination_path)` returns checked rows (instruction/input/output) and, for datasets that ship their
    own test split (or a validation file of the user's), the test rows; otherwise the rows are split with
    `test_split_fraction` and `seed` (None: 0.1 and 42).
    """
    checkpoint_dir = Path(checkpoint_dir)
    check_test_split_fraction(test_split_fraction)  # a bad flag stops before a download, not after it
    check_ignore_index(ignore_index)
    print(f"Loading the tokenizer from {str(checkpoint_dir)!r} ...")
    # before any download, and before the context length is looked up in it: a wrong checkpoint stops right away
    tokenizer = load_tokenizer(checkpoint_dir)
    check_eos(tokenizer, checkpoint_dir)
    max_seq_length = resolve_max_seq_length(checkpoint_dir, max_seq_length)
    destination_path = Path(destination_path) if destination_path else default_destination(
        checkpoint_dir, dataset, max_seq_length)
    # the chat template is read now, not after the download, for the same reason
    prompt_style_from_name(prompt_style, checkpoint_dir=checkpoint_dir, system_prompt=system_prompt,
                           tokenizer=tokenizer)
    # created by the first file written into it (a download or the data), so a failed run leaves no empty folder
    check_output_dir(destination_path, "--destination_path")
    rows, test_rows = load_rows(destination_path)
    if test_rows is None:
        test_split_fraction = DEFAULT_TEST_SPLIT_FRACTION if test_split_fraction is None else test_split_fraction
        seed = DEFAULT_SEED if seed is None else seed
        train_rows, test_rows = split_rows(rows, test_split_fraction, seed)
        extra = {"seed": seed, "test_split_fraction": test_split_fraction, **(extra or {})}
    else:
        train_rows = rows
    print(f"train has {_count(train_rows)}, test has {_count(test_rows)}.")
    write_prepared(
        destination_path, train_rows, test_rows, dataset=dataset, checkpoint_dir=checkpoint_dir,
        max_seq_length=max_seq_length, prompt_style=prompt_style, system_prompt=system_prompt,
        mask_inputs=mask_inputs, ignore_index=ignore_index, tokenizer=tokenizer, extra=extra,
    )
    return destination_path
