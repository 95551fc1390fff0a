"""What the package says as it works (progress, tables, where results went): one logger, "ternary_mamba", at INFO,
written to the current standard output (warnings to standard error).  The command line shows it; from Python, silence it with
`logging.getLogger("ternary_mamba").setLevel(logging.WARNING)` or `with ternary_mamba.quiet(): ...`.
Errors are exceptions (`UserError`), never log lines."""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

logger = logging.getLogger("ternary_mamba")


class _Stdout(logging.Handler):
    """To whatever sys.stdout is at the time (a redirected or captured stdout included); warnings to stderr, so
    that what a command writes as its result (generated text, tables) stays clean."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            out = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            out.write(self.format(record) + "\n")
            out.flush()
        except Exception:  # noqa: BLE001 - logging never raises into the caller
            self.handleError(record)


if not logger.handlers:
    logger.addHandler(_Stdout())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def say(*parts, sep: str = " ", flush: bool = True) -> None:
    """print() for the package's messages: the same text, through the logger."""
    logger.info(sep.join(str(p) for p in parts))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Nothing said inside the block (warnings still are)."""
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)
