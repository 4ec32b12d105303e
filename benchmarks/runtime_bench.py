"""Throughput of the PPLL runtimes against sequential local learning and backprop, side by side.

Every method trains the same model on the same CIFAR-10-shaped batches (synthetic pixels: this
measures speed, not accuracy; random byte-level token ids for the GPT-2) in a fresh process with
one torch thread per process; methods are interleaved (A B C D, A B C D, ...) so machine drift
hits all of them alike, and the median of the repeats is reported with ratios. "2x-sequential"
runs two independent copies of sequential LL at once and adds their throughputs: the most two
processes can do on this machine with no dependency between them, i.e. the ceiling of a 2-stage
pipeline here.

    python benchmarks/runtime_bench.py                    # ResNet-32 and ViT, K=2, 3 repeats
    python benchmarks/runtime_bench.py --quick            # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import machine, ratio_rows, run_json, torchrun_cmd, write_results
from memprobe import StageProbe, rows, tensors_in, watch_links
from probe import gather, peak_rss_mb

from ppll_ext import trace
from ppll_ext.build import build_blocks, build_bp_block, build_layered, stage_plan
from ppll_ext.config import Config, load_config
from ppll_ext.core import PartitionPlan
from ppll_ext.runtime import ProcessRunner, SequentialRunner, ThreadRunner, shutdown
from ppll_ext.runtime.launch import init_distributed
from ppll_ext.transport.wire import tensors_of

METHODS = ("bp", "sequential", "threads", "processes", "2x-sequential")
MODELS = {
    "resnet32": ["model.name=resnet32", "local.aux=conv"],
    "vit": ["model.name=vit", "model.patch_size=4", "model.depth=6", "model.hidden_dim=192", "model.heads=3",
            "model.mlp_dim=384", "local.aux=vit", "optim.name=adamw", "optim.lr=0.001"],
    # configs/gpt2_tiny_text.yaml's model: 4 blocks of width 128, context 128, byte-level tokens.
    "gpt2": ["model.name=gpt2", "model.depth=4", "model.hidden_dim=128", "model.heads=4", "model.mlp_dim=512",
             "data.name=pydoc", "data.seq_len=128", "local.aux=lm", "optim.name=adamw", "optim.lr=0.002"],
}
MEMORY_MODELS = {
    "resnet110": ["model.name=resnet110", "local.aux=conv"],
    "resnet8": ["model.name=resnet8", "local.aux=conv"],  # a small model for smoke runs and tests
}
"""Models the workers also know, beyond the throughput benchmarks' defaults (memory_bench.py uses them)."""
ALL_MODELS = {**MODELS, **MEMORY_MODELS}
LM_MODELS = ("gpt2",)
SEQ_LEN, VOCAB = 128, 256


def model_shape(model: str) -> dict[str, int]:
    """build_layered's data-shape arguments for `model`: CIFAR-10 images or byte-level token blocks."""
    if model in LM_MODELS:
        return {"num_classes": VOCAB, "seq_len": SEQ_LEN}
    return {"in_channels": 3, "image_size": 32, "num_classes": 10}


def bench_config(model: str, method: str, stages: int, batch: int, partition: str = "profile",
                 micro: int = 1, checkpoint: bool = False) -> Config:
    """The job every method runs: `model` cut into `stages` blocks of `micro` micro-batches, one torch thread
    (`checkpoint`: local.checkpoint_activations)."""
    runtime = "sequential" if method == "bp" else method
    return load_config(None, ["data.name=cifar10", *ALL_MODELS[model], f"local.stages={stages}",
                              f"local.runtime={runtime}", f"local.partition={partition}",
                              f"local.micro_batches={micro}",
                              f"train.method={'bp' if method == 'bp' else 'local'}", f"train.batch_size={batch}",
                              "train.threads=1", f"local.checkpoint_activations={str(checkpoint).lower()}"])


