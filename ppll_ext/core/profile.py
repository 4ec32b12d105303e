"""The partitioner's timing harness: forward+backward seconds of layers, aux heads, sends and whole stage bodies.

The measurements are built to give the same split on a noisy machine: every timed piece runs in interleaved rounds
(drift hits all alike), warm-up rounds are discarded, each piece keeps the median CPU time of a time-bounded number
of rounds (other processes do not inflate it), and timing leaves no trace on the model (buffers, gradients and
random numbers restored).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ppll_ext.errors import ConfigError

log = logging.getLogger(__name__)

AuxFactory = Callable[[torch.Tensor], nn.Module]
"""Builds the aux head that would follow an activation shaped like its argument (for timing only)."""

CLOCKS = ("auto", "cpu", "wall")


@dataclass(frozen=True)
class Timing:
    """How a set of pieces is timed: `warmup` discarded rounds, then rounds of every piece in turn until each has
    `min_rounds` samples and the rounds have used `budget_s` of wall time, or `max_rounds` samples; each piece's
    median counts. Cheap pieces thus get many samples, expensive ones at least min_rounds."""

    warmup: int = 1
    """Untimed rounds first (allocator, kernel selection, caches)."""
    min_rounds: int = 5
    """Timed rounds at least, whatever the budget."""
    max_rounds: int = 41
    """Timed rounds at most."""
    budget_s: float = 1.0
    """Wall seconds of timed rounds after which no further round starts (once min_rounds are done)."""
    clock: str = "auto"
    """cpu: this process's CPU time (other processes competing for the cores do not inflate it, so a shared machine
    still gives the same split); wall: elapsed time, the device synchronised; auto: wall when CUDA is in use,
    otherwise cpu."""


DEFAULT_TIMING = Timing()
"""The Timing a caller that names none gets."""


def measure_interleaved(jobs: Sequence[Callable[[], object]], timing: Timing = Timing()) -> list[float]:
    """Median seconds of each job, timed in rounds that run every job once in turn (never one job many times in a
    row), so slow drift of the machine shifts every job alike instead of whichever happened to run during it."""
    if timing.clock not in CLOCKS:
        raise ConfigError(f"Timing clock={timing.clock!r} is not one of {', '.join(CLOCKS)}", key="clock")
    if not jobs:
        return []
    wall = timing.clock == "wall" or (timing.clock == "auto" and torch.cuda.is_initialized())
    clock = time.perf_counter if wall else time.process_time
    for _ in range(timing.warmup):
        for job in jobs:
            job()
    samples: list[list[float]] = [[] for _ in jobs]
    deadline = time.perf_counter() + timing.budget_s
    while True:
        for job, times in zip(jobs, samples, strict=True):
            start = clock()
            job()
            times.append(clock() - start)
        done = len(samples[0])
        if done >= timing.max_rounds or (done >= timing.min_rounds and time.perf_counter() >= deadline):
            return [statistics.median(times) for times in samples]


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def fwd_bwd(module: nn.Module, x: torch.Tensor, input_grad: bool) -> Callable[[], None]:
    """One forward+backward of `module` on `x`; the input needs a gradient when it is mid-stage (input_grad)."""

    def run() -> None:
        inp = x.detach().requires_grad_(input_grad and x.is_floating_point())
        out = module(inp)
        out.float().sum().backward()
        _sync(out)

    return run


def copy_job(h: torch.Tensor) -> Callable[[], None]:
    """One copy of `h`'s bytes into a preallocated buffer: the send cost model (see profile_costs)."""
    dst = torch.empty_like(h)

    def run() -> None:
        dst.copy_(h)
        _sync(dst)

    return run


