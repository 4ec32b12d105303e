"""Every benchmark's measured run: one method trains a few synthetic batches in fresh process(es) and rank 0 writes
what it measured as one JSON object to `--result`.

    python -m ppll_ext.bench.worker --method sequential --model resnet32 --stages 2 --result r.json
    torchrun --nproc_per_node 2 -m ppll_ext.bench.worker --method 1f1b --partition 0,6 ...   (one rank per stage)
    deepspeed --num_gpus 2 --module ppll_ext.bench.worker --method ds-ppll --partition 0,6 ...

Methods: ppll_ext's runtimes and end-to-end backprop (`bp`, `sequential`, `threads`, `processes`), torch's stock
schedules and SchedulePPLL on the same stages (`gpipe`, `1f1b`, `ppll-torch`), and the DeepSpeed adapter against
stock DeepSpeed pipeline parallelism (`ds-ppll`, `ds-1f1b`). The result holds samples/s, seconds, the stage
boundaries, each stage's busy fraction and each process's peak RSS; with `--memory` each stage's StageMemory
(probes.py; the hooks slow training, so that run's timing is not for the record). driver.py builds the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ppll_ext import trace
from ppll_ext.bench.models import ALL_MODELS, bench_config, model_shape, synthetic_batches
from ppll_ext.bench.probes import (
    StageProbe,
    TorchStageProbe,
    gather,
    peak_rss_mb,
    rows,
    tensors_in,
    watch_links,
)
from ppll_ext.build import build_blocks, build_bp_block, build_layered, make_optimizer
from ppll_ext.runtime import ProcessRunner, SequentialRunner, ThreadRunner, shutdown
from ppll_ext.runtime.launch import init_distributed
from ppll_ext.transport.wire import tensors_of

NATIVE = ("bp", "sequential", "threads", "processes")
TORCH = ("gpipe", "1f1b", "ppll-torch")
DEEPSPEED = ("ds-1f1b", "ds-ppll")
METHODS = (*NATIVE, *TORCH, *DEEPSPEED)
DS_CONFIG = {
    "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01,
                                              "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 50,
                                                 "warmup_type": "linear"}},
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 0},
    "wall_clock_breakdown": False,
}
"""The ds_config of both DeepSpeed methods: the hyper-parameters of configs/deepspeed/ppll.json and stock_1f1b.json
(tests/test_bench.py checks that they are equal); batch, micro-batches and printing are set per run."""


class Contiguous(nn.Module):
    """gloo sends only contiguous tensors; torchvision's ViT blocks return a transposed view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def native(model: str, method: str, stages: int, batch: int, warmup: int, steps: int, partition: str,
           micro: int = 1, threads: int = 1, trace_path: str | None = None, memory: bool = False,
           checkpoint: bool = False) -> dict | None:
    """Train `warmup` then `steps` mini-batches with a ppll_ext runtime (or `bp`) on `threads` torch threads; the
    driving process returns the result (and writes the trace, if asked), other ranks None. `checkpoint`:
    local.checkpoint_activations."""
    cfg = bench_config(model, method, stages, batch, partition, micro, checkpoint)
    torch.set_num_threads(threads)
    rank = 0
    if method == "processes":
        rank, _, _ = init_distributed(stages, "cpu", 300.0)
    with shutdown.closing_group():  # links closed, barrier, group destroyed, also on errors
        if trace_path:
            trace.start()
        torch.manual_seed(cfg.train.seed)
        layered = build_layered(cfg, **model_shape(model))
        example = synthetic_batches(1, 8, seed=1, model=model)[0][0]
        total = warmup + steps
        if method == "bp":
            blocks = {0: build_bp_block(cfg, layered, total_steps=total)}
            boundaries = [0, len(layered.layers)]
        else:
            boundaries, blocks = build_blocks(cfg, layered, example, total_steps=total,
                                              stages=[rank] if method == "processes" else None)
        ordered = [blocks[k] for k in sorted(blocks)]
        probes = [StageProbe(b, b.optimizer) for b in ordered] if memory else []
        for block, probe in zip(ordered, probes, strict=False):
            # Before the runner exists: its stage loop takes block.train_step once, and each stage thread must run
            # inside its own meter (saved-tensor hooks are thread-local).
            block.train_step = probe.after(probe.meter.wrap(block.train_step))
        if method == "threads":
            runner = ThreadRunner(ordered, cfg.local.micro_batches, cfg.local.queue_depth)
            for k, probe in enumerate(probes[1:], start=1):  # the queue into stage k (stage 0's holds the input data)
                probe.add_buffers(lambda k=k: tensors_in([tensors_of(m) for m in list(runner._inboxes[k].queue)]))
        elif method == "processes":
            runner = ProcessRunner(ordered[0], micro_batches=cfg.local.micro_batches, queue_depth=cfg.local.queue_depth)
            if probes:
                watch_links(probes[0], runner.sender, runner.receiver)
        else:
            runner = SequentialRunner(ordered, cfg.local.micro_batches)
        title = f"{model}: {method}, K={len(boundaries) - 1}, M={micro}"
        first = synthetic_batches(warmup, batch, seed=2, model=model) if rank == 0 else None
        later = synthetic_batches(steps, batch, seed=3, model=model) if rank == 0 else None
        runner.train_segment(first)
        for probe in probes:
            probe.reset()
        timed = runner.train_segment(later)
        runner.close()
        mem = [p.result() for p in probes]
        if method == "processes" and memory:
            mem = [m for per_rank in (gather(mem) or []) for m in per_rank]
        if rank != 0:
            gather(peak_rss_mb())
            if trace_path:
                trace.finish(trace_path, dist.group.WORLD)
            return None
        rss = [peak_rss_mb()]
        if method == "processes":
            rss = gather(rss[0])
            if trace_path:
                trace.finish(trace_path, dist.group.WORLD, title)
        elif trace_path:
            trace.finish(trace_path, title=title)
        busy = [s.busy_s / max(timed.seconds, 1e-9) for s in timed.stages]
        out = {"samples_per_s": timed.samples_per_s, "seconds": timed.seconds, "boundaries": boundaries,
               "busy_fraction": busy, "peak_rss_mb": rss}
        if memory:
            out["memory"] = rows(mem)
        return out


