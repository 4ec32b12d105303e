"""The training job: config -> data -> model -> blocks -> runtime -> metrics and a summary.

Run as `ppll train ...` or `python -m ppll_ext.train ...` (the form launchers such as
`accelerate launch -m` use).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ppll_ext.build import build_blocks, build_bp_block, build_layered
from ppll_ext.config import Config
from ppll_ext.data import BatchLoader, load_dataset
from ppll_ext.runtime import EpochStats, EvalResult, SequentialRunner, StageStats


@dataclass
class Summary:
    """What a finished run reports."""

    method: str
    runtime: str
    stages: int
    boundaries: list[int]
    epochs: int
    accuracy: float
    aux_accuracy: list[float]
    samples_per_s: float
    seconds: float
    stage_stats: list[StageStats] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        aux = " ".join(f"{a:.4f}" for a in self.aux_accuracy)
        aux = f" | aux heads (early exit) {aux}" if aux else ""
        out = [
            f"summary: method={self.method} runtime={self.runtime} stages={self.stages} "
            f"boundaries={self.boundaries} epochs={self.epochs}",
            f"  test accuracy {self.accuracy:.4f}" + aux,
            f"  throughput {self.samples_per_s:.1f} samples/s (last epoch) | total {self.seconds:.1f} s",
        ]
        for st in self.stage_stats:
            total = st.busy_s + st.wait_in_s + st.wait_out_s
            busy = st.busy_s / total if total > 0 else 1.0
            out.append(
                f"  stage {st.index}: loss {st.mean_loss:.4f} | busy {st.busy_s:.1f} s ({busy:.0%}) | "
                f"wait in {st.wait_in_s:.1f} s, out {st.wait_out_s:.1f} s | steps {st.steps}"
            )
        return out


def epoch_line(epoch: int, epochs: int, stats: EpochStats, ev: EvalResult) -> str:
    """One line per epoch: per-stage loss, test accuracy (model and aux heads), throughput."""
    losses = " ".join(f"{s.mean_loss:.3f}" for s in stats.stages)
    aux = f" (aux {' '.join(f'{a:.3f}' for a in ev.aux_accuracy)})" if ev.aux_accuracy else ""
    return (
        f"epoch {epoch + 1}/{epochs} | loss {losses} | test acc {ev.accuracy:.4f}{aux} | "
        f"{stats.samples_per_s:.0f} samples/s"
    )


def run_training(cfg: Config, *, out=sys.stdout) -> Summary:
    """Train as `cfg` says in this process (sequential runtime or BP) and return the summary."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    train_ds = load_dataset(cfg.data, "train")
    test_ds = load_dataset(cfg.data, "test")
    train_loader = BatchLoader(train_ds, cfg.train.batch_size, shuffle=True, augment=cfg.data.augment,
                               seed=cfg.train.seed)
    test_loader = BatchLoader(test_ds, cfg.train.eval_batch_size, shuffle=False, augment=False)
    layered = build_layered(cfg, in_channels=train_ds.in_channels, image_size=train_ds.image_size,
                            num_classes=train_ds.num_classes)
    total_steps = cfg.train.epochs * len(train_loader)
    example = next(iter(test_loader))[0][: min(8, cfg.train.batch_size)]
    if cfg.train.method == "bp":
        blocks = [build_bp_block(cfg, layered, total_steps=total_steps)]
        boundaries = [0, len(layered.layers)]
        runtime = "sequential"
    else:
        boundaries, by_index = build_blocks(cfg, layered, example, total_steps=total_steps)
        blocks = [by_index[i] for i in sorted(by_index)]
        runtime = cfg.local.runtime
    runner = SequentialRunner(blocks, cfg.local.micro_batches if cfg.train.method == "local" else 1)
    print(f"training {cfg.model.name} on {cfg.data.name} ({len(train_ds)} train / {len(test_ds)} test), "
          f"method={cfg.train.method}, stages={len(blocks)} at layers {boundaries}", file=out)
    start = time.perf_counter()
    stats = None
    ev = None
    for epoch in range(cfg.train.epochs):
        train_loader.set_epoch(epoch)
        bar = tqdm(total=len(train_ds), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="img",
                   disable=not cfg.train.progress, leave=False, file=out)

        def on_batch(n: int, st: list[StageStats], bar: tqdm = bar) -> None:
            bar.update(n)
            bar.set_postfix_str(f"loss {st[-1].mean_loss:.3f}", refresh=False)

        stats = runner.train_epoch(train_loader, on_batch)
        bar.close()
        ev = runner.evaluate(test_loader)
        print(epoch_line(epoch, cfg.train.epochs, stats, ev), file=out, flush=True)
    assert stats is not None and ev is not None
    summary = Summary(cfg.train.method, runtime, len(blocks), boundaries, cfg.train.epochs, ev.accuracy,
                      ev.aux_accuracy, stats.samples_per_s, time.perf_counter() - start, stats.stages)
    for line in summary.lines():
        print(line, file=out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m ppll_ext.train` = `ppll train`."""
    from ppll_ext.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
