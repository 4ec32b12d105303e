"""`ppll bench`'s report: the throughput rows from the runs' results, the issue's targets (met / missed / not
measured) with the facts behind a missed one, and RESULTS.md (conditions, tables, accuracy, language-model quality,
pictures, and the sections the caller adds: the adapters run in adapters/, the source tree's other benchmarks)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

BASELINES = ("sequential", "1f1b", "ds-1f1b")
METHODS = {
    "bp-1t": "end-to-end backprop, 1 process x 1 thread",
    "bp-2t": "end-to-end backprop, 1 process x 2 threads",
    "sequential": "sequential local learning, 1 process x 1 thread",
    "ppll-threads": "PPLL, threads runtime (1 process, 1 thread per stage)",
    "ppll-processes": "PPLL, processes runtime (1 process per stage)",
    "2x-sequential": "two independent sequential LL copies at once (ceiling of 2 processes here)",
    "ppll-torch": "PPLL via the torch adapter (SchedulePPLL)",
    "gpipe": "torch ScheduleGPipe",
    "1f1b": "torch Schedule1F1B",
    "ds-ppll": "PPLL via the DeepSpeed adapter",
    "ds-1f1b": "stock DeepSpeed pipeline (1F1B)",
}
K4_METHODS = {
    "sequential-k4": "sequential local learning with K = 4 blocks, 1 process x 1 thread (--k4)",
    "ppll-processes-k4": "PPLL processes with K = 4: 4 processes, oversubscribed on fewer than 4 cores (--k4)",
}
QUICK_NOTE = ("A quick run (1 repeat of a few steps) checks that every method runs and every file is written; its "
              "numbers are not measurements. The committed RESULTS.md comes from a full run.")
THRESHOLDS = {"resnet32": 1.1, "vit": 1.3, "gpt2": 1.2}
"""Target speed-up of PPLL over 1F1B (torch and DeepSpeed) per model."""
CEILING_SHARE = 0.95
"""Target share of the two-independent-copies ceiling for every PPLL variant (processes, SchedulePPLL, DeepSpeed)."""
ADAPTER_SHARE = 0.95
"""Target: each adapter (SchedulePPLL, DeepSpeed PPLL) within 5 % of the native processes runtime."""
PPLL_VARIANTS = {"ppll-processes": "PPLL processes", "ppll-torch": "SchedulePPLL", "ds-ppll": "DeepSpeed PPLL"}
LM_PERPLEXITY_GAP = 0.05
"""Target: PPLL's validation perplexity (better head) within this fraction of BP's at the same token budget."""


def summarise(runs: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """One row per (model, method): median samples/s, the runs, ratios to the baselines that ran, and the
    median run's busy fractions and peak RSS."""
    rows = []
    for model, by_method in runs.items():
        med = {m: statistics.median(r["samples_per_s"] for r in rs) for m, rs in by_method.items() if rs}
        for method, rs in by_method.items():
            if not rs:
                continue
            typical = min(rs, key=lambda r: abs(r["samples_per_s"] - med[method]))
            row = {"model": model, "method": method, "median_samples_per_s": med[method],
                   "runs": [r["samples_per_s"] for r in rs], "busy_fraction": typical.get("busy_fraction", []),
                   "peak_rss_mb": typical.get("peak_rss_mb", [])}
            same_k = "-k4" if method.endswith("-k4") else ""  # K = 4 rows compare with K = 4 baselines
            row.update({f"x_{b}": med[method] / med[b + same_k] if b + same_k in med else None for b in BASELINES})
            rows.append(row)
    return rows


def _busy(row: dict | None) -> str:
    return ", ".join(f"{b:.0%}" for b in row["busy_fraction"]) if row and row["busy_fraction"] else "not reported"


