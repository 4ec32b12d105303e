"""Memory per pipeline stage for every training method of `ppll bench`, measured inside each method's real code
path: peak bytes saved for backward (ppll_ext.memory.SavedTensorMeter), parameters, gradients (right after an
optimizer step, before they are cleared), optimizer state and in-flight communication buffers
(ppll_ext/bench/probes.py).

Each method runs a few steps in fresh processes through the benchmarks' workers with `--memory`
(`python -m ppll_ext.bench.worker`: bp, sequential, threads, processes; SchedulePPLL, GPipe, 1F1B under torchrun;
DeepSpeed PPLL and stock 1F1B under the deepspeed launcher), at K = 2 and 4 stages (one process each, the same profiled
cut for every method) and M = 4 micro-batches; the peaks are taken after one warm-up step. Bytes do not depend
on machine load, so one run each. "processes+ckpt" is PPLL processes with local.checkpoint_activations=true;
its time cost is measured separately (samples/s without and with, interleaved, median of 3, K = 2, no meter).

    python benchmarks/memory_bench.py                       # resnet32, resnet110, vit, gpt2; K = 2 and 4
    python benchmarks/memory_bench.py --models resnet8 --stages 2 --time-repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ppll_ext.bench.driver import Work, machine, measure
from ppll_ext.bench.models import ALL_MODELS, LM_MODELS, profiled_partition
from ppll_ext.memory import MiB

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {
    "bp": "end-to-end backprop, the whole model in one process (its one 'stage' is the model)",
    "sequential": "sequential local learning, one process, blocks in turn",
    "threads": "PPLL, threads runtime",
    "processes": "PPLL, processes runtime",
    "processes+ckpt": "PPLL processes with local.checkpoint_activations=true",
    "ppll-torch": "PPLL via the torch adapter (SchedulePPLL)",
    "gpipe": "torch ScheduleGPipe",
    "1f1b": "torch Schedule1F1B",
    "ds-ppll": "PPLL via the DeepSpeed adapter",
    "ds-1f1b": "stock DeepSpeed pipeline (1F1B)",
}
PPLL = "processes"
"""The PPLL method the targets are checked on."""
FIELDS = ("saved_peak", "parameters", "gradients", "optimizer", "buffers")
TOTAL_SHARE = 0.40
"""Target (b): PPLL's largest stage total at most this share of BP's whole-model total at K = 4."""


WORKER_METHOD = {"processes+ckpt": "processes"}
"""Methods that are another worker method with a setting (the rest have the worker's name)."""


def measure_memory(method: str, model: str, k: int, partition: str, batch: int, micro: int, warmup: int, steps: int
                   ) -> dict:
    """One method's worker run with the memory probe; returns its result (with "memory": one dict per stage)."""
    return measure(WORKER_METHOD.get(method, method), Work(model, k, batch, partition, micro, warmup, steps),
                   memory=True, checkpoint=method == "processes+ckpt")


def time_checkpointing(model: str, partition: str, batch: int, micro: int, repeats: int, steps: int) -> dict:
    """samples/s of PPLL processes (K = 2) without and with activation checkpointing, interleaved, no meter."""
    runs: dict[str, list[float]] = {"off": [], "on": []}
    work = Work(model, 2, batch, partition, micro, 2, steps)
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(measure("processes", work, checkpoint=mode == "on")["samples_per_s"])
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    return {"model": model, "K": 2, "samples_per_s_off": off, "samples_per_s_on": on, "runs_off": runs["off"],
            "runs_on": runs["on"], "slowdown": off / on}


def largest(stages: list[dict]) -> dict:
    """The stage with the largest total."""
    return max(stages, key=lambda s: s["total"])


def check_targets(results: dict) -> list[dict]:
    """(a) per model and K: PPLL's largest saved peak <= 1/K of (1F1B's first stage saved peak + its buffers);
    (b) per model at K = 4: PPLL's largest stage total <= 40 % of BP's whole-model total."""
    out = []
    for model, by_k in results["runs"].items():
        for k, by_method in by_k.items():
            ppll, f1b = by_method.get(PPLL), by_method.get("1f1b")
            if ppll and f1b:
                mine = max(s["saved_peak"] for s in ppll)
                first = f1b[0]
                bound = (first["saved_peak"] + first["buffers"]) / int(k)
                out.append({"target": "a", "model": model, "K": int(k), "ppll_saved_peak": mine, "bound": bound,
                            "share": mine / (first["saved_peak"] + first["buffers"]), "met": mine <= bound})
            if int(k) == 4 and ppll and results["bp"].get(model):
                mine = largest(ppll)["total"]
                bound = TOTAL_SHARE * results["bp"][model][0]["total"]
                out.append({"target": "b", "model": model, "K": 4, "ppll_largest_total": mine, "bound": bound,
                            "share": mine / results["bp"][model][0]["total"], "met": mine <= bound})
    return out


def mib(n: float) -> str:
    """Bytes as MiB with 2 decimals."""
    return f"{n / MiB:.2f}"


def table(results: dict) -> list[str]:
    """Markdown lines: per model and K, method x stage -> MiB of each field and the total."""
    lines = []
    for model, by_k in results["runs"].items():
        for k, by_method in by_k.items():
            lines += [f"### {model}, K = {k}, M = {results['meta']['microbatches']}", "",
                      "| method | stage | saved peak | params | grads | optimizer | buffers | total |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for method, stages in [("bp", results["bp"].get(model, [])), *by_method.items()]:
                for s in stages:
                    cells = " | ".join(mib(s[f]) for f in (*FIELDS, "total"))
                    lines.append(f"| {method} | {'all' if method == 'bp' else s['stage']} | {cells} |")
            lines.append("")
    return lines


def target_lines(targets: list[dict]) -> list[str]:
    """One line per target check, with its numbers."""
    lines = []
    for t in targets:
        verdict = "met" if t["met"] else "MISSED"
        if t["target"] == "a":
            lines.append(f"- (a) {t['model']}, K = {t['K']}: PPLL largest saved peak {mib(t['ppll_saved_peak'])} MiB "
                         f"vs 1/K x (1F1B stage 0 saved peak + buffers) = {mib(t['bound'])} MiB "
                         f"(PPLL = 1/{1 / t['share']:.2f} of 1F1B's): **{verdict}**")
        else:
            lines.append(f"- (b) {t['model']}, K = 4: PPLL largest stage total {mib(t['ppll_largest_total'])} MiB "
                         f"= {t['share']:.0%} of BP's total; target <= {TOTAL_SHARE:.0%} "
                         f"({mib(t['bound'])} MiB): **{verdict}**")
    return lines


SUMMARY = ("bp", "gpipe", "1f1b", "ds-1f1b", "processes", "ppll-torch", "ds-ppll", "processes+ckpt")
"""The methods of the summary table (RESULTS.md), baselines first."""


def summary(results: dict) -> list[str]:
    """Markdown lines for RESULTS.md: per model and K, each method's largest stage as total MiB (saved peak), then
    the target checks."""
    lines = ["| model | K | " + " | ".join(SUMMARY) + " |", "|---|---:|" + "---:|" * len(SUMMARY)]
    for model, by_k in results["runs"].items():
        for k, by_method in by_k.items():
            stages = {"bp": results["bp"].get(model, []), **by_method}
            cells = [f"{mib(largest(stages[m])['total'])} ({mib(max(s['saved_peak'] for s in stages[m]))})"
                     if stages.get(m) else "–" for m in SUMMARY]
            lines.append(f"| {model} | {k} | " + " | ".join(cells) + " |")
    return lines + ["", *target_lines(results["targets"])]


def chart(results: dict, path: Path) -> None:
    """Stacked bars per method: the largest stage's total split by field; one row per model, one column per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["runs"])
    ks = sorted({k for by_k in results["runs"].values() for k in by_k}, key=int)
    fig, axes = plt.subplots(len(models), len(ks), figsize=(6 * len(ks), 3.2 * len(models)), squeeze=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for i, model in enumerate(models):
        for j, k in enumerate(ks):
            ax = axes[i][j]
            by_method = {"bp": results["bp"].get(model, []), **results["runs"][model].get(k, {})}
            names = [m for m, st in by_method.items() if st]
            bottoms = [0.0] * len(names)
            for field, color in zip(FIELDS, colors, strict=True):
                values = [largest(by_method[m])[field] / MiB for m in names]
                ax.bar(names, values, bottom=bottoms, color=color, label=field.replace("_", " "))
                bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
            ax.set_title(f"{model}, K = {k}: largest stage (bp: whole model)", fontsize=9)
            ax.set_ylabel("MiB")
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, stem: str) -> None:
    """memory.json, memory.md (command, conditions, targets, checkpointing cost, tables) and memory.png."""
    out = RESULTS / stem
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    meta = results["meta"]
    methods = "\n".join(f"- `{m}`: {d}" for m, d in METHODS.items())
    timing = [f"- {t['model']}: {t['samples_per_s_off']:.1f} samples/s without, {t['samples_per_s_on']:.1f} with "
              f"(x{t['slowdown']:.2f} slower; runs {', '.join(f'{v:.0f}' for v in t['runs_off'])} / "
              f"{', '.join(f'{v:.0f}' for v in t['runs_on'])})" for t in results["checkpoint_timing"]]
    md = [f"# Memory per pipeline stage ({meta['date']})", "",
          f"Command: `{meta['command']}` ({meta['minutes']:.1f} min)", "",
          f"Machine: {meta['machine']}; torch {meta['torch']}; Python {meta['python']}. One process per stage (K "
          f"processes; bp and sequential one process), M = {meta['microbatches']} micro-batches, batch "
          f"{meta['batch_images']} (images) / {meta['batch_lm']} x 128 tokens (gpt2), float32, synthetic data; "
          f"{meta['warmup']} warm-up + {meta['steps']} measured steps; the same profiled cut for every method of a "
          f"model and K. MiB = 2^20 bytes.", "",
          "What is counted, per stage: **saved peak** = most bytes autograd held for backward at once (each storage "
          "once; parameters excluded); **params**, **grads** (right after an optimizer step, before they are "
          "cleared) and **optimizer** state (momentum, Adam moments) of the stage's module, aux head included for "
          "PPLL; **buffers** = communication buffers not already counted as saved: ppll_ext's link sender's "
          "in-flight messages and receiver's posted buffers (PPLL processes, SchedulePPLL, DeepSpeed PPLL), the "
          "queue into the stage (threads), torch pipelining's receive buffers (activations and gradients, one per "
          "micro-batch), forward cache and output chunks (GPipe / 1F1B), DeepSpeed's pipe buffers (inputs, labels, "
          "outputs in flight) and receive buffers; sampled after each send / chunk / instruction. **total** adds "
          "the five peaks (an upper bound of the simultaneous peak). Not counted: memory an op allocates and frees "
          "inside forward or backward (e.g. the activations checkpointing recomputes during backward), the data "
          "batch outside the stage, BatchNorm buffers, the allocator's caching and fragmentation, Python objects. "
          "On this CPU machine there is no device peak to compare with (`cuda_peak` is recorded on CUDA).", "",
          "`saved_live_end` in memory.json (bytes still saved for backward after the last step) is 0 for every "
          "stage: no graph outlives its backward, so the peaks are what training holds.", "",
          "Methods:", "", methods, "", "## Targets", "", *target_lines(results["targets"]), "",
          "(a) reads \"PPLL's peak saved-activation bytes per stage <= 1/K of 1F1B's first stage plus its queue "
          "buffers\" as: the largest saved peak over PPLL's stages <= (saved peak + buffers of torch 1F1B's stage "
          "0) / K.", "", "## Activation checkpointing (local.checkpoint_activations)", "",
          "Saved bytes: the `processes+ckpt` rows. Time cost (PPLL processes, K = 2, median of "
          f"{meta['time_repeats']} interleaved runs of {meta['time_steps']} steps, no meter):", "", *timing, "",
          "## Per stage (MiB)", "", *table(results), "![largest stage per method](memory.png)", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    chart(results, out.with_suffix(".png"))


def main() -> None:
    """Run every method per model and K with the memory probe, check the targets, write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet32", "resnet110", "vit", "gpt2"], choices=list(ALL_MODELS))
    p.add_argument("--stages", nargs="+", type=int, default=[2, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--lm-batch-size", type=int, default=16, help="sequences of 128 tokens per batch (gpt2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--time-repeats", type=int, default=3, help="repeats of the checkpointing time comparison")
    p.add_argument("--time-steps", type=int, default=6)
    p.add_argument("--out", default="memory", help="file stem of the results under benchmarks/results/")
    a = p.parse_args()
    if any(k > a.microbatches for k in a.stages):
        p.error(f"--microbatches {a.microbatches} must be at least every K in --stages (M >= K)")
    began = time.time()
    results: dict = {"runs": {}, "bp": {}, "checkpoint_timing": []}
    for model in a.models:
        batch = a.lm_batch_size if model in LM_MODELS else a.batch_size
        if "bp" in a.methods:
            r = measure_memory("bp", model, 1, "0", batch, a.microbatches, a.warmup, a.steps)
            results["bp"][model] = r["memory"]
            print(f"{model:9s} bp: total {mib(r['memory'][0]['total'])} MiB", flush=True)
        results["runs"][model] = {}
        for k in a.stages:
            partition = profiled_partition(model, k, batch // a.microbatches)
            print(f"{model}: K = {k}, stages start at layers {partition} (profiled)", flush=True)
            by_method = results["runs"][model][str(k)] = {}
            for method in a.methods:
                if method == "bp":
                    continue
                r = measure_memory(method, model, k, partition, batch, a.microbatches, a.warmup, a.steps)
                by_method[method] = r["memory"]
                print(f"{model:9s} K={k} {method:15s} saved peak per stage (MiB): "
                      f"{', '.join(mib(s['saved_peak']) for s in r['memory'])}; largest total "
                      f"{mib(largest(r['memory'])['total'])}", flush=True)
        if "processes+ckpt" in a.methods and a.time_repeats > 0:
            partition = profiled_partition(model, 2, batch // a.microbatches)
            t = time_checkpointing(model, partition, batch, a.microbatches, a.time_repeats, a.time_steps)
            results["checkpoint_timing"].append(t)
            print(f"{model:9s} checkpointing: {t['samples_per_s_off']:.1f} -> {t['samples_per_s_on']:.1f} samples/s",
                  flush=True)
    results["meta"] = {**machine(), "microbatches": a.microbatches, "batch_images": a.batch_size,
                       "batch_lm": a.lm_batch_size, "warmup": a.warmup, "steps": a.steps,
                       "time_repeats": a.time_repeats, "time_steps": a.time_steps, "stages": a.stages,
                       "minutes": (time.time() - began) / 60}
    results["targets"] = check_targets(results)
    print("\n".join(target_lines(results["targets"])))
    write(results, a.out)
    print(f"wrote {RESULTS / a.out}.{{json,md,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
