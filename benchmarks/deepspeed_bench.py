"""PPLL through ppll_ext's DeepSpeed adapter against stock DeepSpeed pipeline parallelism (PipelineModule +
TrainSchedule, i.e. 1F1B) on the same layers, cut, micro-batches, batch and optimizer.

Both run under the real `deepspeed` launcher, 2 processes x 1 torch thread, gloo on CPU, with the ds_configs in
configs/deepspeed/ (ppll.json and stock_1f1b.json hold the same hyper-parameters; the batch size and
gradient_accumulation_steps = micro-batches are set here). Methods are interleaved and the median of the repeats
is reported with the ratio.

    python benchmarks/deepspeed_bench.py            # ResNet-32 and ViT, 3 repeats
    python benchmarks/deepspeed_bench.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from common import machine, ratio_rows, run_json, write_results
from deepspeed.runtime.pipe.module import PipelineModule
from memprobe import StageProbe, rows, tensors_in, watch_links
from probe import gather, peak_rss_mb
from runtime_bench import ALL_MODELS, MODELS, bench_config, model_shape, profiled_partition, synthetic_batches
from torch import nn

from ppll_ext.build import build_layered
from ppll_ext.core import make_loss
from ppll_ext.core.partition import parse_explicit
from ppll_ext.runtime import shutdown

METHODS = ("ds-1f1b", "ds-ppll")
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"ds-1f1b": REPO / "configs" / "deepspeed" / "stock_1f1b.json",
           "ds-ppll": REPO / "configs" / "deepspeed" / "ppll.json"}


class Contiguous(nn.Module):
    """gloo sends only contiguous tensors; torchvision's ViT blocks return a transposed view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


class CutPipelineModule(PipelineModule):
    """Stock PipelineModule cut at explicit start layers (stock DeepSpeed offers only uniform/parameters/type:)."""

    def _partition_layers(self, method: str = "parameters") -> None:
        self.parts = parse_explicit(method, self._num_layers, self.num_stages)
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])