def explain(rows: list[dict], targets: list[dict]) -> list[str]:
    """Facts behind missed throughput targets: where both methods' stages idle, and for the target against
    sequential LL the machine's two-process ceiling (2x-sequential)."""
    by = {(r["model"], r["method"]): r for r in rows}
    notes = []
    for t in targets:
        if t["met"] is not False or "method" not in t:
            continue
        model, method, base = t["model"], t["method"], t["baseline"]
        note = (f"{model}, {t['target']}: measured {t['value']:.2f}; stages busy: {method} "
                f"{_busy(by.get((model, method)))}, {base} {_busy(by.get((model, base)))}")
        ceiling = by.get((model, "2x-sequential"))
        if base == "sequential" and ceiling and ceiling["x_sequential"]:
            note += (f"; two independent sequential copies reach {ceiling['x_sequential']:.2f}x here (the most two "
                     f"processes can do on this machine), so {method} is at "
                     f"{t['value'] / ceiling['x_sequential']:.0%} of that ceiling")
        elif base in ("2x-sequential", "ppll-processes"):
            spread = [by[(model, m)]["runs"] for m in (method, base) if (model, m) in by]
            note += "; runs (samples/s) " + " vs ".join(", ".join(f"{v:.0f}" for v in rs) for rs in spread)
        elif ceiling and by.get((model, base)):
            most = ceiling["median_samples_per_s"] / by[(model, base)]["median_samples_per_s"]
            note += (f"; two independent sequential copies (the most two processes can do here) reach {most:.2f}x "
                     f"{base}, so {method} is at {t['value'] / most:.0%} of that ceiling")
        notes.append(note + f" (trace: gantt-{model}*.png).")
    return notes


