"""Logging for the command line: the `ppll_ext` logger hierarchy as one-line `ppll: ...` messages on stderr.

Library modules log through `logging.getLogger(__name__)` and configure nothing; `ppll` (and anything else
that wants the CLI's look) calls `configure()`.
"""

from __future__ import annotations

import logging
import sys

ROOT = "ppll_ext"


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (test harnesses swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a logging failure must never break training
            self.handleError(record)


class _Format(logging.Formatter):
    """`ppll: warning: ...` / `ppll: error: ...`; information as `ppll: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"ppll: {level}{record.getMessage()}"


def configure(level: int = logging.INFO) -> None:
    """Send the library's log records to stderr in the CLI's one-line style (idempotent)."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Format())
    logger.addHandler(handler)
    logger.setLevel(level)
