"""Time to accuracy: training wall-clock seconds until ResNet-20 (K = 2) reaches 60 % and 70 % CIFAR-10 test accuracy.

Local learning changes the learning rule, so samples/s alone says little: this benchmark trains the same model
with the same hyper-parameters, learning-rate schedule, batch size, augmentation, data order and number of epochs
with four methods and records, after every epoch, the training seconds so far and the test accuracy on the whole
test set:

    bp                end-to-end backprop, 1 process x 2 torch threads (`ppll train --set train.method=bp`)
    1f1b              torch.distributed.pipelining Schedule1F1B, 2 processes (gloo) x 1 thread, end-to-end
                      backprop through the same 2 stages (`ppll train --set local.engine=torch --set
                      local.schedule=1F1B`)
    ppll-conv         PPLL, processes runtime, 2 processes x 1 thread, conv aux head (`ppll train`)
    ppll-next-blocks  the same with next-blocks aux head (a copy of the next stage's first block before the head)

Training seconds exclude evaluation, checkpoint saves and start-up alike for every method: each epoch's share is
the wall time of its training segments (from the first batch's loading to the last stage's last optimizer step),
derived from metrics.jsonl's per-step samples/s, which is segment samples / segment seconds.

Resumable: results go to benchmarks/results/<out>/<method>.json as each epoch ends; a finished method is not
rerun, an interrupted one resumes from its last epoch checkpoint (run folders under runs/<out>/), and the training
seconds add up across resumes. `--fresh` starts the selected methods over.

    python benchmarks/tta_bench.py                          # the full run (about an hour on 2 cores)
    python benchmarks/tta_bench.py --quick                  # a smoke run: files named *-quick*, not for the record
    python benchmarks/tta_bench.py --methods bp 1f1b        # some methods (the report covers every finished one)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from ppll_ext import checkpoint as ckpt
from ppll_ext.bench.driver import machine
from ppll_ext.build import stage_boundaries
from ppll_ext.config import load_config
from ppll_ext.errors import CheckpointError, ConfigError
from ppll_ext.runtime.guard import die_with_parent
from ppll_ext.train.job import prepare
from ppll_ext.train.metrics import read_metrics

log = logging.getLogger("tta_bench")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DATASETS = ROOT.parent / "shared" / "datasets"
TARBALL = "cifar10-jpeg.tar.gz"
METHODS = {
    "bp": "BP (1 process x 2 threads)",
    "1f1b": "torch 1F1B (2 processes)",
    "ppll-conv": "PPLL, conv aux (2 processes)",
    "ppll-next-blocks": "PPLL, next-blocks aux (2 processes)",
}
PPLL_METHODS = ("ppll-conv", "ppll-next-blocks")
THRESHOLDS = (0.60, 0.70)
TARGET_ACC, TARGET_RATIO = 0.70, 0.8
EXPECTED_SPS = {"bp": 370.0, "1f1b": 350.0, "ppll-conv": 420.0, "ppll-next-blocks": 400.0}
"""ResNet-20 samples/s on this 2-core machine when nothing else runs, for the run-length estimate only: RESULTS.md's
quiet ResNet-32 figures (BP 2 threads 233, 1F1B 225, PPLL 268) x 1.6 (9 residual blocks instead of 15), PPLL
lowered for the 0,4 cut's aux head. Measured here on the real data with other work running (load average 3-7,
nice 10; 12,800 or 6,400 images): BP 22-55, 1F1B 112-183, PPLL conv 162-305, next-blocks 154-162: a busy machine
slows every method, two-thread BP most, so the run needs a quiet machine."""
EXPECTED_EVAL_S = 12.0
"""Seconds per evaluation of the 10,000 test images plus the epoch checkpoint (20 s measured under load)."""
START_S = 20.0
"""Start-up seconds per method launch (processes, data, model), for the estimate."""
DEFAULT_EPOCHS = 6
DEFAULT_PARTITION = {"resnet20": "0,4"}
"""The cut of every method, where fixed: ResNet-20's layers (stem, 9 blocks, head) timed forward + backward at batch
128 on one thread here took 65, 200, 204, 215, 185, 124, 128, 124, 106, 109, 1 ms, so stages starting at layers 0
and 4 balance end-to-end backprop best (684 / 777 ms; 1F1B's best cut); PPLL stage 0 adds its aux head (290 ms conv
head, ~250 ms next-blocks head), so the cut is if anything unfavourable to PPLL. Other models are profiled once."""
QUICK = {"train_subset": 2000, "test_subset": 1000, "epochs": 1}
POLL_S = 2.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every method shares; a method's stored results are reused only under the same settings."""

    model: str
    epochs: int
    batch_size: int
    microbatches: int
    lr: float
    weight_decay: float
    seed: int
    train_subset: int | None
    test_subset: int | None
    partition: str

    def overrides(self, data_root: Path, cache_dir: Path) -> list[str]:
        """The `--set` values of every method: model, data, cut, optimizer and schedule, batch, epochs."""
        return [f"model.name={self.model}", "data.name=imagefolder", f"data.root={data_root}",
                f"data.cache_dir={cache_dir}", f"data.train_subset={self.train_subset or 'null'}",
                f"data.test_subset={self.test_subset or 'null'}", "data.augment=true", "local.stages=2",
                f"local.partition={self.partition}", "optim.name=sgd", f"optim.lr={self.lr}", "optim.momentum=0.9",
                "optim.nesterov=true", f"optim.weight_decay={self.weight_decay}", "optim.schedule=cosine",
                "optim.warmup_steps=0", f"train.batch_size={self.batch_size}", "train.eval_batch_size=500",
                f"train.epochs={self.epochs}", f"train.seed={self.seed}"]


