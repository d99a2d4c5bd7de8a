"""How every command-line entrypoint runs: jsonargparse for flags and `--config`, user errors as one line."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable


def run_cli(fn: Callable[..., Any], errors: tuple[type[BaseException], ...] = ()) -> Any:
    """`jsonargparse.CLI(fn)`, printing a user error (a missing file, a bad value, or one of `errors`) as
    `error: …` and exiting 1.

    Set `LIT_GPT_DEBUG=1` to see the traceback instead.
    """
    from jsonargparse import CLI

    try:
        return CLI(fn, as_positional=False)
    except (FileNotFoundError, ValueError, *errors) as e:
        if os.environ.get("LIT_GPT_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