def ds_cmd(model: str, method: str, batch: int, micro: int, warmup: int, steps: int, partition: str,
           nproc: int = 2, memory: bool = False) -> list[str]:
    """The deepspeed launcher command of one measurement (`nproc` processes, one per stage); it prints one JSON
    line on rank 0 (with `memory`, every stage's StageMemory too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(Path(__file__).resolve()), "--worker", method, "--model", model, "--batch-size", str(batch),
            "--microbatches", str(micro), "--warmup", str(warmup), "--steps", str(steps), "--partition", partition,
            *(["--memory"] if memory else [])]


def worker(model: str, method: str, batch: int, micro: int, warmup: int, steps: int, partition: str,
           memory: bool = False) -> dict | None:
    """This rank's stage trained with `method`; rank 0 returns samples/s, busy fractions and peak RSS per rank,
    and with `memory` every stage's StageMemory (memprobe)."""
    from ppll_ext.deepspeed import LocalPipelineModule, initialize, release_shm_buffer

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    with shutdown.closing_group():  # links closed, barrier, group destroyed, also on errors
        release_shm_buffer()
        rank, world = dist.get_rank(), dist.get_world_size()
        cfg = bench_config(model, "processes", world, batch, partition)
        layered = build_layered(cfg, **model_shape(model))
        bounds = parse_explicit(partition, len(layered.layers), world)
        layers = [nn.Sequential(layer, Contiguous()) if i + 1 in bounds[1:-1] else layer
                  for i, layer in enumerate(layered.layers)]
        conf = json.loads(CONFIGS[method].read_text())
        conf.update(train_micro_batch_size_per_gpu=batch // micro, gradient_accumulation_steps=micro,
                    steps_per_print=10**9)
        loss_fn = make_loss(cfg.task)
        if method == "ds-ppll":
            example = synthetic_batches(1, 2, seed=1, model=model)[0][0]
            net = LocalPipelineModule(layers, num_stages=world, loss_fn=loss_fn, aux_heads=cfg.local.aux,
                                      example_input=example, aux_hidden=cfg.local.aux_hidden,
                                      partition_method=partition)
            engine, *_ = initialize(model=net, config=conf, model_parameters=[p for p in net.parameters()])
        else:
            net = CutPipelineModule(layers, num_stages=world, loss_fn=loss_fn, partition_method=partition)
            engine, *_ = deepspeed.initialize(model=net, config=conf, model_parameters=[p for p in net.parameters()])
        feeds = rank == 0 or (method == "ds-1f1b" and rank == world - 1)  # stock: the last stage reads the labels

        def run(data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
            dist.barrier()
            start = time.perf_counter()
            for x, y in data:
                micro_batches = list(zip(x.chunk(micro), y.chunk(micro), strict=True))
                engine.train_batch(iter(micro_batches) if feeds else None)
            if method == "ds-ppll":
                engine.flush()
            dist.barrier()
            return time.perf_counter() - start

        mem = _memory_probe(engine) if memory else None
        with mem.meter if mem is not None else contextlib.nullcontext():  # a process per stage: all its saves
            run(synthetic_batches(warmup, batch, seed=2, model=model))
            if mem is not None:
                mem.reset()
            waits = (getattr(engine, "wait_in_s", 0.0), getattr(engine, "wait_out_s", 0.0))
            seconds = run(synthetic_batches(steps, batch, seed=3, model=model))
        waited = getattr(engine, "wait_in_s", 0.0) + getattr(engine, "wait_out_s", 0.0) - sum(waits)
        busy = 1.0 - waited / seconds if method == "ds-ppll" else None
        per_rank = gather((busy, peak_rss_mb(), mem.result() if mem else None))
        if rank != 0:
            return None
        out = {"samples_per_s": steps * batch / seconds, "seconds": seconds, "boundaries": bounds,
               "peak_rss_mb": [m for _, m, _ in per_rank]}
        if method == "ds-ppll":
            out["busy_fraction"] = [b for b, _, _ in per_rank]
        if memory:
            out["memory"] = rows(m for _, _, m in per_rank)
        return out


def _memory_probe(engine: Any) -> StageProbe:
    """This stage's memory probe: the engine's module (stage layers, + aux head for PPLL) and optimizer; buffers =
    DeepSpeed's pipe buffers (inputs, labels, outputs of the micro-batches in flight) and receive buffers, and for
    PPLL its links' in-flight and posted buffers, sampled after every pipeline instruction."""
    mem = StageProbe(engine.module, engine.optimizer)
    mem.add_buffers(lambda: tensors_in([engine.pipe_buffers, getattr(engine, "pipe_recv_buf", None),
                                        getattr(engine, "grad_layer", None)]))
    if hasattr(engine, "_stream"):
        watch_links(mem, engine._stream.sender, engine._stream.receiver)
    # An instance table shadows the class's: every instruction samples the buffers when it is done.
    engine._INSTRUCTION_MAP = {kind: _sampled(fn, mem) for kind, fn in type(engine)._INSTRUCTION_MAP.items()}
    return mem


def _sampled(fn: Any, mem: StageProbe) -> Any:
    def instruction(self: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, **kwargs)
        finally:
            mem.sample()

    return instruction


def main() -> None:
    """Parse arguments; as a worker print one JSON line, otherwise run the comparison and write results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not for the record)")
    p.add_argument("--out", default="deepspeed", help="file stem of the results under benchmarks/results/")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(ALL_MODELS), help=argparse.SUPPRESS)
    p.add_argument("--partition", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        result = worker(a.model, a.worker, a.batch_size, a.microbatches, a.warmup, a.steps, a.partition, a.memory)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    if a.quick:
        a.steps, a.warmup, a.repeats = 6, 2, 1
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    runs: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in METHODS} for m in a.models}
    for model in a.models:
        partition = profiled_partition(model, 2, a.batch_size // a.microbatches)
        print(f"{model}: stages start at layers {partition} (profiled)", flush=True)
        for rep in range(a.repeats):
            for method in METHODS:
                cmd = ds_cmd(model, method, a.batch_size, a.microbatches, a.warmup, a.steps, partition)
                r = run_json(cmd, what=f"{model}/{method}", timeout=1800)[0]
                runs[model][method].append(r)
                print(f"  repeat {rep + 1}/{a.repeats} {method:8s} {r['samples_per_s']:7.1f} samples/s", flush=True)
    rows = ratio_rows(runs, ["ds-1f1b"])
    note = (f"2 processes x 1 thread under the deepspeed launcher (gloo), batch {a.batch_size}, "
            f"{a.microbatches} micro-batches (gradient_accumulation_steps), {a.steps} timed train_batch calls "
            f"after {a.warmup} warm-up, median of {a.repeats} interleaved repeats; the same layers and cut for "
            f"both; AdamW (torch), clipping 1.0 (stock: global norm over stages; PPLL: per stage).")
    write_results(a.out, "PPLL (DeepSpeed adapter) vs stock DeepSpeed 1F1B", note, rows, ["ds-1f1b"], machine())


if __name__ == "__main__":
    main()
