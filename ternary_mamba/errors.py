"""One exception type for everything the user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 1; anything else is a bug
and keeps its traceback.  Messages name settings as flags (`--resume`); raised to a Python caller (the CLI is not
running), the same message names the config argument instead (`resume`), so an error always names what the caller
can change.
"""
from __future__ import annotations

import re

_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
_style = {"cli": False}


def cli_mode(on: bool = True) -> None:
    """The command line is running: messages keep their --flags (set by `ternary_mamba.cli.main`)."""
    _style["cli"] = on


def as_argument(message: str) -> str:
    """'pass --resume or choose another --out' -> 'pass resume or choose another out' (config argument names)."""
    return _FLAG.sub(lambda m: m.group(1).replace("-", "_"), message)


class UserError(Exception):
    """Bad input (a path, a file, a setting): the message says what is wrong and what to do."""

    def __str__(self) -> str:
        text = super().__str__()
        return text if _style["cli"] else as_argument(text)
