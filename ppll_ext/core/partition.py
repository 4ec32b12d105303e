"""Cut an ordered list of layers into K contiguous bodies, one per pipeline stage.

Boundaries are returned as K+1 indices `b` with block k = layers[b[k]:b[k+1]].
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ppll_ext.errors import ConfigError

PARTITION_METHODS = ("uniform", "parameters", "profile")


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


def _time_fwd_bwd(module: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of forward+backward of `module` on `x`, and its (detached) output."""
    times = []
    out = None
    for _ in range(repeats + 1):
        inp = x.detach().requires_grad_(x.is_floating_point())
        start = time.perf_counter()
        out = module(inp)
        out.float().sum().backward()
        times.append(time.perf_counter() - start)
    module.zero_grad(set_to_none=True)
    return statistics.median(times[1:]), out.detach()


def profile_costs(
    layers: Sequence[nn.Module],
    example: torch.Tensor,
    aux_factory: Callable[[torch.Tensor], nn.Module] | None = None,
    repeats: int = 3,
) -> tuple[list[float], list[float]]:
    """Measured forward+backward seconds of each layer, and of the aux head that would follow each layer.

    The aux head's cost is measured once per distinct activation shape (heads of equal input shape cost the same).
    """
    layer_t: list[float] = []
    aux_t: list[float] = [0.0]
    cache: dict[tuple[int, ...], float] = {}
    h = example
    for i, m in enumerate(layers):
        t, h = _time_fwd_bwd(m, h, repeats)
        layer_t.append(t)
        if aux_factory is None or i == len(layers) - 1:
            aux_t.append(0.0)
            continue
        key = tuple(h.shape)
        if key not in cache:
            cache[key] = _time_fwd_bwd(aux_factory(h), h, repeats)[0]
        aux_t.append(cache[key])
    return layer_t, aux_t


def refine_boundaries(
    layers: Sequence[nn.Module],
    bounds: list[int],
    example: torch.Tensor,
    aux_factory: Callable[[torch.Tensor], nn.Module] | None = None,
    repeats: int = 3,
) -> list[int]:
    """Hill-climb from `bounds` on measured whole-stage times (body + aux head, input detached as in training).

    Per-layer sums miss cache and fusion effects between layers; moving one boundary by one layer
    while the slowest stage gets faster corrects for them at a cost of a few stage timings.
    """
    n = len(layers)
    with torch.no_grad():
        acts = [example]
        for m in layers:
            acts.append(m(acts[-1]))
    cache: dict[tuple[int, int], float] = {}

    def stage_time(i: int, j: int) -> float:
        if (i, j) not in cache:
            parts = list(layers[i:j])
            if aux_factory is not None and j < n:
                parts.append(aux_factory(acts[j]))
            stage = nn.Sequential(*parts)
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                stage(acts[i]).float().sum().backward()
                times.append(time.perf_counter() - start)
            stage.zero_grad(set_to_none=True)
            cache[i, j] = statistics.median(times[1:])
        return cache[i, j]

    def cost(b: list[int]) -> float:
        return max(stage_time(b[k], b[k + 1]) for k in range(len(b) - 1))

    best, best_cost = list(bounds), cost(bounds)
    for _ in range(2 * len(bounds)):
        moves = []
        for t in range(1, len(best) - 1):
            for delta in (-1, 1):
                cand = list(best)
                cand[t] += delta
                if cand[t - 1] < cand[t] < cand[t + 1]:
                    moves.append((cost(cand), cand))
        if not moves or min(moves)[0] >= best_cost:
            break
        best_cost, best = min(moves)
    return best


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


def partition(
    layers: Sequence[nn.Module],
    k: int,
    method: str,
    *,
    example: torch.Tensor | None = None,
    aux_factory: Callable[[torch.Tensor], nn.Module] | None = None,
) -> list[int]:
    """Boundaries of K blocks by `method`: uniform | parameters | profile | explicit start layers '0,5,9'."""
    n = len(layers)
    check_stages(n, k)
    if method == "uniform":
        return uniform_boundaries(n, k)
    if method == "parameters":
        return balanced_boundaries(parameter_counts(layers), k)
    if method == "profile":
        if example is None:
            raise ConfigError("local.partition=profile needs an example input batch to time the layers")
        layer_t, aux_t = profile_costs(layers, example, aux_factory)
        return refine_boundaries(layers, balanced_boundaries(layer_t, k, aux_t), example, aux_factory)
    return parse_explicit(method, n, k)
