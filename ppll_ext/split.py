"""`ppll partition`: the split a config gives, with each stage's layers, parameters and predicted seconds.

Nothing is trained and no data is read beyond its shape: the model is built on the CPU from the config and timed
on a synthetic batch of one micro-batch's rows, as `local.partition=profile` times it at the start of a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppll_ext.build import build_layered, stage_plan
from ppll_ext.config import Config
from ppll_ext.core import PartitionPlan
from ppll_ext.core.partition import check_stages, parameter_counts
from ppll_ext.data import dataset_shape
from ppll_ext.models import LayeredModel


@dataclass(frozen=True)
class SplitReport:
    """A config's plan and what each stage holds."""

    model: str
    rows: int
    """Rows of the timed batch: train.batch_size / local.micro_batches."""
    threads: int
    """torch threads the timing ran on (a stage's, see train.threads)."""
    plan: PartitionPlan
    layer_names: list[str]
    stage_params: list[int]

    def to_dict(self) -> dict:
        """JSON-ready: the plan, every stage with its layer range, layer names and parameter count (and predicted
        seconds when timed)."""
        doc = self.plan.to_dict()
        b = self.plan.boundaries
        timed = doc["stages"] or [{} for _ in range(len(b) - 1)]
        doc["stages"] = [{"first_layer": b[k], "last_layer": b[k + 1] - 1, "layers": self.layer_names[b[k]:b[k + 1]],
                          "params": self.stage_params[k], **t} for k, t in enumerate(timed)]
        return {"model": self.model, "rows": self.rows, "threads": self.threads, **doc}


def example_batch(cfg: Config, shape: dict[str, int]) -> torch.Tensor:
    """A synthetic batch of one micro-batch's rows shaped like the data: normal pixels or random token ids."""
    rows = cfg.train.batch_size // cfg.local.micro_batches
    gen = torch.Generator().manual_seed(cfg.train.seed)
    if "seq_len" in shape:
        return torch.randint(0, shape["num_classes"], (rows, shape["seq_len"]), generator=gen)
    return torch.randn(rows, shape["in_channels"], shape["image_size"], shape["image_size"], generator=gen)


def layer_names(layered: LayeredModel) -> list[str]:
    """A name per layer from the unsplit model's parameter names: the module holding all its parameters (layer1.0),
    else the modules they come from joined by '+' (conv1+bn1), a parameter's own name where its module also holds
    other layers' parameters; the layer's class name when it has no parameters."""
    owner = {id(p): name for name, p in layered.model.named_parameters()}
    per_layer = [[owner[id(p)] for p in layer.parameters() if id(p) in owner] for layer in layered.layers]
    layer_of = {name: i for i, names in enumerate(per_layer) for name in names}

    def only_in(prefix: str, i: int) -> bool:
        return bool(prefix) and all(j == i for name, j in layer_of.items() if name.startswith(prefix + "."))

    out = []
    for i, (layer, names) in enumerate(zip(layered.layers, per_layer, strict=True)):
        common = _common_prefix([n.split(".") for n in names])
        if not names:
            out.append(type(layer).__name__)
        elif common not in names and only_in(common, i):
            out.append(common)
        else:
            parts = [n.rpartition(".")[0] if only_in(n.rpartition(".")[0], i) else n for n in names]
            out.append("+".join(dict.fromkeys(parts)))
    return out


def _common_prefix(paths: list[list[str]]) -> str:
    prefix: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def split_report(cfg: Config, *, timed: bool = True) -> SplitReport:
    """Build the model on the CPU and run cfg.local.partition on it (timing the stages unless timed=False; profile
    always times). ConfigError/DataError on bad input, before any timing."""
    threads = cfg.train.threads or 1
    torch.set_num_threads(threads)
    shape = dataset_shape(cfg.data)
    layered = build_layered(cfg, **shape)
    check_stages(len(layered.layers), cfg.local.stages)
    plan = stage_plan(cfg, layered, example_batch(cfg, shape), timed=timed)
    counts = parameter_counts(layered.layers)
    b = plan.boundaries
    params = [sum(counts[b[k]:b[k + 1]]) for k in range(len(b) - 1)]
    return SplitReport(layered.name, cfg.train.batch_size // cfg.local.micro_batches, threads, plan,
                       layer_names(layered), params)


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 2 else f"{names[0]} .. {names[-1]}"


def format_report(report: SplitReport) -> str:
    """The split as a table: per stage its layer range, layer names, parameters, predicted milliseconds per
    micro-batch (body, aux head, send, total) and share of the bottleneck."""
    plan = report.plan
    lines = [f"{report.model}: {len(plan.boundaries) - 1} stage(s) by local.partition={plan.method}, start layers "
             f"{plan.starts}; times: forward+backward of one micro-batch of {report.rows} rows on {report.threads} "
             f"torch thread(s)" + (f" ({'; '.join(plan.notes)})" if plan.notes else "")]
    header = f"{'stage':>5}  {'layers':>7}  {'params':>10}  {'body ms':>8}  {'aux ms':>7}  {'send ms':>7}  " \
             f"{'total ms':>8}  {'share':>5}  names"
    lines += [header]
    shares = plan.shares()
    b = plan.boundaries
    for k in range(len(b) - 1):
        span = f"{b[k]}-{b[k + 1] - 1}" if b[k + 1] - 1 > b[k] else str(b[k])
        if plan.stages is None or shares is None:
            timing = f"{'not timed':>8}  {'':>7}  {'':>7}  {'':>8}  {'':>5}"
        else:
            s = plan.stages[k]
            timing = f"{s.body_s * 1e3:8.2f}  {s.aux_s * 1e3:7.2f}  {s.send_s * 1e3:7.2f}  {s.total_s * 1e3:8.2f}  " \
                     f"{shares[k]:5.0%}"
        lines.append(f"{k:>5}  {span:>7}  {report.stage_params[k]:>10,}  {timing}  "
                     f"{_names(report.layer_names[b[k]:b[k + 1]])}")
    worst = plan.bottleneck_s
    if worst:
        slow = [k for k, share in enumerate(shares or []) if share == 1.0]
        lines.append(f"bottleneck: stage {slow[0]}, {worst * 1e3:.2f} ms per micro-batch: at most "
                     f"{report.rows / worst:.0f} samples/s with every stage on a core of its own")
    else:
        lines.append("not timed (--no-time): the split only")
    return "\n".join(lines)
