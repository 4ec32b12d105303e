"""Local-learning core: blocks, auxiliary heads, partitioning and tasks (no distributed code)."""

from ppll_ext.core.aux_heads import AUX_KINDS, aux_seed, build_aux_head, build_stage_aux_head
from ppll_ext.core.block import AUTOCAST, ON_NAN, LocalBlock, TorchUpdater, Updater
from ppll_ext.core.partition import PARTITION_METHODS, PartitionPlan, StageTime, partition, partition_plan
from ppll_ext.core.tasks import TASKS, NextTokenLoss, Score, make_loss

__all__ = ["AUTOCAST", "AUX_KINDS", "ON_NAN", "PARTITION_METHODS", "TASKS", "LocalBlock", "NextTokenLoss",
           "PartitionPlan", "Score", "StageTime", "TorchUpdater", "Updater", "aux_seed", "build_aux_head",
           "build_stage_aux_head", "make_loss", "partition", "partition_plan"]
