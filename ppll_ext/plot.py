"""`ppll plot`: Gantt charts of pipeline traces, throughput bar charts and curves (matplotlib, Agg backend).

A trace is the Chrome-trace JSON that `ppll train --trace` (or the benchmarks) write: one row per
stage, one bar per event, coloured by kind. Several traces are stacked on one time axis, so PPLL's
streaming and 1F1B's bubbles compare at a glance.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from ppll_ext.errors import ConfigError
from ppll_ext.paths import write_atomically

COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "step": "#55a868", "send": "#8172b3", "eval": "#937860",
          "wait-in": "#c8c8c8", "wait-out": "#c44e52", "wait": "#a0a0a0"}
WAITS = ("wait-in", "wait-out", "wait")
"""Drawn thinner (idle time), after the work they may nest in (a wait for queue room happens inside a send)."""
WORK = ("forward", "backward", "step")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported only when a plot is made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("ppll plot needs matplotlib: pip install matplotlib") from exc
    return plt


def load_trace(path: str | os.PathLike) -> tuple[str, dict[int, str], list[dict]]:
    """(title, stage row names by pid, complete events) of a Chrome-trace JSON file."""
    try:
        doc = json.loads(Path(path).read_text())
        events = doc["traceEvents"] if isinstance(doc, dict) else doc
        names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
        spans = [e for e in events if e.get("ph") == "X"]
        _require(spans, ("ts", "dur", "pid", "name"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{str(path)!r} is not a readable Chrome-trace JSON with complete ('X') events: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not spans:
        raise ConfigError(f"{str(path)!r} holds no complete ('X') events to plot")
    title = (doc.get("otherData", {}).get("title") if isinstance(doc, dict) else None) or Path(path).stem
    return title, names, spans


def busy_fractions(events: list[dict]) -> dict[int, float]:
    """Per stage (pid): time in forward/backward/step over the trace's whole span."""
    start = min(e["ts"] for e in events)
    span = max(e["ts"] + e["dur"] for e in events) - start
    busy: dict[int, float] = {}
    for e in events:
        busy.setdefault(e["pid"], 0.0)
        if e["name"] in WORK:
            busy[e["pid"]] += e["dur"]
    return {pid: b / span if span > 0 else 0.0 for pid, b in busy.items()}