@contextlib.contextmanager
def no_side_effects(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Timing runs training-mode forwards: restore the buffers they touch (BatchNorm running statistics), drop the
    gradients they leave and the random numbers they draw, so profiling does not change the run that follows."""
    buffers = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m in modules:
                m.zero_grad(set_to_none=True)


def activations(layers: Sequence[nn.Module], example: torch.Tensor) -> list[torch.Tensor]:
    """[example, output of layer 0, output of layer 1, ...] without gradients: every layer's and stage's input."""
    with torch.no_grad():
        acts = [example]
        for m in layers:
            acts.append(m(acts[-1]))
    return acts


@dataclass(frozen=True)
class LayerCosts:
    """Measured seconds of one forward+backward: of each layer, and at each cut position j (0..n) of the aux head
    that would follow layer j-1 and of sending its output downstream (0 at j = n: the last stage has neither)."""

    layer_s: list[float]
    aux_s: list[float]
    send_s: list[float]

    def boundary_s(self) -> list[float]:
        """aux + send at each cut position: what a stage ending there pays on top of its layers."""
        return [a + s for a, s in zip(self.aux_s, self.send_s, strict=True)]


def profile_costs(
    layers: Sequence[nn.Module],
    example: torch.Tensor,
    aux_factory: AuxFactory | None = None,
    timing: Timing = Timing(),
    acts: Sequence[torch.Tensor] | None = None,
) -> LayerCosts:
    """Forward+backward seconds of every layer and of the aux head after each layer, and the send cost of each
    layer's output, all timed in the same interleaved rounds.

    Aux heads and sends are timed once per distinct activation shape (equal shapes cost the same). The send cost is
    one copy of the output's bytes on this device: the least any send does on the sending side (gloo over loopback
    copies the tensor into the socket at least once). It is a lower bound; the bandwidth of a real network or PCIe
    link and the receiver's copy are not modelled.
    """
    n = len(layers)
    with no_side_effects(layers):
        acts = list(acts) if acts is not None else activations(layers, example)
        jobs: list[Callable[[], None]] = [fwd_bwd(m, acts[i], True) for i, m in enumerate(layers)]
        aux_job: dict[tuple, int] = {}
        send_job: dict[tuple, int] = {}
        for j in range(1, n):
            key = _shape_key(acts[j])
            if aux_factory is not None and key not in aux_job:
                aux_job[key] = len(jobs)
                jobs.append(fwd_bwd(aux_factory(acts[j]), acts[j], False))
            if key not in send_job:
                send_job[key] = len(jobs)
                jobs.append(copy_job(acts[j]))
        seconds = measure_interleaved(jobs, timing)
    aux_s, send_s = [0.0] * (n + 1), [0.0] * (n + 1)
    for j in range(1, n):
        key = _shape_key(acts[j])
        aux_s[j] = seconds[aux_job[key]] if key in aux_job else 0.0
        send_s[j] = seconds[send_job[key]]
    return LayerCosts(seconds[:n], aux_s, send_s)


def _shape_key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype


@dataclass(frozen=True)
class StageTime:
    """Predicted seconds of one forward+backward of a stage on one (micro-)batch, by part."""

    body_s: float
    """The stage's layers."""
    aux_s: float
    """Its aux head (0 on the last stage)."""
    send_s: float
    """Sending its output downstream (0 on the last stage)."""

    @property
    def total_s(self) -> float:
        """body + aux + send: the stage's busy time per (micro-)batch."""
        return self.body_s + self.aux_s + self.send_s


def body_jobs(layers: Sequence[nn.Module], spans: Sequence[tuple[int, int]], acts: Sequence[torch.Tensor]
               ) -> list[Callable[[], None]]:
    """Forward+backward of each span of layers as one stage body, its input detached as in training (timed whole:
    per-layer sums miss cache and fusion effects between layers)."""
    return [fwd_bwd(nn.Sequential(*layers[i:j]), acts[i], False) for i, j in spans]


def time_stages(
    layers: Sequence[nn.Module],
    bounds: Sequence[int],
    example: torch.Tensor,
    aux_factory: AuxFactory | None = None,
    timing: Timing = Timing(),
) -> list[StageTime]:
    """Predicted seconds of each stage of a given split: its body timed whole, its aux head and its send (one copy
    of its output, see profile_costs), all in the same interleaved rounds."""
    n = len(layers)
    spans = [(bounds[s], bounds[s + 1]) for s in range(len(bounds) - 1)]
    with no_side_effects(layers):
        acts = activations(layers, example)
        jobs = body_jobs(layers, spans, acts)
        cuts = [j for _, j in spans if j < n]
        if aux_factory is not None:
            jobs += [fwd_bwd(aux_factory(acts[j]), acts[j], False) for j in cuts]
        jobs += [copy_job(acts[j]) for j in cuts]
        seconds = measure_interleaved(jobs, timing)
    k, c = len(spans), len(cuts)
    aux = seconds[k:k + c] if aux_factory is not None else [0.0] * c
    send = seconds[-c:] if c else []
    return [StageTime(seconds[s], aux[s] if s < c else 0.0, send[s] if s < c else 0.0) for s in range(k)]


def time_splits(layers: Sequence[nn.Module], splits: Sequence[Sequence[int]], acts: Sequence[torch.Tensor],
                 costs: LayerCosts, timing: Timing) -> list[list[StageTime]]:
    """Stage times of each split: every distinct stage body timed whole in one interleaved set, aux and send from
    `costs`."""
    spans = sorted({(c[s], c[s + 1]) for c in splits for s in range(len(c) - 1)})
    body = dict(zip(spans, measure_interleaved(body_jobs(layers, spans, acts), timing), strict=True))
    return [[StageTime(body[c[s], c[s + 1]], costs.aux_s[c[s + 1]], costs.send_s[c[s + 1]])
             for s in range(len(c) - 1)] for c in splits]
