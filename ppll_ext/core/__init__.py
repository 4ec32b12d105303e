"""Local-learning core: blocks, auxiliary heads and partitioning (no distributed code)."""

from ppll_ext.core.aux import AUX_KINDS, build_aux_head
from ppll_ext.core.block import LocalBlock
from ppll_ext.core.partition import PARTITION_METHODS, partition

__all__ = ["AUX_KINDS", "PARTITION_METHODS", "LocalBlock", "build_aux_head", "partition"]