def plot_traces(paths: list[str | os.PathLike], out: str | os.PathLike,
                window: tuple[float, float] | None = None) -> Path:
    """Gantt chart of each trace (one subplot per file, one row per stage, shared time axis in ms) -> PNG.

    `window` = (start_ms, end_ms) zooms into part of the run.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    traces = [load_trace(p) for p in paths]
    rows = sum(len({e["pid"] for e in spans}) for _, _, spans in traces)
    fig, axes = plt.subplots(len(traces), 1, figsize=(13, 1.2 + 0.55 * rows + 0.9 * len(traces)), sharex=True,
                             squeeze=False)
    seen: set[str] = set()
    for ax, (title, names, spans) in zip(axes[:, 0], traces, strict=True):
        t0 = min(e["ts"] for e in spans)
        pids = sorted({e["pid"] for e in spans})
        order = [*[k for k in COLORS if k not in WAITS], *WAITS]
        bars: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for e in spans:
            bars.setdefault((e["name"], e["pid"]), []).append(((e["ts"] - t0) / 1e3, e["dur"] / 1e3))
        for (kind, pid), xs in sorted(bars.items(), key=lambda kv: order.index(kv[0][0]) if kv[0][0] in order else -1):
            height = 0.35 if kind in WAITS else 0.8
            y = pids.index(pid)
            ax.broken_barh(xs, (y - height / 2, height), facecolors=COLORS.get(kind, "#333333"), linewidth=0)
            seen.add(kind)
        busy = busy_fractions(spans)
        ax.set_yticks(range(len(pids)), [f"{names.get(p, f'stage {p}')} ({busy[p]:.0%} busy)" for p in pids])
        ax.set_ylim(len(pids) - 0.5, -0.5)
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    if window is not None:
        axes[-1, 0].set_xlim(*window)
    axes[-1, 0].set_xlabel("time (ms)")
    order = [k for k in COLORS if k in seen] + sorted(seen - set(COLORS))
    fig.legend(handles=[Patch(color=COLORS.get(k, "#333333"), label=k) for k in order], loc="upper right",
               ncol=len(order), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, plt, out)


def plot_bench(bench: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Throughput bar chart of a benchmark results JSON (one panel per model, median with min-max of runs)."""
    plt = _pyplot()
    try:
        doc = json.loads(Path(bench).read_text())
        rows = doc.get("throughput") or doc["results"]
        _require(rows, ("model", "method", "median_samples_per_s", "runs"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{str(bench)!r} is not a benchmark results JSON (rows with model, method, "
                          f"median_samples_per_s, runs): {type(exc).__name__}: {exc}") from exc
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 3.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        med = [r["median_samples_per_s"] for r in mine]
        lo = [m - min(r["runs"], default=m) for m, r in zip(med, mine, strict=True)]
        hi = [max(r["runs"], default=m) - m for m, r in zip(med, mine, strict=True)]
        colors = ["#c44e52" if r["method"].startswith(("ppll", "ds-ppll")) else "#4c72b0" for r in mine]
        ax.bar(range(len(mine)), med, yerr=[lo, hi], color=colors, capsize=3)
        base = {r["method"]: r["median_samples_per_s"] for r in mine}.get("sequential")
        for i, m in enumerate(med):
            label = f"{m:.0f}" + (f"\n{m / base:.2f}x" if base else "")
            ax.annotate(label, (i, m + hi[i]), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(range(len(mine)), [r["method"] for r in mine], rotation=20, ha="right")
        ax.set_ylabel("samples/s")
        ax.set_ylim(0, max(med) * 1.3)
        ax.set_title(f"{model}: median of {statistics.median(len(r['runs']) for r in mine):.0f} runs "
                     f"(bars: min-max; ratios to sequential LL)", loc="left", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, out)


def plot_curves(series: dict[str, list[tuple[float, float]]], out: str | os.PathLike, *, xlabel: str, ylabel: str,
                title: str = "", log_y: bool = False) -> Path:
    """One line per named series of (x, y) points on shared axes (e.g. validation perplexity per epoch of several
    methods and aux heads)."""
    plt = _pyplot()
    if not any(series.values()):
        raise ConfigError("no points to plot")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=name, linestyle="--" if "aux" in name else "-")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, out)


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Training curves of runs (folders or metrics.jsonl files) -> PNG: a 2x2 figure of training loss and evaluation
    accuracy (perplexity for language models) against step and against wall time, one line per stage and per run,
    aux heads dashed."""
    from ppll_ext.train.metrics import read_metrics

    plt = _pyplot()
    loaded = [(_run_name(r), read_metrics(r)) for r in runs]
    lm = any("perplexity" in rec for _, records in loaded for rec in records)
    metric = "perplexity" if lm else "accuracy"
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    for name, records in loaded:
        steps = [r for r in records if r["kind"] == "step"]
        evals = [r for r in records if r["kind"] == "eval" and metric in r]
        for col, x in enumerate(("step", "time_s")):
            for k in range(len(steps[0]["loss"]) if steps else 0):
                axes[0, col].plot([r[x] for r in steps], [r["loss"][k] for r in steps], label=f"{name} stage {k}",
                                  linewidth=1)
            if evals:
                xs = [r[x] for r in evals]
                axes[1, col].plot(xs, [r[metric] for r in evals], marker="o", markersize=3, label=f"{name} model")
                for k in range(len(evals[0][f"aux_{metric}"])):
                    axes[1, col].plot(xs, [r[f"aux_{metric}"][k] for r in evals], marker="o", markersize=3,
                                      linestyle="--", label=f"{name} aux head {k}")
    ylabel = "validation perplexity" if lm else "test accuracy"
    for row, col, title in ((0, 0, "training loss (mean per step)"), (0, 1, "training loss"),
                            (1, 0, ylabel), (1, 1, ylabel)):
        ax = axes[row, col]
        ax.set_xlabel("step" if col == 0 else "wall time (s)")
        ax.set_ylabel("loss" if row == 0 else ylabel)
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if lm:
        axes[1, 0].set_yscale("log")
        axes[1, 1].set_yscale("log")
    fig.tight_layout()
    return _save(fig, plt, out)


def _run_name(run: str | os.PathLike) -> str:
    """A run's label: its folder's name (the folder holding metrics.jsonl when given the file)."""
    p = Path(run).absolute()
    return (p.parent if p.is_file() else p).name


def _require(rows: list[dict], keys: tuple[str, ...]) -> None:
    """KeyError naming the first field missing from a row."""
    for row in rows:
        missing = [k for k in keys if k not in row]
        if missing:
            raise KeyError(f"{missing[0]!r} missing in {row}")


def _save(fig, plt, out: str | os.PathLike) -> Path:
    """Write the figure at `out` in the format its suffix names (PNG without one), through a temporary file renamed
    onto it: only onto a regular file or a new name (paths.write_atomically)."""
    fmt = Path(out).suffix[1:].lower() or "png"
    try:
        return write_atomically(out, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt), f"--out {str(out)!r}",
                                example="plot.png")
    finally:
        plt.close(fig)
