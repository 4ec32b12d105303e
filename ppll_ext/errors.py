"""Exception families: each message names the bad value and how to fix it."""

from __future__ import annotations

import reprlib

EXIT_ERROR = 2
"""Exit code of a `ppll` command or stage process that stopped on a PPLLError (bad input or a failed stage)."""
QUOTE_LIMIT = 200
"""Most characters of a value that `quote` shows in a message."""


class PPLLError(Exception):
    """Base class of every error ppll_ext raises on purpose.

    `key` names the setting the message is about: a config key such as "train.on_nan" or a Python
    argument such as "on_nan". The library words its messages for the Python API; the CLI adds the
    matching command-line flag from `key`. Every PPLLError ends the `ppll` command with exit code 2.
    """

    def __init__(self, message: str, *, key: str | None = None, every_rank: bool = False) -> None:
        super().__init__(message)
        self.key = key
        self.every_rank = every_rank
        """Raised alike on every rank of a multi-process run (e.g. ranks started with different settings): only
        rank 0 reports it."""


class ConfigError(PPLLError, ValueError):
    """A configuration value, file or command-line override is invalid."""


class DataError(ConfigError):
    """A data set is missing, malformed or cannot be read."""


class CheckpointError(PPLLError):
    """A checkpoint is missing, corrupt or does not match the model."""


class PipelineError(PPLLError, RuntimeError):
    """A pipeline stage failed, timed out or received data it cannot use."""


class BenchError(PPLLError, RuntimeError):
    """A benchmark run failed or wrote no result."""


class _Short(reprlib.Repr):
    """reprlib with room for one whole setting but few nested items, so a repr costs little whatever the value."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = self.maxset = self.maxfrozenset = 8
        self.maxdeque = 8
        self.maxstring = self.maxlong = self.maxother = QUOTE_LIMIT


_SHORT = _Short()


def quote(value: object) -> str:
    """repr(value) cut to about QUOTE_LIMIT characters, for a message that shows a value someone gave: a huge value
    (a 100 MB string, a list that nested YAML aliases repeat a billion times) makes neither a huge line nor the work
    of printing it."""
    text = _SHORT.repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."