def torch_schedule(model: str, method: str, batch: int, micro: int, warmup: int, steps: int, partition: str,
                   trace_path: str | None = None, memory: bool = False, device_kind: str = "cpu") -> dict | None:
    """This rank's stage of `model` (one rank per stage, torchrun) trained with torch's ScheduleGPipe or
    Schedule1F1B (a flush and every stage's optimizer step per `step()`) or with SchedulePPLL (each stage steps on
    its own and streams); rank 0 returns the result. On `device_kind` "cuda" each rank drives cuda:LOCAL_RANK over
    NCCL and also reports its peak CUDA MiB."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from ppll_ext.core import build_aux_head, make_loss
    from ppll_ext.pipelining import SchedulePPLL

    if device_kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    with shutdown.closing_group():  # links closed, barrier, group destroyed, also on errors
        if trace_path:
            trace.start()
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        cfg = bench_config(model, "processes", world, batch, partition)
        shape = model_shape(model)
        layered = build_layered(cfg, **shape)
        bounds = [int(b) for b in partition.split(",")] + [len(layered.layers)]
        stage_mod = nn.Sequential(layered.sequential(bounds[rank], bounds[rank + 1]), Contiguous()).to(device)
        stage = PipelineStage(stage_mod, stage_index=rank, num_stages=world, device=device)
        loss_fn = make_loss(cfg.task)
        if method == "ppll-torch":
            aux = None
            if rank < world - 1:
                with torch.no_grad():
                    example = synthetic_batches(1, 2, seed=1, model=model)[0][0]
                    h = layered.sequential(0, bounds[rank + 1]).eval()(example)
                aux = build_aux_head(cfg.local.aux, h, shape["num_classes"], hidden=cfg.local.aux_hidden).to(device)
            params = list(stage_mod.parameters()) + (list(aux.parameters()) if aux is not None else [])
            optimizer = make_optimizer(cfg.optim, params)
            schedule = SchedulePPLL(stage, n_microbatches=micro, loss_fn=loss_fn, aux_head=aux, optimizer=optimizer)
        else:
            optimizer = make_optimizer(cfg.optim, stage_mod.parameters())
            cls = ScheduleGPipe if method == "gpipe" else Schedule1F1B
            schedule = cls(stage, n_microbatches=micro, loss_fn=loss_fn)
            probe = TorchStageProbe(stage, rank)
        mem = _torch_memory_probe(method, stage, schedule, optimizer) if memory else None

        def busy_s() -> float:
            return schedule._worker.stats.busy_s if method == "ppll-torch" else probe.busy_s

        def on_device(data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(x.to(device), y.to(device)) for x, y in data]

        def run(data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
            dist.barrier()
            start = time.perf_counter()
            for x, y in data:
                if rank == 0:
                    schedule.step(x, target=y)
                elif rank == world - 1:
                    schedule.step(target=y)
                else:
                    schedule.step()
                if method != "ppll-torch":
                    started = time.perf_counter()
                    optimizer.step()
                    optimizer.zero_grad()
                    probe.record("step", started)
            if method == "ppll-torch":
                schedule.flush()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            return time.perf_counter() - start

        with mem.meter if mem is not None else contextlib.nullcontext():  # a process per stage: all its saves
            run(on_device(synthetic_batches(warmup, batch, seed=2, model=model)))
            if mem is not None:
                mem.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            busy_before = busy_s()
            seconds = run(on_device(synthetic_batches(steps, batch, seed=3, model=model)))
        cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        per_rank = gather(((busy_s() - busy_before) / seconds, peak_rss_mb(), mem.result() if mem else None, cuda_peak))
        if trace_path:
            name = "ppll" if method == "ppll-torch" else method
            trace.finish(trace_path, dist.group.WORLD, f"{model}: torch {name}, K={world}, M={micro}")
        if rank != 0:
            return None
        out = {"samples_per_s": steps * batch / seconds, "seconds": seconds, "boundaries": bounds,
               "busy_fraction": [b for b, _, _, _ in per_rank], "peak_rss_mb": [m for _, m, _, _ in per_rank]}
        if device.type == "cuda":
            out["cuda_peak_mib"] = [c for _, _, _, c in per_rank]
        if memory:
            out["memory"] = rows(m for _, _, m, _ in per_rank)
        return out


def _torch_memory_probe(method: str, stage: Any, schedule: Any, optimizer: torch.optim.Optimizer) -> StageProbe:
    """This stage's memory probe. SchedulePPLL: its block (stage module + aux head), its links' in-flight and
    posted buffers. GPipe / 1F1B: the stage module; buffers = the stage's receive buffers (activations and
    gradients, allocated for every micro-batch), its forward cache (outputs and inputs kept for backward) and
    its last-stage output chunks, sampled after every forward and backward chunk."""
    if method == "ppll-torch":
        mem = StageProbe(schedule.block, optimizer)
        watch_links(mem, schedule._stream.sender, schedule._stream.receiver)
        schedule.block.train_step = mem.after(schedule.block.train_step)
        schedule._worker._train_step = schedule.block.train_step
        return mem
    mem = StageProbe(stage.submod, optimizer)
    mem.add_buffers(lambda: tensors_in([stage.args_recv_info, stage.grad_recv_info, stage.fwd_cache,
                                        stage.output_chunks]))
    stage.forward_one_chunk = mem.after(stage.forward_one_chunk)
    stage.backward_one_chunk = mem.after(stage.backward_one_chunk)
    return mem


def deepspeed_pipe(model: str, method: str, batch: int, micro: int, warmup: int, steps: int, partition: str,
                   memory: bool = False) -> dict | None:
    """This rank's stage (one rank per stage, the deepspeed launcher) trained with ppll_ext's DeepSpeed adapter or
    with stock DeepSpeed pipeline parallelism (PipelineModule + TrainSchedule, i.e. 1F1B) on the same layers, cut,
    micro-batches (gradient_accumulation_steps), batch and DS_CONFIG; rank 0 returns the result."""
    import deepspeed

    from ppll_ext.core import make_loss
    from ppll_ext.core.partition import parse_explicit
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
        conf = {**DS_CONFIG, "train_micro_batch_size_per_gpu": batch // micro, "gradient_accumulation_steps": micro,
                "steps_per_print": 10**9}
        loss_fn = make_loss(cfg.task)
        if method == "ds-ppll":
            example = synthetic_batches(1, 2, seed=1, model=model)[0][0]
            net = LocalPipelineModule(layers, num_stages=world, loss_fn=loss_fn, aux_heads=cfg.local.aux,
                                      example_input=example, aux_hidden=cfg.local.aux_hidden,
                                      partition_method=partition)
            engine, *_ = initialize(model=net, config=conf, model_parameters=[p for p in net.parameters()])
        else:
            net = _cut_pipeline_module(layers, world, loss_fn, partition)
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

        mem = _deepspeed_memory_probe(engine) if memory else None
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


def _cut_pipeline_module(layers: list[nn.Module], stages: int, loss_fn: nn.Module, partition: str) -> nn.Module:
    """Stock DeepSpeed's PipelineModule cut at explicit start layers (stock DeepSpeed offers only uniform,
    parameters and type: splits)."""
    from deepspeed.runtime.pipe.module import PipelineModule

    from ppll_ext.core.partition import parse_explicit

    class CutPipelineModule(PipelineModule):
        def _partition_layers(self, method: str = "parameters") -> None:
            self.parts = parse_explicit(method, self._num_layers, self.num_stages)
            self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    return CutPipelineModule(layers, num_stages=stages, loss_fn=loss_fn, partition_method=partition)


def _deepspeed_memory_probe(engine: Any) -> StageProbe:
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


def _sampled(fn: Callable[..., Any], mem: StageProbe) -> Callable[..., Any]:
    def instruction(self: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, **kwargs)
        finally:
            mem.sample()

    return instruction


def parser() -> argparse.ArgumentParser:
    """The worker's command line (driver.py builds it)."""
    p = argparse.ArgumentParser(prog="python -m ppll_ext.bench.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--model", required=True, choices=list(ALL_MODELS))
    p.add_argument("--stages", type=int, default=2, help="K (native methods; the others: one rank per stage)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--partition", default="profile", help="start layers of the stages, e.g. 0,6 (torch and "
                   "DeepSpeed methods need them; native methods also take profile, parameters, uniform)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (native methods)")
    p.add_argument("--trace", help="write the run's pipeline trace (Chrome-trace JSON) here (not DeepSpeed)")
    p.add_argument("--memory", action="store_true", help="also measure every stage's memory")
    p.add_argument("--checkpoint-activations", action="store_true", help="local.checkpoint_activations (native)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: torch methods, one GPU per rank")
    p.add_argument("--result", help="rank 0 writes the result here (JSON); without it the result is dropped")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    return p


def main(argv: list[str] | None = None) -> None:
    """Run one measurement; rank 0 writes its result to --result."""
    a = parser().parse_args(argv)
    if a.method in NATIVE:
        result = native(a.model, a.method, a.stages, a.batch_size, a.warmup, a.steps, a.partition, a.microbatches,
                        a.threads, a.trace, a.memory, a.checkpoint_activations)
    elif a.method in TORCH:
        result = torch_schedule(a.model, a.method, a.batch_size, a.microbatches, a.warmup, a.steps, a.partition,
                                a.trace, a.memory, a.device)
    else:
        result = deepspeed_pipe(a.model, a.method, a.batch_size, a.microbatches, a.warmup, a.steps, a.partition,
                                a.memory)
    if result is not None and a.result:
        Path(a.result).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