def method_overrides(method: str, microbatches: int) -> list[str]:
    """What sets `method` apart (1F1B: `microbatches` micro-batches per mini-batch)."""
    if method == "bp":
        return ["train.method=bp", "train.threads=2"]
    if method == "1f1b":
        return ["train.method=local", "local.runtime=processes", "local.engine=torch", "local.schedule=1F1B",
                f"local.micro_batches={microbatches}", "train.threads=1"]
    return ["train.method=local", "local.runtime=processes", f"local.aux={method.removeprefix('ppll-')}",
            "local.micro_batches=1", "train.threads=0"]


# ---------------------------------------------------------------------------------------------------------------
# Data


def find_data(data_root: str | None, cache_dir: Path) -> Path:
    """The CIFAR-10 image-folder tree: `data_root` itself, its cifar10/ folder, or its cifar10-jpeg.tar.gz (or the
    tarball itself) unpacked once into `cache_dir`; by default ../shared/datasets beside the repository."""
    root = Path(data_root).expanduser() if data_root else DATASETS
    for tree in (root, root / "cifar10"):
        if (tree / "train").is_dir() and (tree / "test").is_dir():
            return tree
    tar = root if root.is_file() else root / TARBALL
    if not tar.is_file():
        raise ConfigError(f"no CIFAR-10 at {str(root)!r} (neither {TARBALL} nor an image-folder tree with train/ and "
                          f"test/); pass --data-root DIR")
    tree = cache_dir / "cifar10"
    stamp = f"{tar.stat().st_size} {tar.stat().st_mtime_ns}"
    marker = cache_dir / "cifar10.unpacked"
    if tree.is_dir() and marker.is_file() and marker.read_text() == stamp:
        return tree
    log.info("unpacking %s into %s (once)", tar, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=cache_dir))
    try:
        with tarfile.open(tar) as f:
            f.extractall(tmp, filter="data")
        if not (tmp / "cifar10" / "train").is_dir():
            raise ConfigError(f"{str(tar)!r} holds no cifar10/train/ folder; pass --data-root DIR of the CIFAR-10 "
                              f"image-folder tree")
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(tmp / "cifar10", tree)
        marker.write_text(stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


def batch_samples(step: int, n_train: int, batch_size: int) -> int:
    """Samples in global optimizer step `step` (1-based): a full batch, or the rest in an epoch's last step."""
    per_epoch = -(-n_train // batch_size)
    return batch_size if (step - 1) % per_epoch < per_epoch - 1 else n_train - (per_epoch - 1) * batch_size


def evaluations(records: list[dict], n_train: int, batch_size: int) -> list[dict]:
    """Per evaluation of a metrics.jsonl: epoch (1-based), step, training seconds so far (sum over steps of samples /
    the step's segment samples/s, i.e. the training segments' wall time), wall seconds and test accuracy."""
    seconds: dict[int, float] = {}
    for r in records:
        if r["kind"] == "step":
            seconds[r["step"]] = batch_samples(r["step"], n_train, batch_size) / r["samples_per_s"]
    out = []
    for r in records:
        if r["kind"] == "eval":
            train_s = sum(s for step, s in seconds.items() if step <= r["step"])
            out.append({"epoch": r["epoch"] + 1, "step": r["step"], "train_s": round(train_s, 6),
                        "wall_s": r["time_s"], "accuracy": r["accuracy"]})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Driving the methods


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the benchmark: stop the running method, keep its results so far."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether an interrupted run left a complete epoch checkpoint to resume from."""
    try:
        return bool(ckpt.checkpoints(run_dir))
    except CheckpointError:
        return False


def command(method: str, s: Settings, overrides: list[str], run_dir: Path, resume: bool) -> list[str]:
    """The process that trains `method` (resuming from `run_dir` if `resume`)."""
    sets = [a for o in overrides + method_overrides(method, s.microbatches) for a in ("--set", o)]
    per_epoch = -(-n_train_of(s) // s.batch_size)
    cmd = [sys.executable, "-m", "ppll_ext", "train", *sets, "--save-dir", str(run_dir), "--save-every",
           str(per_epoch), "--keep", "1"]
    return cmd + (["--resume", str(run_dir)] if resume else [])


def n_train_of(s: Settings) -> int:
    """Training images per epoch (CIFAR-10 has 50,000)."""
    return min(s.train_subset or 50_000, 50_000)


def read_evals(run_dir: Path, s: Settings) -> list[dict]:
    """The evaluations recorded so far in `run_dir`/metrics.jsonl (none before the first)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    try:
        return evaluations(read_metrics(run_dir), n_train_of(s), s.batch_size)
    except ConfigError:
        return []


def run_method(method: str, s: Settings, overrides: list[str], run_dir: Path, result_file: Path,
               result: dict) -> dict:
    """Train `method` to the end (resuming where it stopped), saving its results after every evaluation."""
    resume = has_checkpoint(run_dir)
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # nothing resumable: an interruption before the first epoch's checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(method, s, overrides, run_dir, resume)
    log.info("%s: %s%s", method, "resuming from " if resume else "starting in ", run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if method != "bp" else "2", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    parent = os.getpid()
    began, elapsed = time.monotonic(), result.get("elapsed_s", 0.0)
    result.update(status="running", launches=result.get("launches", 0) + 1)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, preexec_fn=lambda: die_with_parent(parent))
    seen = len(result.get("evals", []))
    try:
        while True:
            code = proc.poll()
            evals = read_evals(run_dir, s)
            if len(evals) != seen:
                for ev in evals[seen:]:
                    left = (s.epochs - ev["epoch"]) * ev["wall_s"] / ev["epoch"] / 60
                    log.info("%s: epoch %d/%d, test accuracy %.4f after %.1f s of training (this method: about %.0f "
                             "min left at this pace)", method, ev["epoch"], s.epochs, ev["accuracy"], ev["train_s"],
                             left)
                seen = len(evals)
                update(result, evals, elapsed + time.monotonic() - began, s)
                write_json(result_file, result)
            if code is not None:
                break
            time.sleep(POLL_S)
    except Interrupted:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        update(result, read_evals(run_dir, s), elapsed + time.monotonic() - began, s)
        result["status"] = "interrupted"
        write_json(result_file, result)
        raise
    update(result, read_evals(run_dir, s), elapsed + time.monotonic() - began, s)
    result["status"] = "done" if code == 0 else f"failed (exit code {code})"
    write_json(result_file, result)
    if code == 0 and len(result["evals"]) != s.epochs:
        log.warning("%s: %d evaluations for %d epochs (an evaluation interrupted after its epoch's checkpoint is "
                    "not redone on resume)", method, len(result["evals"]), s.epochs)
    if code != 0:
        raise RuntimeError(f"{method} failed with exit code {code}; rerun to resume it")
    return result


def update(result: dict, evals: list[dict], elapsed: float, s: Settings) -> None:
    """Fill `result` from the evaluations so far: curve, final accuracy, samples/s, times to the thresholds."""
    result["evals"] = evals
    result["elapsed_s"] = round(elapsed, 1)
    if not evals:
        return
    last = evals[-1]
    result["final_accuracy"] = last["accuracy"]
    result["train_s"] = last["train_s"]
    result["samples_per_s"] = round(last["epoch"] * n_train_of(s) / last["train_s"], 1)
    for t in THRESHOLDS:
        result[f"t{round(t * 100)}"] = time_to(evals, t)


def time_to(evals: list[dict], threshold: float) -> dict | None:
    """The first evaluation at or above `threshold`: its training seconds and epoch, and the seconds linearly
    interpolated between it and the evaluation before (before the first: 0 s at chance, 10 %); None if never
    reached."""
    before = {"train_s": 0.0, "accuracy": 0.1}
    for ev in evals:
        if ev["accuracy"] >= threshold:
            frac = (threshold - before["accuracy"]) / max(1e-9, ev["accuracy"] - before["accuracy"])
            interp = before["train_s"] + max(0.0, min(1.0, frac)) * (ev["train_s"] - before["train_s"])
            return {"train_s": ev["train_s"], "epoch": ev["epoch"], "interpolated_s": round(interp, 1)}
        before = ev
    return None


def write_json(path: Path, obj: object) -> None:
    """Write atomically (temp file + rename), so an interrupted write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Report


def estimate_s(s: Settings, methods: list[str]) -> float:
    """Estimated seconds of `methods` on a quiet machine (EXPECTED_SPS: ResNet-20; ResNet-32 takes 1.6x longer)."""
    n_test = min(s.test_subset or 10_000, 10_000)
    slower = 1.6 if s.model == "resnet32" else 1.0
    return sum(START_S + s.epochs * (slower * n_train_of(s) / EXPECTED_SPS[m] + EXPECTED_EVAL_S * n_test / 10_000)
               for m in methods)


def target_check(results: dict[str, dict]) -> list[dict]:
    """The target "PPLL reaches 70 % in <= 0.8x the training time of 1F1B and of BP", per PPLL method and baseline:
    met / missed with the numbers, or not determined when a method stopped short of 70 %."""
    key = f"t{round(TARGET_ACC * 100)}"
    rows = []
    for p in PPLL_METHODS:
        for base in ("1f1b", "bp"):
            if p not in results or base not in results:
                continue
            mine, theirs = results[p].get(key), results[base].get(key)
            row = {"method": p, "baseline": base, "method_s": mine and mine["train_s"],
                   "baseline_s": theirs and theirs["train_s"], "ratio": None}
            if mine and theirs:
                row["ratio"] = round(mine["train_s"] / theirs["train_s"], 3)
                row["met"] = row["ratio"] <= TARGET_RATIO
                row["note"] = f"{mine['train_s']:.0f} s vs {theirs['train_s']:.0f} s = {row['ratio']:.2f}x"
            elif mine and mine["train_s"] <= TARGET_RATIO * results[base].get("train_s", 0.0):
                row["met"] = True
                row["note"] = (f"{mine['train_s']:.0f} s; {base} never reached {TARGET_ACC:.0%} in its "
                               f"{results[base]['train_s']:.0f} s of training")
            elif not mine:
                row["met"] = False
                row["note"] = f"{p} never reached {TARGET_ACC:.0%} ({results[p].get('final_accuracy', 0):.2%} at end)"
            else:
                row["met"] = None
                row["note"] = (f"not determined: {mine['train_s']:.0f} s; {base} never reached {TARGET_ACC:.0%} in "
                               f"its {results[base].get('train_s', 0):.0f} s")
            rows.append(row)
    return rows


def _t(entry: dict | None) -> str:
    return f"{entry['train_s']:.0f} (ep {entry['epoch']}, ~{entry['interpolated_s']:.0f})" if entry else "not reached"


def _ratio(results: dict[str, dict], method: str, base: str) -> str:
    cells = []
    for t in THRESHOLDS:
        key = f"t{round(t * 100)}"
        mine, theirs = results[method].get(key), results.get(base, {}).get(key)
        cells.append(f"{mine['train_s'] / theirs['train_s']:.2f}" if mine and theirs else "-")
    return " / ".join(cells)


def table(results: dict[str, dict]) -> list[str]:
    """Markdown lines: per method, the training seconds to 60 % and 70 %, PPLL's ratios to 1F1B and BP, the final
    accuracy and the pace (also RESULTS.md's time-to-accuracy table)."""
    head = ["method", "status", "time to 60 % (s)", "time to 70 % (s)", "PPLL/1F1B (60 / 70 %)",
            "PPLL/BP (60 / 70 %)", "final acc", "samples/s", "train s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in results.items():
        ppll = m in PPLL_METHODS
        lines.append(f"| {METHODS[m]} | {r['status']} | {_t(r.get('t60'))} | {_t(r.get('t70'))} | "
                     f"{_ratio(results, m, '1f1b') if ppll else ''} | {_ratio(results, m, 'bp') if ppll else ''} | "
                     f"{r.get('final_accuracy', math.nan):.4f} | {r.get('samples_per_s', math.nan):.1f} | "
                     f"{r.get('train_s', math.nan):.0f} | {r.get('elapsed_s', math.nan):.0f} |")
    return lines


def target_lines(checks: list[dict]) -> list[str]:
    """One line per PPLL method and baseline: met, missed or not determined, with the seconds behind it."""
    return [f"- {c['method']} vs {c['baseline']}: "
            f"{'met' if c['met'] else 'missed' if c['met'] is False else 'not determined'} ({c['note']})"
            for c in checks] or ["- not evaluated (needs a PPLL method and its baselines)"]


def report(results: dict[str, dict], s: Settings, out: str, meta: dict) -> str:
    """Write <out>.json, <out>.md and <out>.png from every method's results; returns the markdown."""
    checks = target_check(results)
    epochs = max((len(r["evals"]) for r in results.values()), default=0)
    lines = table(results)
    per_epoch = ["| method | " + " | ".join(f"ep {e + 1}" for e in range(epochs)) + " |",
                 "|---|" + "---:|" * epochs]
    for m, r in results.items():
        cells = [f"{ev['accuracy']:.4f} ({ev['train_s']:.0f} s)" for ev in r["evals"]]
        per_epoch.append(f"| {METHODS[m]} | " + " | ".join(cells + [""] * (epochs - len(cells))) + " |")
    target = target_lines(checks)
    total = sum(r.get("elapsed_s", 0.0) for r in results.values())
    est = meta.get("estimate_s")
    md = [f"# Time to accuracy: {s.model}, K = 2, CIFAR-10 ({meta['date']})", "",
          f"Command: `{meta['command']}`", "",
          f"Length: {total / 60:.1f} min of method runs in all (start-up, training, evaluation, checkpoints; "
          f"summed over resumes); this invocation {meta['invocation_s'] / 60:.1f} min"
          + (f"; estimated beforehand {est / 60:.0f} min for the methods it ran, from expected quiet-machine "
             f"samples/s" if est else "") + ".", "",
          f"Machine: {meta['machine']}; torch {meta['torch']}; Python {meta['python']}; 1-minute load average "
          f"{meta['load_average']['start'][0]:.1f} at the start of this invocation, "
          f"{meta['load_average']['end'][0]:.1f} at its end (other work slows every method, multi-threaded BP most).",
          "",
          f"Settings (the same for every method): {s.model}, cut at layers {s.partition} (2 stages), batch "
          f"{s.batch_size}, SGD lr {s.lr} Nesterov momentum 0.9, weight decay {s.weight_decay}, cosine schedule over "
          f"{s.epochs} epochs, random crop + flip, seed {s.seed}, train images "
          f"{n_train_of(s)}, test images {min(s.test_subset or 10_000, 10_000)}; 1F1B: {s.microbatches} "
          f"micro-batches; PPLL: 1 micro-batch (streams mini-batches).", "",
          "Times are training seconds only (the wall time of the training segments: no evaluation, checkpoint or "
          "start-up), at the first evaluation (once per epoch) at or above the accuracy; `~` is linearly "
          "interpolated between evaluations. Ratios use the first-evaluation times.", "",
          "\n".join(lines), "",
          f"## Target: PPLL reaches {TARGET_ACC:.0%} in <= {TARGET_RATIO}x the training time of 1F1B and of BP", "",
          "\n".join(target), "", "## Test accuracy per epoch (training seconds so far)", "", "\n".join(per_epoch), "",
          f"![test accuracy vs training seconds]({out}.png)", ""]
    text = "\n".join(md)
    (RESULTS / f"{out}.md").write_text(text)
    write_json(RESULTS / f"{out}.json", {"meta": {**meta, "settings": dataclasses.asdict(s)}, "methods": results,
                                         "target": checks})
    plot(results, RESULTS / f"{out}.png", s)
    return text


def plot(results: dict[str, dict], path: Path, s: Settings) -> None:
    """Test accuracy against training seconds, one line per method, with the 60 % and 70 % lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m, r in results.items():
        xs = [ev["train_s"] for ev in r["evals"]]
        ys = [100 * ev["accuracy"] for ev in r["evals"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=METHODS[m])
    for t in THRESHOLDS:
        ax.axhline(100 * t, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{s.model}, K = 2, CIFAR-10, {s.epochs} epochs", loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_result(path: Path, method: str, s: Settings) -> dict:
    """A method's stored results, or a new record; ConfigError if stored under other settings."""
    if not path.is_file():
        return {"method": method, "label": METHODS[method], "settings": dataclasses.asdict(s), "status": "new",
                "evals": []}
    result = json.loads(path.read_text())
    if result["settings"] != dataclasses.asdict(s):
        diff = {k: (v, result["settings"].get(k)) for k, v in dataclasses.asdict(s).items()
                if result["settings"].get(k) != v}
        changed = ", ".join(f"{k} {theirs} there, {mine} now" for k, (mine, theirs) in diff.items())
        raise ConfigError(f"{path} was made with other settings ({changed}); rerun with the same options, or add "
                          f"--fresh --methods {method} to start {method} over")
    return result


def main() -> None:
    """Parse arguments, run the methods and write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=None, help=f"epochs for every method (default {DEFAULT_EPOCHS})")
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=4, help="1F1B micro-batches per mini-batch (default 4)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partition", help="first layers of the 2 stages, e.g. 0,5 (default: 0,4 for resnet20, else "
                                       "profiled once; then the stored results' cut)")
    p.add_argument("--train-subset", type=int, help="train on the first N images (after a fixed shuffle)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test images")
    p.add_argument("--data-root", help=f"CIFAR-10: the folder holding {TARBALL}, the tarball, or an image-folder "
                                       f"tree (default: ../shared/datasets beside the repository)")
    p.add_argument("--cache-dir", default=str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "ppll_ext"),
                   help="where the tarball is unpacked and the decoded images cached (default ~/.cache/ppll_ext)")
    p.add_argument("--fresh", action="store_true", help="discard the selected methods' results and runs, start over")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['train_subset']} train / {QUICK['test_subset']} test images, 1 epoch, "
                        f"files named *-quick*")
    p.add_argument("--out", help="results stem under benchmarks/results/ (default tta, or tta-quick with --quick)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="tta: %(message)s")
    try:
        bench(a)
    except (ConfigError, CheckpointError) as exc:
        print(f"tta_bench: error: {exc}", file=sys.stderr)
        sys.exit(2)


def bench(a: argparse.Namespace) -> None:
    """Run the selected methods one after another (resuming unfinished ones) and write the report."""
    started, load_start = time.monotonic(), os.getloadavg()
    if a.quick:
        a.epochs = a.epochs or QUICK["epochs"]
        a.train_subset = a.train_subset or QUICK["train_subset"]
        a.test_subset = a.test_subset or QUICK["test_subset"]
    out = a.out or ("tta-quick" if a.quick else "tta")
    cache_dir = Path(a.cache_dir).expanduser().absolute()
    data_root = find_data(a.data_root, cache_dir)
    folder, runs = RESULTS / out, ROOT / "runs" / out
    if a.fresh:
        for m in a.methods:
            (folder / f"{m}.json").unlink(missing_ok=True)
            shutil.rmtree(runs / m, ignore_errors=True)
    partition = (a.partition or stored_partition(folder) or DEFAULT_PARTITION.get(a.model)
                 or profile_partition(a, data_root, cache_dir))
    s = Settings(a.model, a.epochs or DEFAULT_EPOCHS, a.batch_size, a.microbatches, a.lr, a.weight_decay, a.seed,
                 a.train_subset, a.test_subset, partition)
    overrides = s.overrides(data_root, cache_dir)
    for m in a.methods:  # bad values fail here, once, before any process starts
        load_config(None, overrides + method_overrides(m, s.microbatches))
    last = n_train_of(s) - (-(-n_train_of(s) // s.batch_size) - 1) * s.batch_size
    if "1f1b" in a.methods and last < s.microbatches:
        raise ConfigError(f"1F1B takes {s.microbatches} micro-batches every step but the epoch's last batch has {last} "
                          f"image(s); change --batch-size, --microbatches or --train-subset")
    results = {m: load_result(folder / f"{m}.json", m, s) for m in METHODS if (folder / f"{m}.json").is_file()
               or m in a.methods}
    todo = [m for m in a.methods if results[m]["status"] != "done"]
    est = estimate_s(s, todo)
    log.info("settings: %s, cut at %s, %d epochs, batch %d; to run: %s; estimated %.0f min on a quiet machine "
             "(load average now %.1f)", s.model, partition, s.epochs, s.batch_size, ", ".join(todo) or "nothing",
             est / 60, load_start[0])
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for m in todo:
            run_method(m, s, overrides, runs / m, folder / f"{m}.json", results[m])
    except Interrupted as exc:
        log.info("interrupted (%s): rerun the same command to resume", exc)
        sys.exit(128 + exc.signum)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    meta = {**machine(), "estimate_s": est, "invocation_s": time.monotonic() - started,
            "load_average": {"start": load_start, "end": os.getloadavg()}}
    ordered = {m: results[m] for m in METHODS if m in results}
    print(report(ordered, s, out, meta))


def stored_partition(folder: Path) -> str | None:
    """The cut the stored results of this run used (all methods share one)."""
    for path in sorted(folder.glob("*.json")):
        return json.loads(path.read_text())["settings"]["partition"]
    return None


def profile_partition(a: argparse.Namespace, data_root: Path, cache_dir: Path) -> str:
    """Cut the model once by measured layer + conv aux-head time on a real batch (1 thread); every method uses it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, [f"model.name={a.model}", "data.name=imagefolder", f"data.root={data_root}",
                                 f"data.cache_dir={cache_dir}", "local.stages=2", "local.partition=profile",
                                 "local.aux=conv", f"train.batch_size={a.batch_size}"])
        job = prepare(cfg)
        x = next(iter(job.train_loader))[0]
        bounds = stage_boundaries(cfg, job.layered, x)
    finally:
        torch.set_num_threads(threads)
    partition = ",".join(str(b) for b in bounds[:-1])
    log.info("profiled cut: stages start at layers %s", partition)
    return partition


if __name__ == "__main__":
    main()
