"""ppll_ext: pipeline parallelism based on local learning (PPLL, arXiv 2411.12780)."""

from ppll_ext.errors import CheckpointError, ConfigError, DataError, PipelineError, PPLLError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "PipelineError", "PPLLError", "__version__"]
