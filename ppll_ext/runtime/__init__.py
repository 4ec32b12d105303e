"""Runtimes that execute local blocks: sequential (reference), threads and processes."""

from ppll_ext.runtime.base import EpochStats, EvalResult, StageStats, split_micro
from ppll_ext.runtime.sequential import SequentialRunner, evaluate_blocks

__all__ = ["EpochStats", "EvalResult", "SequentialRunner", "StageStats", "evaluate_blocks", "split_micro"]
