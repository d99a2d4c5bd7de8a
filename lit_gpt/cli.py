"""How every command-line entrypoint runs: jsonargparse for flags and `--config`, user errors as one line."""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Callable


# OSErrors that a path the user gave causes (an output folder that is a file, no permission to write, ...): their
# own message (`[Errno 17] File exists: 'out'`) names the path
USER_OS_ERRORS = (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_cli(fn: Callable[..., Any], errors: tuple[type[BaseException], ...] = ()) -> Any:
    """`jsonargparse.CLI(fn)`, printing a user error (a missing file, a bad value, a path that is a file where a
    folder is needed or not writable, or one of `errors`) as `error: …` and exiting 1.

    Set `LIT_GPT_DEBUG=1` to see the traceback instead.
    """
    from jsonargparse import CLI, set_docstring_parse_options

    # the dataclasses' attribute docstrings (lit_gpt/args.py) become the help of --io.*, --train.*, --eval.*
    set_docstring_parse_options(attribute_docstrings=True)
    _whole_description(fn)
    try:
        return CLI(fn, as_positional=False)
    except (FileNotFoundError, ValueError, *USER_OS_ERRORS, *errors) as e:
        if os.environ.get("LIT_GPT_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


def _whole_description(fn: Callable[..., Any]) -> None:
    """jsonargparse shows only a docstring's first line as --help's description: join the lines before `Args:`
    into that line (argparse wraps it anyway), so all of it shows."""
    if not fn.__doc__:
        return
    description, args_title, args = inspect.cleandoc(fn.__doc__).partition("\n\nArgs:")
    fn.__doc__ = " ".join(description.split()) + args_title + args
