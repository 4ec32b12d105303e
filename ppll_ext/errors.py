"""Exception families: each message names the bad value and how to fix it."""


class PPLLError(Exception):
    """Base class of every error ppll_ext raises on purpose."""


class ConfigError(PPLLError, ValueError):
    """A configuration value, file or command-line override is invalid."""


class DataError(ConfigError):
    """A data set is missing, malformed or cannot be read."""


class CheckpointError(PPLLError):
    """A checkpoint is missing, corrupt or does not match the model."""


class PipelineError(PPLLError, RuntimeError):
    """A pipeline stage failed, timed out or received data it cannot use."""