def synthetic_batches(n: int, batch: int, seed: int = 0, model: str = "resnet32"
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` CIFAR-10-shaped batches (normalised noise, random labels), or for a language model random token blocks
    with themselves as targets (the next-token shift is inside the loss)."""
    gen = torch.Generator().manual_seed(seed)
    if model in LM_MODELS:
        return [(ids, ids.clone()) for ids in (torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=gen)
                                               for _ in range(n))]
    return [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def profiled_plan(model: str, stages: int, batch: int) -> PartitionPlan:
    """Cut the model once by measured layer + aux-head + send time (one thread), so every method uses the same
    split; the plan also holds each stage's predicted seconds per batch of `batch` rows."""
    torch.set_num_threads(1)
    cfg = bench_config(model, "sequential", stages, batch)
    layered = build_layered(cfg, **model_shape(model))
    example = synthetic_batches(1, batch, seed=1, model=model)[0][0]
    return stage_plan(cfg, layered, example)


def profiled_partition(model: str, stages: int, batch: int) -> str:
    """The start layers of profiled_plan's split, as local.partition takes them (e.g. "0,6")."""
    return profiled_plan(model, stages, batch).starts


def describe_plan(plan: PartitionPlan) -> str:
    """One line: start layers, then each stage's predicted milliseconds and share of the bottleneck."""
    shares = plan.shares() or []
    times = ", ".join(f"{s.total_s * 1e3:.1f} ms ({share:.0%})" for s, share in zip(plan.stages or [], shares))
    return f"stages start at layers {plan.starts} ({plan.method}; predicted per micro-batch: {times or 'not timed'})"


def worker(model: str, method: str, stages: int, batch: int, warmup: int, steps: int, partition: str,
           micro: int = 1, threads: int = 1, trace_path: str | None = None, memory: bool = False,
           checkpoint: bool = False) -> dict | None:
    """Train `warmup` then `steps` mini-batches with `method` on `threads` torch threads; returns timing, per-stage
    busy fraction and per-process peak RSS on the driving process (which also writes the trace, if asked), and
    with `memory` each stage's StageMemory (memprobe; the hooks slow training, so its timing is not for the
    record). `checkpoint`: local.checkpoint_activations."""
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
        runner.train_epoch(first)
        for probe in probes:
            probe.reset()
        timed = runner.train_epoch(later)
        runner.close()
        mem = [p.result() for p in probes]
        if method == "processes" and memory:
            mem = [m for per_rank in (gather(mem) or []) for m in per_rank]
        if rank != 0:
            gather(peak_rss_mb())
            if trace_path:
                trace.finish(trace_path, torch.distributed.group.WORLD)
            return None
        rss = [peak_rss_mb()]
        if method == "processes":
            rss = gather(rss[0])
            if trace_path:
                trace.finish(trace_path, torch.distributed.group.WORLD, title)
        elif trace_path:
            trace.finish(trace_path, title=title)
        busy = [s.busy_s / max(timed.seconds, 1e-9) for s in timed.stages]
        out = {"samples_per_s": timed.samples_per_s, "seconds": timed.seconds, "boundaries": boundaries,
               "busy_fraction": busy, "peak_rss_mb": rss}
        if memory:
            out["memory"] = rows(mem)
        return out


def run_method(model: str, method: str, stages: int, batch: int, warmup: int, steps: int, partition: str,
               micro: int = 1, threads: int = 1, trace_path: str | None = None, memory: bool = False,
               checkpoint: bool = False) -> dict:
    """Run one measurement in fresh process(es); torchrun for the processes runtime."""
    args = ["--worker", method, "--model", model, "--stages", str(stages), "--batch-size", str(batch),
            "--warmup", str(warmup), "--steps", str(steps), "--partition", partition, "--microbatches", str(micro),
            "--threads", str(threads), *(["--trace", trace_path] if trace_path else []),
            *(["--memory"] if memory else []), *(["--checkpoint-activations"] if checkpoint else [])]
    script = str(Path(__file__).resolve())
    if method == "processes":
        return run_json(torchrun_cmd(stages, script, *args), what=f"{model}/{method}")[0]
    if method == "2x-sequential":
        # Two independent copies at once: what two processes can do on this machine with no dependency at all.
        args[1] = "sequential"
        both = run_json([sys.executable, script, *args], [sys.executable, script, *args], what=f"{model}/{method}")
        return {**both[0], "samples_per_s": sum(r["samples_per_s"] for r in both), "busy_fraction": [],
                "peak_rss_mb": [m for r in both for m in r["peak_rss_mb"]]}
    return run_json([sys.executable, script, *args], what=f"{model}/{method}")[0]


def main() -> None:
    """Parse arguments; as a worker, print one JSON line; otherwise run the comparison and write results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not for the record)")
    p.add_argument("--out", default="runtime", help="file stem of the results under benchmarks/results/")
    p.add_argument("--worker", choices=METHODS[:-1], help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(ALL_MODELS), help=argparse.SUPPRESS)
    p.add_argument("--partition", default="profile", help=argparse.SUPPRESS)
    p.add_argument("--microbatches", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--trace", help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint-activations", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        result = worker(a.model, a.worker, a.stages, a.batch_size, a.warmup, a.steps, a.partition, a.microbatches,
                        a.threads, a.trace, a.memory, a.checkpoint_activations)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    if a.quick:
        a.steps, a.warmup, a.repeats = 6, 2, 3
    runs: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in METHODS} for m in a.models}
    for model in a.models:
        plan = profiled_plan(model, a.stages, a.batch_size)
        partition = plan.starts
        print(f"{model}: {describe_plan(plan)}", flush=True)
        for rep in range(a.repeats):
            for method in METHODS:
                r = run_method(model, method, a.stages, a.batch_size, a.warmup, a.steps, partition)
                runs[model][method].append(r)
                print(f"{model:9s} rep {rep + 1}/{a.repeats} {method:10s} {r['samples_per_s']:8.1f} samples/s",
                      flush=True)
    meta = {**machine(), "stages": a.stages, "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup,
            "repeats": a.repeats}
    note = (f"bp / sequential / threads: 1 process; processes: {a.stages} processes (torchrun, gloo); 1 torch thread "
            f"per process. K = {a.stages}, batch {a.batch_size}, {a.steps} timed steps after {a.warmup} warm-up, "
            f"{a.repeats} interleaved repeats, median. Data: synthetic CIFAR-10-shaped batches.")
    baselines = ["sequential", "bp"]
    write_results(a.out, "PPLL runtime throughput", note, ratio_rows(runs, baselines), baselines, meta)


if __name__ == "__main__":
    main()
