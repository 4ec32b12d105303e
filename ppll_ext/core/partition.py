"""Cut an ordered list of layers into K contiguous bodies, one per pipeline stage.

Boundaries are returned as K+1 indices `b` with block k = layers[b[k]:b[k+1]].

`profile` measures forward+backward seconds and predicts each stage's time as body + aux head + send of its
output downstream, in two steps: per-layer times (with aux heads and sends) summed give a first choice and the
other splits within 15 % of it; those few are then timed as whole stages, which sums of layers misjudge (cache
effects between layers), and the preferred one is kept (the timing itself is core/profile.py). Among splits whose
predicted bottleneck is within `tolerance` of the best the most even one wins, so a few percent of noise does not
flip the choice between a balanced split and a lopsided one that is barely faster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ppll_ext.core.profile import (
    DEFAULT_TIMING,
    AuxFactory,
    LayerCosts,
    StageTime,
    Timing,
    activations,
    no_side_effects,
    profile_costs,
    time_splits,
    time_stages,
)
from ppll_ext.errors import ConfigError

log = logging.getLogger(__name__)

PARTITION_METHODS = ("uniform", "parameters", "profile")

TOLERANCE = 0.03
"""Splits whose predicted bottleneck is within this fraction of the best count as equally fast; the most even wins."""


def check_stages(num_layers: int, k: int) -> None:
    """ConfigError unless 1 <= k <= num_layers (every stage needs at least one layer)."""
    if k < 1:
        raise ConfigError(f"local.stages={k} must be at least 1")
    if k > num_layers:
        raise ConfigError(
            f"local.stages={k} is larger than the model's {num_layers} layers; use at most {num_layers} stages"
        )


def uniform_boundaries(num_layers: int, k: int) -> list[int]:
    """Equal layer counts (the first blocks take the remainder)."""
    check_stages(num_layers, k)
    base, extra = divmod(num_layers, k)
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


def balanced_boundaries(costs: Sequence[float], k: int, boundary_cost: Sequence[float] | None = None) -> list[int]:
    """Minimise the largest block cost (sum of its layers' costs + boundary_cost[end] of its aux head).

    Exact dynamic programme, O(K * n^2): fine for the few hundred layers of a real model.
    """
    n = len(costs)
    check_stages(n, k)
    extra = list(boundary_cost) if boundary_cost is not None else [0.0] * (n + 1)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def block(i: int, j: int) -> float:
        return prefix[j] - prefix[i] + (extra[j] if j < n else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    choice = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], block(i, j))
                if v < best[s][j]:
                    best[s][j], choice[s][j] = v, i
    bounds = [n]
    for s in range(k, 0, -1):
        bounds.append(choice[s][bounds[-1]])
    return bounds[::-1]


def parameter_counts(layers: Sequence[nn.Module]) -> list[int]:
    """Number of trainable parameters of each layer."""
    return [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in layers]


@dataclass(frozen=True)
class PartitionPlan:
    """A split and, when timed, each stage's predicted seconds; the pipeline runs at the pace of the slowest."""

    boundaries: list[int]
    """K+1 indices: stage k holds layers[boundaries[k]:boundaries[k+1]]."""
    method: str
    """The partition method that chose it (uniform | parameters | profile | explicit start layers)."""
    stages: list[StageTime] | None = None
    """Predicted seconds per stage; None when not timed."""
    notes: list[str] = field(default_factory=list)
    """How the times were obtained (for reports)."""

    @property
    def starts(self) -> str:
        """The split as local.partition accepts it: start layer of every stage, e.g. "0,6"."""
        return ",".join(str(b) for b in self.boundaries[:-1])

    @property
    def bottleneck_s(self) -> float | None:
        """The slowest stage's predicted seconds (None when not timed)."""
        return None if self.stages is None else max(s.total_s for s in self.stages)

    def shares(self) -> list[float] | None:
        """Each stage's predicted time over the bottleneck's: the busy fraction a stage would reach in a
        pipeline paced by the slowest one."""
        worst = self.bottleneck_s
        if self.stages is None or not worst:
            return None
        return [s.total_s / worst for s in self.stages]

    def to_dict(self) -> dict:
        """JSON-ready form: boundaries, starts, method, per-stage seconds and shares, bottleneck."""
        shares = self.shares()
        stages = None if self.stages is None else [
            {"body_s": s.body_s, "aux_s": s.aux_s, "send_s": s.send_s, "total_s": s.total_s,
             "share_of_bottleneck": shares[k] if shares else None} for k, s in enumerate(self.stages)]
        return {"method": self.method, "boundaries": self.boundaries, "starts": self.starts, "stages": stages,
                "bottleneck_s": self.bottleneck_s, "notes": self.notes}


def _spread_key(stage_s: Sequence[float], bounds: Sequence[int]) -> tuple[float, float, tuple[int, ...]]:
    """Order among equally fast splits: most even (smallest max - min), then fastest, then lowest boundaries."""
    return max(stage_s) - min(stage_s), max(stage_s), tuple(bounds)


def preferred(candidates: Sequence[tuple[Sequence[int], Sequence[float]]], tolerance: float = TOLERANCE) -> int:
    """Index of the split to take among (boundaries, stage seconds) candidates: of those whose bottleneck is within
    `tolerance` of the smallest, the most even (then the fastest, then the lowest boundaries)."""
    best = min(max(s) for _, s in candidates)
    limit = best * (1.0 + tolerance)
    eligible = [i for i, (_, s) in enumerate(candidates) if max(s) <= limit]
    return min(eligible, key=lambda i: _spread_key(candidates[i][1], candidates[i][0]))


class _Additive:
    """The additive cost model of a split: stage = its layers' costs + boundary_cost at its end (none at the last)."""

    def __init__(self, costs: Sequence[float], k: int, boundary_cost: Sequence[float] | None) -> None:
        self.n, self.k = len(costs), k
        self.extra = list(boundary_cost) if boundary_cost is not None else [0.0] * (self.n + 1)
        self.prefix = [0.0]
        for c in costs:
            self.prefix.append(self.prefix[-1] + float(c))
        self.best = balanced_boundaries(costs, k, boundary_cost)

    def block(self, i: int, j: int) -> float:
        return self.prefix[j] - self.prefix[i] + (self.extra[j] if j < self.n else 0.0)

    def stage_s(self, b: Sequence[int]) -> list[float]:
        return [self.block(b[s], b[s + 1]) for s in range(len(b) - 1)]

    def rest(self, limit: float) -> list[list[bool]]:
        """fits[s][i]: layers i..n-1 can be cut into s stages of at most `limit` each."""
        inf = float("inf")
        best = [[inf] * (self.n + 1) for _ in range(self.k + 1)]
        best[0][self.n] = 0.0
        for s in range(1, self.k + 1):
            for i in range(self.n - s, -1, -1):
                best[s][i] = min(max(self.block(i, j), best[s - 1][j]) for j in range(i + 1, self.n - s + 2))
        return [[v <= limit for v in row] for row in best]

    def search(self, limit: float, visit: Callable[[list[int], float, float], float], max_nodes: int) -> None:
        """Depth-first over every split whose stages all cost at most `limit`, lowest boundaries first; `visit`
        gets each complete split with its smallest and largest stage cost and returns the spread above which
        partial splits are pruned (inf: none). Stops after `max_nodes` partial splits."""
        fits = self.rest(limit)
        bounds = [0]
        nodes = 0
        prune = float("inf")

        def go(i: int, left: int, lo: float, hi: float) -> bool:
            nonlocal nodes, prune
            if left == 0:
                prune = visit(list(bounds), lo, hi)
                return True
            for j in range(i + 1, self.n - left + 2):
                if self.prefix[j] - self.prefix[i] > limit:
                    break
                c = self.block(i, j)
                if c > limit or not fits[left - 1][j] or max(hi, c) - min(lo, c) > prune:
                    continue
                nodes += 1
                if nodes > max_nodes:
                    log.debug("partition search stopped after %d partial splits; keeping what it found", max_nodes)
                    return False
                bounds.append(j)
                going = go(j, left - 1, min(lo, c), max(hi, c))
                bounds.pop()
                if not going:
                    return False
            return True

        go(0, self.k, float("inf"), float("-inf"))


def choose_split(costs: Sequence[float], k: int, boundary_cost: Sequence[float] | None = None,
                 tolerance: float = TOLERANCE, max_nodes: int = 200_000) -> list[int]:
    """The split `preferred` picks among all splits of the additive cost model (stage = its layers' costs +
    boundary_cost at its end), found exactly: a depth-first search over splits whose every stage stays within
    the tolerated bottleneck, pruned by feasibility of the rest and by the spread already reached.

    Deterministic: a pure function of the costs. Should the search visit more than `max_nodes` partial splits
    (thousands of layers), the best split found so far is returned (at worst the minimum-bottleneck one).
    """
    check_stages(len(costs), k)
    model = _Additive(costs, k, boundary_cost)
    start = model.best
    best = (_spread_key(model.stage_s(start), start), start)

    def visit(b: list[int], lo: float, hi: float) -> float:
        nonlocal best
        key = (hi - lo, hi, tuple(b))
        if key < best[0]:
            best = (key, b)
        return best[0][0]

    model.search(max(model.stage_s(start)) * (1.0 + tolerance), visit, max_nodes)
    return best[1]


def near_splits(costs: Sequence[float], k: int, boundary_cost: Sequence[float] | None = None,
                window: float = 0.15, limit: int = 6, tolerance: float = TOLERANCE,
                max_nodes: int = 200_000) -> list[list[int]]:
    """Up to `limit` splits whose additive bottleneck is within `window` of the best: `choose_split`'s first, then
    the fastest (then most even). They are the candidates timed whole, where the additive model's error (cache
    effects between layers, the first layer needing no input gradient) is larger than the tolerance."""
    check_stages(len(costs), k)
    model = _Additive(costs, k, boundary_cost)
    found: list[tuple[float, float, list[int]]] = []

    def visit(b: list[int], lo: float, hi: float) -> float:
        found.append((hi, hi - lo, b))
        return float("inf")

    model.search(max(model.stage_s(model.best)) * (1.0 + window), visit, max_nodes)
    first = choose_split(costs, k, boundary_cost, tolerance, max_nodes)
    rest = [b for _, _, b in sorted(found, key=lambda f: (f[0], f[1], tuple(f[2]))) if b != first]
    return [first, *rest[: limit - 1]]


def plan_from_costs(costs: LayerCosts, k: int, tolerance: float = TOLERANCE, method: str = "profile") -> PartitionPlan:
    """The split `choose_split` takes on measured layer costs, with its stage times predicted as sums: a pure
    function of the costs, so equal measurements always give the same plan."""
    bounds = choose_split(costs.layer_s, k, costs.boundary_s(), tolerance)
    return PartitionPlan(bounds, method, _sum_stages(costs, bounds), ["stage body = sum of its layers' times"])


def _sum_stages(costs: LayerCosts, bounds: Sequence[int]) -> list[StageTime]:
    return [StageTime(sum(costs.layer_s[bounds[s]:bounds[s + 1]]), costs.aux_s[bounds[s + 1]],
                      costs.send_s[bounds[s + 1]]) for s in range(len(bounds) - 1)]


def refine_plan(
    layers: Sequence[nn.Module],
    candidates: Sequence[Sequence[int]],
    example: torch.Tensor,
    costs: LayerCosts,
    timing: Timing = DEFAULT_TIMING,
    tolerance: float = TOLERANCE,
    acts: Sequence[torch.Tensor] | None = None,
) -> PartitionPlan:
    """The `preferred` split among `candidates` by whole-stage timings: every distinct stage body of every candidate
    timed in one interleaved set (per-layer sums miss cache and fusion effects between layers), aux and send costs
    from `costs`. One set and one rule for all candidates: no path through the splits for noise to bend."""
    with no_side_effects(layers):
        acts = list(acts) if acts is not None else activations(layers, example)
        times = time_splits(layers, candidates, acts, costs, timing)
    pick = preferred([(c, [st.total_s for st in t]) for c, t in zip(candidates, times, strict=True)], tolerance)
    log.debug("profile: candidates %s, stage seconds %s: took %s", [list(c) for c in candidates],
              [[round(st.total_s, 6) for st in t] for t in times], list(candidates[pick]))
    return PartitionPlan(list(candidates[pick]), "profile", times[pick],
                         ["stage body timed whole; aux head and send from the layer profile"])


def profile_plan(
    layers: Sequence[nn.Module],
    k: int,
    example: torch.Tensor,
    aux_factory: AuxFactory | None = None,
    timing: Timing = DEFAULT_TIMING,
    tolerance: float = TOLERANCE,
    window: float = 0.15,
) -> PartitionPlan:
    """local.partition=profile: time layers, aux heads and sends; take `choose_split`'s split of their sums and
    the other splits within `window` of it (`near_splits`), time those whole and keep the `preferred` one."""
    check_stages(len(layers), k)
    with no_side_effects(layers):
        acts = activations(layers, example)
        costs = profile_costs(layers, example, aux_factory, timing, acts)
        if k == 1:
            return plan_from_costs(costs, k, tolerance)
        cands = near_splits(costs.layer_s, k, costs.boundary_s(), window, tolerance=tolerance)
        return refine_plan(layers, cands, example, costs, timing, tolerance, acts)


def parse_explicit(spec: str, num_layers: int, k: int) -> list[int]:
    """'0,5,9' (start layer of each block) -> boundaries [0, 5, 9, num_layers], validated."""
    try:
        starts = [int(s) for s in spec.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise ConfigError(
            f"local.partition={spec!r} is neither {', '.join(PARTITION_METHODS)} nor a list of start layers like 0,5,9"
        ) from None
    if len(starts) != k:
        raise ConfigError(f"local.partition={spec!r} gives {len(starts)} blocks but local.stages={k}; make them agree")
    bounds = starts + [num_layers]
    if starts[0] != 0 or any(bounds[i] >= bounds[i + 1] for i in range(k)):
        raise ConfigError(
            f"local.partition={spec!r}: start layers must begin at 0 and strictly increase below {num_layers}"
        )
    return bounds


def partition_plan(
    layers: Sequence[nn.Module],
    k: int,
    method: str,
    *,
    example: torch.Tensor | None = None,
    aux_factory: AuxFactory | None = None,
    timed: bool = False,
    timing: Timing = DEFAULT_TIMING,
    tolerance: float = TOLERANCE,
) -> PartitionPlan:
    """The split of K blocks by `method` (uniform | parameters | profile | explicit start layers '0,5,9') as a plan;
    profile always has predicted stage times, the other methods only with timed=True (then they are measured)."""
    n = len(layers)
    check_stages(n, k)
    if method == "profile" or timed:
        if example is None:
            raise ConfigError(f"local.partition={method} needs an example input batch to time the layers")
    if method == "profile":
        return profile_plan(layers, k, example, aux_factory, timing, tolerance)
    if method == "uniform":
        bounds = uniform_boundaries(n, k)
    elif method == "parameters":
        bounds = balanced_boundaries(parameter_counts(layers), k)
    else:
        bounds = parse_explicit(method, n, k)
    if not timed:
        return PartitionPlan(bounds, method)
    return PartitionPlan(bounds, method, time_stages(layers, bounds, example, aux_factory, timing),
                         ["stage body timed whole, with its aux head and send"])


def partition(
    layers: Sequence[nn.Module],
    k: int,
    method: str,
    *,
    example: torch.Tensor | None = None,
    aux_factory: AuxFactory | None = None,
) -> list[int]:
    """Boundaries of K blocks by `method`: uniform | parameters | profile | explicit start layers '0,5,9'."""
    return partition_plan(layers, k, method, example=example, aux_factory=aux_factory).boundaries