def evaluate_targets(rows: list[dict], accuracy: dict | None, lm: dict | None = None) -> list[dict]:
    """The issue's targets with the measured value and whether each is met (None: not measured)."""
    out = []
    med = {(r["model"], r["method"]): r["median_samples_per_s"] for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        bar = THRESHOLDS.get(model, 1.1)
        checks = [("PPLL processes / sequential LL", "ppll-processes", "sequential", 1.9),
                  ("PPLL processes / torch 1F1B", "ppll-processes", "1f1b", bar),
                  ("PPLL processes / stock DeepSpeed 1F1B", "ppll-processes", "ds-1f1b", bar),
                  ("SchedulePPLL / torch 1F1B (same adapter layer)", "ppll-torch", "1f1b", bar),
                  ("DeepSpeed PPLL / stock DeepSpeed 1F1B (same engine)", "ds-ppll", "ds-1f1b", bar)]
        for name, method, base, threshold in checks:
            value = med[(model, method)] / med[(model, base)] if {(model, method), (model, base)} <= med.keys() \
                else None
            out.append({"model": model, "target": f"{name} >= {threshold}", "method": method, "baseline": base,
                        "value": value, "met": None if value is None else value >= threshold})
        for method, name in PPLL_VARIANTS.items():
            checks = [(f"{name} / 2 independent copies (ceiling) >= {CEILING_SHARE}", "2x-sequential", CEILING_SHARE)]
            if method != "ppll-processes":
                checks.append((f"{name} / PPLL processes (native runtime) >= {ADAPTER_SHARE}", "ppll-processes",
                               ADAPTER_SHARE))
            for target, base, threshold in checks:
                value = med[(model, method)] / med[(model, base)] if {(model, method), (model, base)} <= med.keys() \
                    else None
                out.append({"model": model, "target": target, "method": method, "baseline": base, "value": value,
                            "met": None if value is None else value >= threshold})
    if lm and "bp" in lm.get("runs", {}):
        ppll = {n: r["perplexity"] for n, r in lm["runs"].items() if n.startswith("ppll")}
        if ppll:
            best = min(ppll, key=ppll.get)
            gap = ppll[best] / lm["runs"]["bp"]["perplexity"] - 1
            out.append({"model": "gpt2", "target": f"validation perplexity, PPLL ({best}) within "
                        f"{LM_PERPLEXITY_GAP:.0%} of BP (value: relative gap)", "value": gap,
                        "met": gap <= LM_PERPLEXITY_GAP})
    if accuracy and "sequential" in accuracy.get("runs", {}) and "ppll-processes" in accuracy["runs"]:
        gap = 100 * abs(accuracy["runs"]["ppll-processes"]["accuracy"] - accuracy["runs"]["sequential"]["accuracy"])
        out.append({"model": accuracy["model"], "target": "|accuracy PPLL - sequential LL| <= 1.5 points",
                    "value": gap, "met": gap <= 1.5})
    return out


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def predicted_stages(plans: dict[str, dict], rows: list[dict]) -> list[str]:
    """A small table: each profiled split's predicted seconds per stage (body + aux head + send of one micro-batch)
    and share of the slowest, beside the stage busy fractions PPLL processes measured on that split."""
    if not plans:
        return []
    lines = ["", "Predicted stage times (the profile that chose each split; forward+backward of one micro-batch, "
             "body + aux head + send, share of the slowest stage) beside the measured busy fractions of PPLL "
             "processes:", "", "| model | split | predicted ms per stage (share) | measured stage busy |",
             "|---|---|---|---|"]
    for name, p in plans.items():
        model, k = name.split(" K=")
        method = "ppll-processes" + ("" if k == "2" else f"-k{k}")
        row = next((r for r in rows if r["model"] == model and r["method"] == method), None)
        predicted = ", ".join(f"{s['total_s'] * 1e3:.1f} ({s['share_of_bottleneck']:.0%})" for s in p["stages"] or [])
        lines.append(f"| {name} | {p['starts']} | {predicted or 'not timed'} | {_busy(row)} |")
    return lines


def throughput_table(rows: list[dict]) -> list[str]:
    """The throughput table: median and every run's samples/s, ratios to the baselines, busy, RSS."""
    lines = ["| model | method | samples/s (median) | runs | x sequential | x 1f1b | x ds-1f1b | stage busy | "
             "peak RSS MiB / process |", "|---|---|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        busy = ", ".join(f"{b:.0%}" for b in r["busy_fraction"])
        rss = ", ".join(f"{m:.0f}" for m in r["peak_rss_mb"])
        lines.append(f"| {r['model']} | {r['method']} | {r['median_samples_per_s']:.1f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['runs'])} | {_fmt(r['x_sequential'])} | {_fmt(r['x_1f1b'])} | "
                     f"{_fmt(r['x_ds-1f1b'])} | {busy} | {rss} |")
    return lines


def target_table(targets: list[dict]) -> list[str]:
    """The targets table: measured value and met / missed / not measured."""
    lines = ["| model | target | measured | met |", "|---|---|---:|---|"]
    for t in targets:
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "**missed**")
        lines.append(f"| {t['model']} | {t['target']} | {_fmt(t['value'])} | {met} |")
    return lines


Section = Callable[[Path], list[str]]
"""RESULTS.md lines summarising other results found in the results folder (none: [])."""


def markdown(doc: dict, out: Path, sections: Sequence[Section] = ()) -> str:
    """RESULTS.md: conditions, throughput table, targets (met / missed), accuracy, language-model quality, then (not
    for a quick run) the `sections` of the results folder `out`, pictures."""
    meta = doc["meta"]
    label = " (QUICK smoke run: not for the record)" if meta["quick"] else ""
    lines = [f"# ppll bench results{label}", "",
             f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min)", "",
             *([QUICK_NOTE, ""] if meta["quick"] else []),
             f"Date {meta['date']}; machine {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, "
             f"DeepSpeed {meta['deepspeed']}; ppll_ext {meta['ppll_ext_commit']}.", "",
             f"Throughput: K = {meta['stages']}, batch {meta['batch']}, {meta['micro']} micro-batches for every "
             f"method, {meta['steps']} timed steps after {meta['warmup']} warm-up, median of {meta['repeats']} "
             f"interleaved repeats, fresh processes, 1 torch thread per process (bp-2t: 2). Synthetic "
             f"CIFAR-10-shaped data (gpt2: random byte-level token blocks of 128, a sample = 128 tokens). "
             f"Stage boundaries (profiled once per model): "
             + ", ".join(f"{m} {p}" for m, p in meta["partitions"].items()) + ".", ""]
    if meta.get("skipped"):
        lines += [f"Skipped: {meta['skipped']}", ""]
    lines += throughput_table(doc["throughput"])
    lines += predicted_stages(meta.get("plans", {}), doc["throughput"])
    ran = {r["method"] for r in doc["throughput"]}
    legend = {k: v for k, v in {**METHODS, **K4_METHODS}.items() if k in ran}
    lines += ["", "Methods: " + "; ".join(f"**{k}** {v}" for k, v in legend.items()) + ".", "",
              "## Targets", "", *target_table(doc["targets"])]
    notes = explain(doc["throughput"], doc["targets"])
    if notes:
        lines += ["", "Missed targets, the numbers behind them:", ""] + [f"- {n}" for n in notes]
    acc = doc.get("accuracy")
    lines += ["", "## Accuracy", ""]
    if acc is None:
        lines.append(f"Not run: {meta.get('accuracy_skipped', 'no --data-root given')}.")
    else:
        lines += [f"{acc['model']}, K = {acc['stages']}, CIFAR-10 image folder, first {acc['train_subset']} training "
                  f"images (seeded subset), {acc['epochs']} epoch(s), test set "
                  f"{acc['test_subset'] or 'all 10000'} images, one torch thread per process; `{acc['config']}` "
                  f"with `{' '.join(acc['overrides'])}`.", "",
                  "| method | test accuracy | aux heads (early exit) | wall s |", "|---|---:|---|---:|"]
        for name, r in acc["runs"].items():
            lines.append(f"| {name} | {r['accuracy']:.4f} | {' '.join(f'{a:.4f}' for a in r['aux_accuracy'])} | "
                         f"{r['wall_s']:.0f} |")
    lm = doc.get("lm_quality")
    if lm is not None:
        lines += ["", "## Language-model quality", "",
                  f"{lm['model']}, `{lm['config']}` with `{' '.join(lm['overrides'])}` (K = 2, byte-level tokens of "
                  f"Python's reference documentation, {lm['epochs']} epoch(s), the same token budget for every "
                  f"method). Validation perplexity and token accuracy of the model, and of every aux head used as an "
                  f"early exit.", "",
                  "| method | val perplexity | token accuracy | aux heads: perplexity (token accuracy) | tokens/s | "
                  "wall s |", "|---|---:|---:|---|---:|---:|"]
        for name, r in lm["runs"].items():
            aux = ", ".join(f"{p:.3f} ({a:.4f})" for p, a in zip(r["aux_perplexity"], r["aux_token_accuracy"],
                                                                  strict=True))
            lines.append(f"| {name} | {r['perplexity']:.3f} | {r['token_accuracy']:.4f} | {aux or '–'} | "
                         f"{_fmt(r['tokens_per_s'], '.0f')} | {r['wall_s']:.0f} |")
    if not meta["quick"]:
        for section in sections:
            lines += section(out)
    lines += ["", "## Pictures", ""] + [f"![{p}]({p})" for p in doc["pictures"]] + [""]
    return "\n".join(lines)


def adapters_section(out: Path) -> list[str]:
    """The summary of the adapters-vs-native run in `out`/adapters (`ppll bench --out out/adapters`), with its command
    and date; [] when there is none."""
    lines: list[str] = []
    adapters = out / "adapters" / "bench.json"
    if adapters.is_file():
        doc = json.loads(adapters.read_text())
        m, rows = doc["meta"], doc["throughput"]
        shown = [t for t in evaluate_targets(rows, None) if t["baseline"] in ("2x-sequential", "ppll-processes")]
        lines += ["", "## Adapters against the native runtime", "",
                  f"`{m['command']}` ({m['date']}, {m['wall_s'] / 60:.1f} min; full report "
                  f"[adapters/RESULTS.md](adapters/RESULTS.md), analysis [adapters/ANALYSIS.md](adapters/ANALYSIS.md))"
                  f": the same split, batch and micro-batches for the native processes runtime, SchedulePPLL, "
                  f"DeepSpeed PPLL and the two-copy ceiling, interleaved.", "",
                  *throughput_table(rows), *predicted_stages(m.get("plans", {}), rows), "", *target_table(shown)]
    return lines
