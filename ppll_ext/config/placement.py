"""local.engine=torch: the torch.distributed.pipelining schedule that local.schedule names, how many of the
local.stages pipeline stages each process holds and which ones, and the combinations that cannot run, refused when
the config is checked (before any process starts; LocalConfig.placement and Config.check use this module).

Stages are placed as torch's schedules expect them (`torch.distributed.pipelining._utils`, the mapping the schedules
themselves use): one per rank for single-stage schedules (GPipe, 1F1B, PPLL); looped for the other multi-stage ones
(Interleaved1F1B, InterleavedZeroBubble, LoopedBFS: rank r holds r, r + R, r + 2R, ...); V-shaped for ZBVZeroBubble
and DualPipeV (rank r holds r and 2R - 1 - r, so rank 0 holds the first and the last stage).
"""

from __future__ import annotations

from dataclasses import dataclass

from ppll_ext.errors import ConfigError

PPLL = "PPLL"
"""local.schedule of local learning: ppll_ext.pipelining.SchedulePPLL (one stage per rank, aux heads)."""
STOCK = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV", "LoopedBFS")
"""torch's own schedules (get_schedule_class's names, for messages; any name it resolves is accepted)."""


@dataclass(frozen=True)
class Placement:
    """Which schedule runs and where its stages live."""

    name: str
    """local.schedule as given."""
    schedule: type | None
    """torch's schedule class; None for PPLL (ppll_ext.pipelining.SchedulePPLL, built by the engine)."""
    stages: int
    ranks: int
    per_rank: int
    style: str
    """"loop" or "v", as torch's generate_stage_to_rank_mapping takes it."""

    @property
    def end_to_end(self) -> bool:
        """A stock schedule: end-to-end backprop through the stages (no aux heads, one optimizer step per stage)."""
        return self.schedule is not None

    @property
    def multi(self) -> bool:
        """The schedule takes a list of stages per rank (torch's PipelineScheduleMulti)."""
        from torch.distributed.pipelining.schedules import PipelineScheduleMulti

        return self.schedule is not None and issubclass(self.schedule, PipelineScheduleMulti)

    def owners(self) -> dict[int, int]:
        """{stage: rank holding it}."""
        from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

        return generate_stage_to_rank_mapping(self.ranks, self.stages, self.style)

    def stages_of(self, rank: int) -> list[int]:
        """The stages `rank` holds, in increasing order."""
        return sorted(s for s, r in self.owners().items() if r == rank)


def placement(name: str, stages: int, stages_per_rank: int = 0) -> Placement:
    """Schedule `name` (local.schedule) resolved and its `stages` placed, `stages_per_rank` each (0: the schedule's
    own number): ConfigError (key local.schedule, local.stages_per_rank or local.stages) for an unknown schedule or a
    number of stages the schedule cannot take."""
    from torch.distributed.pipelining.schedules import (
        PipelineScheduleMulti,
        PipelineScheduleSingle,
        ScheduleDualPipeV,
        ScheduleZBVZeroBubble,
        get_schedule_class,
    )

    if name.lower() == PPLL.lower():
        cls = None
    else:
        try:
            cls = get_schedule_class(name)
        except ValueError:
            cls = None
        if cls is None or cls in (PipelineScheduleSingle, PipelineScheduleMulti) or not issubclass(
                cls, (PipelineScheduleSingle, PipelineScheduleMulti)):
            raise ConfigError(f"local.schedule={name!r} names no schedule torch.distributed.pipelining runs; use "
                              f"{PPLL} or one of {', '.join(STOCK)}", key="local.schedule")
    multi = cls is not None and issubclass(cls, PipelineScheduleMulti)
    v_shaped = cls is not None and issubclass(cls, (ScheduleZBVZeroBubble, ScheduleDualPipeV))
    per_rank = stages_per_rank or (2 if multi else 1)
    wrong = None
    if not multi and per_rank != 1:
        wrong = "runs one stage per rank"
    elif v_shaped and per_rank != 2:
        wrong = "places exactly 2 stages per rank, V-shaped"
    elif multi and per_rank < 2:
        wrong = "takes at least 2 stages per rank, looped"
    if wrong:
        raise ConfigError(f"local.schedule={name} {wrong}, not local.stages_per_rank={per_rank}; set "
                          f"local.stages_per_rank to 0 (chosen from the schedule)", key="local.stages_per_rank")
    if stages % per_rank:
        raise ConfigError(f"local.stages={stages} does not split into {per_rank} stages per rank "
                          f"(local.schedule={name}); set local.stages to a multiple of {per_rank}",
                          key="local.stages")
    return Placement(name, cls, stages, stages // per_rank, per_rank, "v" if v_shaped else "loop")


def check_micro_batches(p: Placement, m: int) -> None:
    """ConfigError (key local.micro_batches) for a number of micro-batches `p`'s torch schedule refuses."""
    from torch.distributed.pipelining.schedules import (
        Schedule1F1B,
        ScheduleDualPipeV,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    need = fix = None
    if issubclass(p.schedule, Schedule1F1B) and m < p.ranks:
        need, fix = f"at least as many micro-batches as stages ({p.ranks})", f"{p.ranks} or more"
    elif issubclass(p.schedule, ScheduleDualPipeV) and m < p.stages:
        need, fix = f"at least as many micro-batches as stages ({p.stages})", f"{p.stages} or more"
    elif issubclass(p.schedule, (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)):
        rounds = max(1, m // p.ranks)
        if m % rounds:
            need, fix = f"a multiple of its {rounds} rounds (M // ranks) of micro-batches", f"{p.ranks * rounds}"
    if need:
        raise ConfigError(f"local.schedule={p.name} needs {need}, not local.micro_batches={m}; set "
                          f"local.micro_batches={fix}", key="local.micro_batches")
