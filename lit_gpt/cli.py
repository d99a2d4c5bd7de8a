"""How every command-line entrypoint runs: jsonargparse for flags and `--config`, user errors as one line."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import signal
import sys
import typing
from collections import abc
from pathlib import Path, PurePath
from types import SimpleNamespace
from typing import Any, Callable, Literal, Optional, Sequence, Union, get_args, get_origin

# OSErrors that a path the user gave causes (an output folder that is a file, no permission to write, ...): their
# own message (`[Errno 17] File exists: 'out'`) names the path
USER_OS_ERRORS = (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# jsonargparse's exit status for a bad flag (argparse's)
USAGE_ERROR_CODE = 2
# what a finetune run writes into its hyperparameters.yaml besides its flags (lit_gpt/training.py::finetune); only
# `method` marks the file as a run's, every other key that is not a flag of the script is dropped too
RUN_METHOD_KEY = "method"
RUN_CONFIG_HELP = ("Path to a YAML file of flags (config_hub/finetune/*/*.yaml), or a run's hyperparameters.yaml to "
                   "repeat or vary that run; flags after --config override its values.")


class RunConfigError(ValueError):
    """A run's hyperparameters.yaml given as `--config` to a script that did not write it."""


class Terminated(BaseException):
    """SIGTERM (`kill`, `timeout`, a scheduler) in a script other than training, raised in the main thread so that
    its `finally` blocks run: a writer stopped mid-file removes its temporary file. A BaseException, as
    KeyboardInterrupt, so that no `except Exception` takes it for an error to recover from."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _terminate_with_cleanup() -> Optional[Any]:
    """Make SIGTERM raise `Terminated`, if nothing else handles it and this is the main thread; the previous
    handler, or None when left alone. Training keeps the default: it handles the signals itself once it runs, and
    its launched ranks must die at once while blocked in a collective (PDEATHSIG)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def run_cli(fn: Callable[..., Any], errors: tuple[type[BaseException], ...] = (), finetune_script: Optional[str] = None,
            args: Optional[list[str]] = None, run_config_fix: Optional[str] = None,
            arg_check: Optional[Callable[[list[str]], Optional[str]]] = None) -> Any:
    """`jsonargparse.CLI(fn)`, printing a user error (a missing file, a bad value, a path that is a file where a
    folder is needed or not writable, or one of `errors`) as `error: …` and exiting 1, and a flag jsonargparse cannot
    parse as one line `error: --flag: expected …, got '…' (see --help)`, exiting 2.

    `finetune_script` (`finetune/ether.py`, ...): `fn` is that script's, and `--config` also takes the
    `hyperparameters.yaml` of a run it made (see `run_config_args`).
    `run_config_fix` (scripts that use a run's output rather than repeat it: chat, eval, merge, generate): a run's
    `hyperparameters.yaml` given as `--config` is refused in one sentence ending with this fix (see
    `refuse_run_config`), instead of jsonargparse's complaint about the first of its keys the script lacks.
    `arg_check(args)`: a script's own one-line error for its arguments before jsonargparse parses them (None: fine),
    for what jsonargparse would say worse (an unknown flag a user brings from another tool) or must not say (a
    `--config` text holding a token); it exits 2, as a bad flag does.

    Ctrl-C and (outside training, `_terminate_with_cleanup`) SIGTERM end the script with the shell's exit status for
    them and one word, after its `finally` blocks have removed what it was writing.

    Set `LIT_GPT_DEBUG=1` to see the traceback (and jsonargparse's full message) instead.
    """
    import jsonargparse
    from jsonargparse import CLI

    # the dataclasses' attribute docstrings (lit_gpt/args.py) become the help of --io.*, --train.*, --eval.*
    if hasattr(jsonargparse, "set_parsing_settings"):  # jsonargparse >= 4.39 (the older call goes in 5.0)
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    else:
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    _whole_description(fn)
    args = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get("LIT_GPT_DEBUG") == "1"
    previous_sigterm = _terminate_with_cleanup() if finetune_script is None else None
    try:
        problem = arg_check(args) if arg_check is not None else None
        if problem is not None:
            raise RunConfigError(problem)  # (the same one-line exit 2)
        if finetune_script is not None:
            args = run_config_args(args, fn, finetune_script)
        elif run_config_fix is not None:
            refuse_run_config(args, fn, run_config_fix)
        extra = {"config_help": RUN_CONFIG_HELP} if finetune_script is not None else {}
        return CLI(fn, args=args, as_positional=False, parser_class=_one_line_parser(fn, args), **extra)
    except RunConfigError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR_CODE)
    except (FileNotFoundError, ValueError, *USER_OS_ERRORS, *errors) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except BrokenPipeError:  # printed to a reader that had gone (`| head`): cut short, say so (before OSError's)
        silence_stdout()
        print("error: stdout was closed before the script finished (a `| head`?); it stopped there.", file=sys.stderr)
        raise SystemExit(128 + getattr(signal, "SIGPIPE", 13))
    except OSError as e:  # a disk full, over quota or read-only: the path and the fix, not a traceback
        from lit_gpt.utils import DISK_ERRNOS, WriteError

        if debug or not (isinstance(e, WriteError) or e.errno in DISK_ERRNOS):
            raise
        print(f"error: {e if isinstance(e, WriteError) else WriteError(e.errno, e.strerror, e.filename)}",
              file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:  # Ctrl-C: the shell's exit status for it, not a traceback (files are written atomically)
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT)
    except Terminated:  # the same for SIGTERM, once the `finally` blocks on the way have removed temporary files
        if debug:
            raise
        print("\nterminated", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def silence_stdout() -> None:
    """After a `BrokenPipeError` on stdout (`script | head` took what it wanted and left): send the rest of stdout to
    /dev/null, so that Python's flush at exit does not print a second traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _whole_description(fn: Callable[..., Any]) -> None:
    """jsonargparse shows only a docstring's first line as --help's description: join the lines before `Args:`
    into that line (argparse wraps it anyway), so all of it shows."""
    if not fn.__doc__:
        return
    description, args_title, args = inspect.cleandoc(fn.__doc__).partition("\n\nArgs:")
    fn.__doc__ = " ".join(description.split()) + args_title + args


# ---------------------------------------------------------------------------------------------- one-line errors
def _one_line_parser(fn: Callable[..., Any], args: list[str]) -> type:
    """An `ArgumentParser` (jsonargparse's `parser_class` hook) whose parse errors are one line: the flag, what it
    takes (from `fn`'s type hints) and what was given; not the usage block and union dumps jsonargparse prints."""
    from jsonargparse import ArgumentParser

    # the --config files, found now: jsonargparse parses a config file from inside its folder
    files = [value for _, value, _ in config_values(args) if os.path.isfile(value)]

    class OneLineErrorParser(ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # no abbreviated flags: argparse took `--train.lr 3` as --train.lr_warmup_steps 3 without a word
            kwargs["allow_abbrev"] = False
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Optional[Exception] = None) -> typing.NoReturn:
            # nested parsers (exit_on_error=False) raise for their parent to report; debug shows everything
            if (not self.exit_on_error or os.environ.get("LIT_GPT_DEBUG") == "1"
                    or os.environ.get("JSONARGPARSE_DEBUG")):
                super().error(message, ex)
            known = [o for o in self._option_string_actions if o.startswith("--")]
            sys.stderr.write(f"error: {one_line_error(message, fn, args, known, files)}\n")
            self.exit(USAGE_ERROR_CODE)

    return OneLineErrorParser


def one_line_error(message: str, fn: Callable[..., Any], args: Sequence[str] = (), known: Sequence[str] = (),
                   files: Sequence[str] = ()) -> str:
    """jsonargparse's (possibly multi-line) parse error as one sentence naming the flag, what it expects (from
    `fn`'s type hints) and the value given (as typed on the command line, else as jsonargparse reports it). An
    unknown flag or `--config` key gets the flag it was likely meant as, among `known`; an error in a `--config` file
    names it (`files`: the `--config` values that are files, found before jsonargparse changed directory)."""
    required = re.match(r"the following arguments are required: (.*)", message)
    if required is not None:  # as_positional=False: each is a flag
        names = [n if n.startswith("-") else f"--{n}" for n in required[1].split(", ")]
        return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} required (see --help)"
    unknown = re.match(r"unrecognized arguments: (.*)", " ".join(message.split()))
    if unknown is not None:
        flags = [a.split("=", 1)[0] for a in unknown[1].split() if a.startswith("--")]
        hints = [h for h in (_flag_hint(f, known) for f in flags) if h]
        positional = _positional_hint(args, unknown[1].split(), known)
        if positional is not None:
            hints.insert(0, positional)
        return f"unrecognized arguments: {unknown[1]}{'; ' + '; '.join(hints) if hints else ''} (see --help)"
    which = f"--config {files[0]!r}" if len(files) == 1 else "--config"  # (a run's flags come as YAML text)
    yaml_error = re.match(r"Problems parsing config\s*:\s*(.*?)\s+in \"<unicode string>\", (line \d+, column \d+)",
                          message, re.DOTALL)
    if yaml_error is not None:
        return f"{which} is not valid YAML: {' '.join(yaml_error[1].split())} at {yaml_error[2]} (see --help)"
    option = (re.match(r"Option '([^']+)' is not accepted", message)
              or re.match(r"Group '([^']+)' does not accept option '([^']+)'", message))
    if option is not None:  # a key of a --config file
        key = option[1] if option.lastindex == 1 else f"{option[1]}.{option[2]}"
        if len(files) == 1 and Path(files[0]).name == "prepare_config.yaml":
            return (f"{which} is the record of how the data in {str(Path(files[0]).parent)!r} was prepared, not "
                    "options of this script: pass that folder as --io.train_data_dir (see --help)")
        script = _script_of_flag(f"--{key}", known)
        if script is not None:
            return f"{which} sets {key}, an option of {script}: run it with {script} (see --help)"
        hint = _flag_hint(f"--{key}", known)
        where = f" in {which}" if files else ""
        return f"Option '{key}'{where} is not accepted{': ' + hint if hint else ''} (see --help)"
    # the innermost key: `--train '{"learning_rate": "abc"}'` fails as "train" and, inside, "train.learning_rate"
    m = None
    for m in re.finditer(r'Parser key "(?P<key>[^"]+)":\s*', message):
        pass
    if m is None:  # argparse's own: "unrecognized arguments: --x 1", "argument --resume: expected one argument"
        return f"{' '.join(message.split())} (see --help)"
    key, rest = m["key"], message[m.end():]
    flag = f"--{key}"
    given = _given_value(args, flag)
    if given is None:
        found = (re.findall(r"(?:Got|Given) value: (.*)", rest) or re.findall(r"Unable to load config '(.*)'", rest))
        given = found[-1].strip() if found else None
    tp = _flag_type(fn, key)
    if tp is not None and given is not None:
        if given.lower() == "none" and type(None) in typing.get_args(tp):  # Python's spelling of YAML's null
            return f"{flag}: expected {_describe(tp, key)}, got {given!r}: write null for None (see --help)"
        if given.lower() == "auto":  # litgpt's and lm-eval's `--devices auto`, `--batch_size auto`
            return f"{flag}: expected {_describe(tp, key)}, got {given!r}: there is no automatic choice here, pass " \
                   "a number (see --help)"
        return f"{flag}: expected {_describe(tp, key)}, got {given!r} (see --help)"
    expected = re.search(r"Expected a (.*?)\. Got value: (.*)", rest)
    if expected is not None:
        return f"{flag}: expected {_plain_type_name(expected[1])}, got {expected[2].strip()!r} (see --help)"
    first = next((line.strip() for line in rest.splitlines() if line.strip()), "invalid value")
    got = f" (got {given!r})" if given is not None and given not in first else ""
    return f"{flag}: {first}{got} (see --help)"


# options of one finetune script that users bring to another (a recipe or a command line of the other method)
METHOD_FLAG_SCRIPTS = {"--lora_": "finetune/lora.py", "--loraplus_": "finetune/lora.py",
                       "--ether_": "finetune/ether.py", "--oft_": "finetune/ether.py",
                       "--Htype": "finetune/ether.py",
                       # and a data preparation script's (its --print_config, or a recipe of it)
                       "--json_path": "scripts/prepare_json.py", "--csv_path": "scripts/prepare_csv.py",
                       "--data_file_path": "a scripts/prepare_*.py script",
                       "--destination_path": "a scripts/prepare_*.py script"}


def _script_of_flag(flag: str, known: Sequence[str]) -> Optional[str]:
    """The other finetune script whose option the unknown `flag` is, when `known` are a finetune script's flags."""
    if "--train.learning_rate" not in known:
        return None
    for prefix, script in METHOD_FLAG_SCRIPTS.items():
        # (not when this script has options of that prefix: then it is a misspelt option of this one)
        if flag.startswith(prefix) and not any(k.startswith(prefix) for k in known):
            return script
    return None


# what other tools (HF Trainer, litgpt, PEFT, lm-eval) call some of our flags: the last part of the name
FLAG_SYNONYMS = {"lr": "learning_rate", "warmup_steps": "lr_warmup_steps", "num_train_epochs": "epochs",
                 "max_grad_norm": "max_norm", "gradient_clip_val": "max_norm", "batch_size": "global_batch_size",
                 "per_device_train_batch_size": "micro_batch_size", "eval_steps": "interval",
                 "save_steps": "save_interval", "logging_steps": "log_interval", "gradient_checkpointing":
                 "activation_checkpointing", "max_length": "max_seq_length", "seq_len": "max_seq_length",
                 # PEFT's LoraConfig(r=, lora_alpha=); lit-gpt's and nanoGPT's training iterations
                 "r": "lora_r", "rank": "lora_r", "lora_rank": "lora_r", "alpha": "lora_alpha",
                 "max_iters": "max_steps",
                 # lm-eval's and litgpt evaluate's output, HF's dtype flags
                 "output_path": "save_filepath", "out_dir": "save_filepath", "dtype": "precision",
                 "bf16": "precision", "fp16": "precision",
                 # PEFT's LoraConfig(target_modules=...): one flag per adapter script
                 "target_modules": ("lora_targets", "ether_targets"),
                 "layers_to_transform": ("lora_layers", "ether_layers"),
                 # PEFT's LoraConfig(init_lora_weights=...)
                 "init_lora_weights": "lora_init"}
# names of other tools' settings that have no flag here: (a flag of the scripts the note is for, what to do instead)
_TRAINING = "--train.learning_rate"
NO_EQUIVALENT = {
    "max_time": (_TRAINING, "there is no time limit: a scheduler's SIGTERM or SIGUSR1 (SLURM's --signal=USR1@90) "
                            "stops the run after a step with a checkpoint, and --resume auto goes on"),
    "gradient_accumulation_steps": (_TRAINING, "the accumulation follows from --train.global_batch_size / "
                                               "(--train.micro_batch_size × devices): set the global batch size"),
    "warmup_ratio": (_TRAINING, "HF's warmup_ratio is a fraction of the whole run: --train.lr_warmup_fraction "
                                "takes a fraction of one epoch (warmup_ratio × epochs), or --train.lr_warmup_steps "
                                "steps"),
    "use_rslora": (_TRAINING, "rsLoRA's scale alpha / sqrt(r) is --lora_alpha alpha × sqrt(r) here"),
    "quantize": (_TRAINING, "full fine-tuning trains every weight, and a weight that trains is not quantized: "
                            "QLoRA is finetune/lora.py --quantize nf4 (finetune/ether.py takes it too)"),
    "optimizer": (_TRAINING, "training uses AdamW (--train.learning_rate, --train.weight_decay, --train.beta1, "
                             "--train.beta2)"),
    "multiline": ("--multi_turn", "a message continues on the next line when a line ends with \\"),
    "use_dora": (_TRAINING, "DoRA is --lora_dora true (finetune/lora.py)"),
    # PEFT's create_loraplus_optimizer's other settings
    "loraplus_weight_decay": ("--loraplus_lr_ratio", "--train.weight_decay applies to both LoRA+ groups"),
    "loraplus_lr_embedding": ("--loraplus_lr_ratio", "embeddings take no LoRA here (train them in full with "
                                                     "--lora_train_modules embeddings)"),
    "modules_to_save": (_TRAINING, "modules trained in full beside the adapter are --lora_train_modules or "
                                   "--ether_train_modules (head, embeddings, norms, or module names)"),
    "max_tokens": (_TRAINING, "the run's length is set by --train.max_steps or --train.epochs"),
    # litgpt's --data.*: prepared beforehand here
    "data": (_TRAINING, "the data is prepared first with a scripts/prepare_*.py script, whose folder is "
                        "--io.train_data_dir"),
}
# the shortest unknown name taken for an abbreviation of a longer flag: `--r` is not `--resume`
MIN_ABBREVIATION = 3


def _flag_hint(flag: str, known: Sequence[str]) -> Optional[str]:
    """What an unknown `flag` was likely meant as: a known flag spelt with `-` for `_`, the name another tool gives
    it, the one flag it abbreviates, or one close to it; or the finetune script whose option it is."""
    if not known:
        return None
    underscored = "--" + flag[2:].replace("-", "_")
    group, _, name = underscored[2:].rpartition(".")
    note = NO_EQUIVALENT.get("data" if group.split(".")[0] == "data" else name)
    if note is not None and note[0] in known:
        return note[1]
    # another tool's name for a flag, then a nested flag typed without its group (`--epochs` for --train.epochs)
    ours = FLAG_SYNONYMS.get(name, ())
    synonyms = [f"--{g}{syn}" for syn in ((ours,) if isinstance(ours, str) else ours)
                for g in (f"{group}." if group else "", "train.", "eval.") if f"--{g}{syn}" in known]
    synonyms += [k for k in known if k.rpartition(".")[2] == name] if not group else []
    # an abbreviation (argparse's are turned off)
    prefixed = [k for k in known if k.startswith(underscored)] if len(name) >= MIN_ABBREVIATION else []
    if underscored not in known and not synonyms and len(prefixed) > 1:  # ambiguous: all, not the closest
        names = sorted(prefixed)
        return f"did you mean {', '.join(names[:-1])} or {names[-1]}?"
    close = ([underscored] if underscored in known else synonyms[:1] if synonyms
             else prefixed if len(prefixed) == 1 else difflib.get_close_matches(flag, known, n=1, cutoff=0.8))
    if close:
        return f"did you mean {close[0]}?"
    script = _script_of_flag(flag, known)
    return f"{flag} is an option of {script}" if script is not None else None


def _positional_hint(args: Sequence[str], unknown: Sequence[str], known: Sequence[str]) -> Optional[str]:
    """The flag for a value given without one, as litgpt takes the model or repo id (`chat CKPT`)."""
    value = args[0] if args and not args[0].startswith("-") else None
    if value is None or value not in unknown:
        return None
    from lit_gpt.utils import finetuning_run_hint, run_adapter_file, run_model_folder

    candidates = ["--repo_id"]
    folder = run_model_folder(value) if finetuning_run_hint(value) is not None else None
    if folder is not None and any(c in known for c in ("--checkpoint_dir", "--io.checkpoint_dir")):
        value = str(folder)  # litgpt's `chat out/finetune/full/final`: the run's model folder
    elif finetuning_run_hint(value) is not None:  # litgpt's `merge_lora RUN`
        candidates.insert(0, "--adapter_path")
        value = run_adapter_file(value)
    candidates += ["--checkpoint_dir", "--io.checkpoint_dir"]
    flag = next((c for c in candidates if c in known), None)
    return f"values are given with their flag here: pass {flag} {value}" if flag is not None else None


def _given_value(args: Sequence[str], flag: str) -> Optional[str]:
    """The last value given to `flag` on the command line (`--flag VALUE` or `--flag=VALUE`)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def _flag_type(fn: Callable[..., Any], key: str) -> Any:
    """The type hint of `--key` (`train.learning_rate`: the `learning_rate` field of `fn`'s `train` dataclass)."""
    owner: Any = fn
    tp = None
    for part in key.split("."):
        if owner is None:  # a nested key under a flag that is not a dataclass
            return None
        try:
            hints = typing.get_type_hints(owner)
        except Exception:  # an annotation that does not evaluate: describe nothing rather than fail the error
            return None
        if part not in hints:
            return None
        tp = hints[part]
        owner = next((t for t in (tp, *get_args(tp)) if dataclasses.is_dataclass(t)), None)
    return tp


def _describe(tp: Any, key: str) -> str:
    """A type hint in words: `an integer`, `a number`, `true or false`, `ether, oft or lora`, `a path`, ..."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or type(tp).__name__ == "UnionType":
        parts = [a for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(_describe(a, key) for a in parts)) if parts else "null"
    if origin is Literal:
        words = [str(a) for a in args]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if inspect.isclass(tp) and issubclass(tp, PurePath):
        return "a path"
    if dataclasses.is_dataclass(tp):
        return f"a YAML/JSON mapping of --{key}.* values (or a file of them)"
    if tp is dict or origin in (dict, abc.Mapping, abc.MutableMapping):
        return "a JSON/YAML mapping such as '{\"key\": \"value\"}'"
    if tp is list or origin in (list, tuple, set, frozenset, abc.Sequence, abc.Iterable, abc.Collection):
        inner = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(args[0] if args else None)
        return f"a list of {inner} such as [a, b]" if inner else "a list such as [a, b]"
    return _plain_type_name(str(tp))


def _plain_type_name(text: str) -> str:
    """`<class 'int'>` -> `int`, `typing.Literal['a', 'b']` -> `Literal['a', 'b']`."""
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("typing.", "")


# ---------------------------------------------------------------------------------------------- --config <run>
def script_of_method(method: str) -> str:
    """The finetune script whose runs record `method` in their hyperparameters.yaml."""
    return {"lora": "finetune/lora.py", "full": "finetune/full.py"}.get(method, "finetune/ether.py")


def run_config_args(args: list[str], fn: Callable[..., Any], script: str) -> list[str]:
    """`args` with each `--config PATH` that names a run's `hyperparameters.yaml` replaced by `--config YAML`, the
    file's flags only, so the run can be repeated or varied (flags after `--config` still override its values).

    A run's file records, besides the flags, what the run derived from them (`method`, `adapter_config`,
    `base_checkpoint_dir`, `prompt_style`, `started_in`, the resolved `io` paths): those are dropped, and `io` paths
    equal to the defaults they were derived from are left to the flags to derive again (so `--train.learning_rate`
    changes the default run directory too). The `io` paths were relative to the directory the run was started in
    (`started_in`): when that is not the current one, they are made absolute. A file written by another script (a
    LoRA run's, given to finetune/ether.py) raises `RunConfigError`. Any other `--config` (config_hub/'s YAMLs) is
    left as it is. Without any `--config`, a `--resume` of a run that has a `hyperparameters.yaml` takes the run's
    flags first (`_resumed_run_hparams`), so resuming needs only `--resume PATH` (or `--resume auto --io.out_dir`);
    `--devices` and `--num_nodes` describe the job, not the run, and keep their defaults.
    """
    import yaml

    out = list(args)
    steps, fraction = _given_value(out, "--train.lr_warmup_steps"), _given_value(out, "--train.lr_warmup_fraction")
    if steps is not None and fraction not in (None, "null", "None"):  # (a config file's steps: the fraction wins)
        raise RunConfigError(f"--train.lr_warmup_steps {steps} and --train.lr_warmup_fraction {fraction} both set the "
                             "warm-up: pass one of the two.")
    for index, path, prefix in config_values(out):
        hparams = _read_run_hparams(path, fn)
        if hparams is not None:
            out[index] = prefix + yaml.safe_dump(run_flags(hparams, fn, script, path), sort_keys=False)
        else:
            problem = _litgpt_config_problem(path, fn)
            if problem is not None:
                raise RunConfigError(problem)
    resumed = _resumed_run_hparams(out, fn, script)
    if resumed is not None:  # the run's own flags first; the ones given here still override them
        flags = run_flags(_read_run_hparams(resumed, fn), fn, script, resumed)
        if isinstance(flags.get("io"), dict):  # the run goes on where it now is (a run folder may have moved)
            flags["io"].pop("out_dir", None)
        for machine in ("devices", "num_nodes"):  # what the job has now (a resume may have fewer GPUs), not then
            flags.pop(machine, None)
        if steps is not None and isinstance(flags.get("train"), dict):  # the warm-up given here replaces the run's
            flags["train"]["lr_warmup_fraction"] = None
        print(f"note: --resume: the run's flags come from {resumed!r}; flags given here override them.",
              file=sys.stderr)
        out = ["--config", yaml.safe_dump(flags, sort_keys=False), *out]
    return out


# litgpt's data modules and the script that prepares the same data here
_LITGPT_DATA = {"JSON": "prepare_json.py --json_path {json_path}", "Alpaca": "prepare_alpaca.py",
                "AlpacaGPT4": "prepare_alpaca.py", "Dolly": "prepare_dolly.py", "LIMA": "prepare_lima.py",
                "FLAN": "prepare_flan.py", "LongForm": "prepare_longform.py"}


def _litgpt_config_problem(path: str, fn: Callable[..., Any]) -> Optional[str]:
    """For a litgpt finetune YAML given as `--config` (its `data:` names a `litgpt.data` class): every change it needs
    in one sentence, rather than jsonargparse's refusal of one key per run."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    module = data.get("data") if isinstance(data, dict) else None
    module = module.get("class_path", "") if isinstance(module, dict) else module
    if not isinstance(module, str) or not module.startswith("litgpt."):
        return None
    init = data["data"].get("init_args") or {} if isinstance(data["data"], dict) else {}
    prepare = _LITGPT_DATA.get(module.rsplit(".", 1)[-1], "prepare_json.py --json_path <your data>")
    prepare = prepare.format(json_path=init.get("json_path", "<your data>") if isinstance(init, dict) else "")
    ckpt = data.get("checkpoint_dir", "<model>")
    hints = typing.get_type_hints(fn)
    fields = {name: {f.name for f in dataclasses.fields(t)} for name, t in hints.items() if dataclasses.is_dataclass(t)}
    moved = [k for k in ("checkpoint_dir", "out_dir") if k in data]
    unknown = [k for k in data if k not in hints and k not in moved and k != "data"]
    unknown += [f"{group}.{k}" for group, keys in data.items() if group in fields and isinstance(keys, dict)
                for k in keys if k not in fields[group]]
    parts = [f"prepare its data with `python scripts/{prepare} --checkpoint_dir {ckpt}` and pass the folder it "
             "writes as io.train_data_dir"]
    if moved:
        parts.append(f"move {' and '.join(moved)} under io: ({', '.join('io.' + k for k in moved)})")
    if unknown:
        parts.append(f"delete {', '.join(unknown)} (no setting here; see --help)")
    return f"--config {path!r} is a litgpt config ({module}): {'; '.join(parts)}."


def _resumed_run_hparams(args: Sequence[str], fn: Callable[..., Any], script: str) -> Optional[str]:
    """The `hyperparameters.yaml` of the run that `--resume` continues (`--resume PATH`: PATH's run; `--resume auto`:
    `--io.out_dir`'s), when `args` give no `--config` of their own and `script` wrote the run, so that a resume
    needs no flag the run recorded (another script's run is left to the resume's own check, which names both)."""
    from lit_gpt.training import HPARAMS_FILENAME, normalize_resume

    if config_values(args) or "resume" not in inspect.signature(fn).parameters:
        return None
    resume = normalize_resume(_given_value(args, "--resume"))
    if isinstance(resume, Path):
        run = resume.parent.parent if resume.parent.name == "checkpoints" else None
    else:
        out_dir = _given_value(args, "--io.out_dir")
        run = Path(out_dir) if resume == "auto" and out_dir else None
    hparams = None if run is None else _read_run_hparams(str(run / HPARAMS_FILENAME), fn, strict=True)
    if hparams is None or script_of_method(str(hparams[RUN_METHOD_KEY])) != script:
        return None
    return str(run / HPARAMS_FILENAME)


def config_values(args: Sequence[str]) -> list[tuple[int, str, str]]:
    """Each `--config` value in `args`: (its index in `args`, the value, the prefix before it there: "" for
    `--config VALUE`, "--config=" for `--config=VALUE`)."""
    found = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            found.append((i + 1, args[i + 1], ""))
        elif arg.startswith("--config="):
            found.append((i, arg[len("--config="):], "--config="))
    return found


def refuse_run_config(args: Sequence[str], fn: Callable[..., Any], fix: str) -> None:
    """Raise `RunConfigError` when a `--config` in `args` is a run's `hyperparameters.yaml`, which only the finetune
    script that wrote it takes. `fix` says what to pass instead; `{run}`, `{merged}`, `{adapter}` and `{base}` in it
    become the run's folder, its default merge output, its final adapter file and its base model (quoted)."""
    from lit_gpt.utils import MERGED_DIRNAME, run_adapter_file, run_model_folder

    for _, path, _ in config_values(args):
        hparams = _read_run_hparams(path, fn)
        if hparams is None:
            continue
        run = Path(path).parent
        adapter = run_adapter_file(run)
        base = hparams.get("base_checkpoint_dir")
        wrote = script_of_method(str(hparams[RUN_METHOD_KEY]))
        where = {"run": repr(str(run)), "merged": repr(str(run / MERGED_DIRNAME)), "adapter": repr(adapter),
                 "base": repr(base) if isinstance(base, str) else "<base model>"}
        folder = run_model_folder(run)  # final/ of a full run, a current merged/: the model itself
        instead = f"pass its model folder, --checkpoint_dir {folder}" if folder is not None else fix.format(**where)
        raise RunConfigError(
            f"--config {path!r} is a training run's hyperparameters.yaml, which only {wrote} takes (to repeat or "
            f"vary the run): {instead}."
        )


def _read_run_hparams(path: str, fn: Callable[..., Any], strict: bool = False) -> Optional[dict]:
    """The contents of `path` when it is a run's hyperparameters.yaml (a mapping with a `method` key that is not a
    flag of `fn`), else None (jsonargparse reads it, and reports what is wrong with it). `strict` (a run folder's
    own file, for `--resume`): a file that is there but not YAML raises `RunConfigError` naming it and its line,
    rather than None, which would leave the resume asking for the flags the run recorded."""
    from lit_gpt.config import read_yaml_file

    try:
        if not Path(path).is_file():
            return None
        data = read_yaml_file(path, ": fix it, or pass the run's flags yourself in a --config file to resume.")
    except OSError:
        return None
    except ValueError as e:
        if not strict:
            return None
        raise RunConfigError(str(e)) from None
    if isinstance(data, dict) and RUN_METHOD_KEY in data and RUN_METHOD_KEY not in inspect.signature(fn).parameters:
        return data
    return None


def run_flags(hparams: dict, fn: Callable[..., Any], script: str, path: str) -> dict:
    """The flags of a run's `hyperparameters.yaml` as `fn` (the function of `script`) takes them."""
    method = hparams[RUN_METHOD_KEY]
    wrote = script_of_method(str(method))
    if wrote != script:
        raise RunConfigError(
            f"--config {path!r} is the hyperparameters.yaml of a run written by {wrote} (method {method}): pass it "
            f"to {wrote}, not {script}."
        )
    params = inspect.signature(fn).parameters
    flags = {k: v for k, v in hparams.items() if k in params}
    io = flags.get("io")
    if not isinstance(io, dict):
        return flags
    started_in = hparams.get("started_in")  # recorded since 2026-11; older files: worked out from the paths
    cwd = Path(started_in) if isinstance(started_in, str) else _run_directory(io, hparams.get("base_checkpoint_dir"))
    if cwd == Path.cwd().resolve():
        cwd = None  # started here: its relative paths mean what they meant
    flags["io"] = _run_io(dict(io), hparams, method, cwd)
    from lit_gpt.training import normalize_resume

    resume = flags.get("resume")
    if cwd is not None and isinstance(resume, str) and isinstance(normalize_resume(resume), Path):
        flags["resume"] = str(cwd / resume)  # a checkpoint path (an absolute one stays as it is)
    return flags


def _run_io(io: dict, hparams: dict, method: str, cwd: Optional[Path]) -> dict:
    """The `io` flags of a run: resolved paths equal to their defaults dropped, relative ones anchored in `cwd`."""
    train_dir = io.get("train_data_dir")
    if train_dir is not None:
        if io.get("val_data_dir") == train_dir:
            io.pop("val_data_dir")
        if io.get("checkpoint_dir") == str(Path(train_dir).parent):
            io.pop("checkpoint_dir")
    if io.get("out_dir") is not None and io.get("log_dir") is not None:
        try:
            from lit_gpt.training import run_name

            adapter = hparams.get("adapter_config")
            name = run_name(method, SimpleNamespace(**adapter) if isinstance(adapter, dict) else None,
                            SimpleNamespace(**hparams.get("train", {})), hparams.get("loraplus_lr_ratio"))
        except Exception:  # a file from another version: keep the recorded run directory
            name = None
        if name is not None and io["out_dir"] == str(Path(io["log_dir"]) / name):
            io.pop("out_dir")
    if cwd is not None:
        io = {k: str(cwd / v) if isinstance(v, str) else v for k, v in io.items()}  # an absolute v stays as it is
    return io


def _run_directory(io: dict, base_checkpoint_dir: Any) -> Optional[Path]:
    """The directory a run was started in, which its relative `io` paths are relative to: `base_checkpoint_dir`
    (absolute) less the `io.checkpoint_dir` it was resolved from (relative). None when that cannot be told."""
    ckpt = io.get("checkpoint_dir")
    if not isinstance(ckpt, str) or not isinstance(base_checkpoint_dir, str) or Path(ckpt).is_absolute():
        return None
    parts = [p for p in Path(ckpt).parts if p != "."]
    base = Path(base_checkpoint_dir)
    if ".." in parts or not base.is_absolute() or len(parts) >= len(base.parts):
        return None
    if parts and list(base.parts[-len(parts):]) != parts:
        return None  # a symbolic link on the way: resolve() changed the path
    return Path(*base.parts[: len(base.parts) - len(parts)])
