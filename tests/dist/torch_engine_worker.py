"""Run under `torchrun --nproc_per_node 2`: `ppll train --engine torch` with every schedule, one after another in
the same process group.

Per schedule (tests/torch_engine_cases.py): the default job with a checkpoint every 3 steps into OUT/<schedule>/run
(its final checkpoint copied to OUT/<schedule>/uninterrupted), the same run resumed in that folder from its step-3
checkpoint, and the GPT-2 job into OUT/<schedule>/gpt2; then the GPT-2 job under ZBVZeroBubble in bf16, and 1F1B
with a NaN loss at step NAN_STEP and train.on_nan=skip into OUT/nan. Rank 0 writes each run's summary and printed
lines to OUT/<schedule>/<run>.json.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import faults  # noqa: E402
from torch_engine_cases import (  # noqa: E402
    NAN_STEP,
    SAVE_EVERY,
    SCHEDULES,
    STEPS,
    checkpoint,
    default_job,
    gpt2_job,
    torch_engine,
)

from ppll_ext.config import Config  # noqa: E402
from ppll_ext.train import run_training  # noqa: E402


def train(cfg: Config, report: Path) -> None:
    """One `ppll train` run; rank 0 writes its summary and printed lines to `report`."""
    out = io.StringIO()
    summary = run_training(cfg, out=out)
    if dist.get_rank() == 0:
        report.write_text(json.dumps({"summary": dataclasses.asdict(summary), "lines": out.getvalue()}))
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    for schedule, (stages, micro) in SCHEDULES.items():
        folder = out / schedule
        folder.mkdir(parents=True, exist_ok=True)
        run = folder / "run"
        sets = [*torch_engine(schedule), f"train.save_dir={run}", f"train.save_every={SAVE_EVERY}", "train.keep=3"]
        train(default_job(stages, micro, *sets), folder / "uninterrupted.json")
        if dist.get_rank() == 0:
            shutil.copytree(checkpoint(run, STEPS), folder / "uninterrupted")
        train(default_job(stages, micro, *sets, f"train.resume={checkpoint(run, SAVE_EVERY)}"),
              folder / "resumed.json")
        train(gpt2_job(stages, micro, *torch_engine(schedule), f"train.save_dir={folder / 'gpt2'}"),
              folder / "gpt2.json")
    train(gpt2_job(*SCHEDULES["ZBVZeroBubble"], *torch_engine("ZBVZeroBubble"), "train.autocast=bf16"),
          out / "ZBVZeroBubble" / "gpt2-bf16.json")
    stages, micro = SCHEDULES["1F1B"]
    faults.install(f"{stages - 1}:{NAN_STEP}:nan")
    train(default_job(stages, micro, *torch_engine("1F1B"), "train.on_nan=skip", f"train.save_dir={out / 'nan'}"),
          out / "1F1B" / "nan.json")
    faults.clear()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
