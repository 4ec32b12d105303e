"""The training job and the one loop every engine runs."""

from ppll_ext.train.job import Job, preflight, prepare
from ppll_ext.train.loop import Engine, Summary, epoch_line, run_loop, steps_per_epoch
from ppll_ext.train.run import run_training

__all__ = ["Engine", "Job", "Summary", "epoch_line", "preflight", "prepare", "run_loop", "run_training",
           "steps_per_epoch"]
