"""Runtimes that execute local blocks: sequential (reference), threads and processes."""

from ppll_ext.runtime.base import EpochStats, EvalCounts, EvalResult, StageStats, eval_result, split_micro
from ppll_ext.runtime.processes import ProcessRunner
from ppll_ext.runtime.sequential import SequentialRunner, evaluate_blocks
from ppll_ext.runtime.threads import ThreadRunner

__all__ = ["EpochStats", "EvalCounts", "EvalResult", "ProcessRunner", "SequentialRunner", "StageStats",
           "ThreadRunner", "eval_result", "evaluate_blocks", "split_micro"]
