"""`ppll train --engine torch`: torch's stock schedules and SchedulePPLL in the one training loop.

One torchrun launch of 2 ranks (tests/dist/torch_engine_worker.py) trains every schedule on the default job (with a
checkpoint in the middle, then resumed from it) and on the GPT-2 job; the references (end-to-end backprop on the
same micro-batches, sequential local learning) are computed here, in this process.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppll_ext import checkpoint as ckpt
from ppll_ext.build import build_bp_block
from ppll_ext.cli import main, processes
from ppll_ext.config import Config, load_config
from ppll_ext.errors import ConfigError
from ppll_ext.runtime import SequentialRunner
from ppll_ext.train import preflight, run_training
from ppll_ext.train.job import prepare
from ppll_ext.train.loop import steps_per_epoch
from ppll_ext.train.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults  # noqa: E402
from procs import communicate, env  # noqa: E402
from torch_engine_cases import (  # noqa: E402
    EPOCHS,
    NAN_STEP,
    REPO,
    SCHEDULES,
    STEPS,
    checkpoint,
    default_job,
    gpt2_job,
    torch_engine,
)

STOCK = [name for name in SCHEDULES if name != "PPLL"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's output folder: per schedule the default job's run, its resumed run and the GPT-2 run."""
    out = tmp_path_factory.mktemp("torch-engine")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist" / "torch_engine_worker.py"), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
                            start_new_session=True)
    res = communicate(proc, 480, "the torch-engine worker")
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def report(runs: Path, schedule: str, run: str) -> dict:
    return json.loads((runs / schedule / f"{run}.json").read_text())


def model_state(folder: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_model_state(folder, warn=False)


def end_to_end(cfg: Config) -> dict[str, torch.Tensor]:
    """The model's weights after single-process end-to-end backprop of `cfg`'s run on the same micro-batches (one
    optimizer step per mini-batch of local.micro_batches micro-batches, one torch thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = prepare(cfg)
        per_epoch = steps_per_epoch(len(job.train_loader), 1)
        block = build_bp_block(cfg, job.layered, total_steps=cfg.train.epochs * per_epoch)
        runner = SequentialRunner([block], cfg.local.micro_batches)
        for epoch in range(cfg.train.epochs):
            job.train_loader.set_epoch(epoch)
            runner.train_segment(job.train_loader.iter_from(0))
    finally:
        torch.set_num_threads(threads)
    return job.layered.model.state_dict()


def test_every_schedule_trains_the_default_and_the_gpt2_job(runs: Path) -> None:
    """Each of the six stock schedules and PPLL trains both jobs through the one loop: epoch lines, checkpoints in
    the native layout (one shard per stage; aux heads only with PPLL; a language model's config.json), summary."""
    for schedule, (stages, _) in SCHEDULES.items():
        for run, epochs in (("uninterrupted", EPOCHS), ("gpt2", 1)):
            r = report(runs, schedule, run)
            s = r["summary"]
            where = f"{schedule} {run}"
            assert s["runtime"] == f"processes (torch {schedule})", where
            assert s["method"] == ("local" if schedule == "PPLL" else "bp"), where
            assert (s["stages"], s["epochs"]) == (stages, epochs), where
            assert math.isfinite(s["loss"]) and 0.0 <= s["accuracy"] <= 1.0, where
            assert len(s["aux_accuracy"]) == (stages - 1 if schedule == "PPLL" else 0), where
            assert all(math.isfinite(st["loss"]) and st["loss"] > 0 for st in s["stage_stats"]), where
            assert f"epoch {epochs}/{epochs} |" in r["lines"] and "checkpoint saved" in r["lines"], where
        final = ckpt.checkpoints(runs / schedule / "gpt2")[-1]
        assert (final / "config.json").is_file(), schedule
        state = ckpt.read_trainer_state(final)
        assert state["num_stages"] == stages and len(state["boundaries"]) == stages + 1, schedule
        assert sorted(p.name for p in final.glob("model-*.safetensors")) == [
            ckpt.shard_name(k, stages) for k in range(stages)], schedule
        assert bool(ckpt.load_aux(final)) == (schedule == "PPLL"), schedule


def test_a_nan_loss_with_on_nan_skip_skips_that_step_on_every_stage(runs: Path) -> None:
    """A NaN loss at one step (a fault in the last stage's loss) with train.on_nan=skip: every stage skips that update
    and training goes on, as single-process end-to-end backprop with the same fault does."""
    stages, micro = SCHEDULES["1F1B"]
    faults.install(f"0:{NAN_STEP}:nan")  # the one block of end-to-end backprop is stage 0
    try:
        ref = end_to_end(default_job(stages, micro, "train.method=bp", "train.on_nan=skip"))
    finally:
        faults.clear()
    got = model_state(ckpt.checkpoints(runs / "nan")[-1])
    clean = model_state(runs / "1F1B" / "uninterrupted")
    assert all(torch.isfinite(t).all() for t in got.values())
    assert not all(torch.allclose(got[k], clean[k]) for k in got), "the skipped step left no trace"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert report(runs, "1F1B", "nan")["summary"]["stage_stats"][0]["steps"] == STEPS


def test_a_stock_schedule_trains_in_bf16(runs: Path) -> None:
    """train.autocast=bf16: the stages compute and send bf16 activations; the GPT-2 job's evaluation loss stays
    within 0.05 of the fp32 run's."""
    bf16, fp32 = (report(runs, "ZBVZeroBubble", run)["summary"] for run in ("gpt2-bf16", "gpt2"))
    assert math.isfinite(bf16["loss"]) and abs(bf16["loss"] - fp32["loss"]) < 0.05, (bf16["loss"], fp32["loss"])


@pytest.mark.parametrize("schedule", STOCK)
def test_stock_schedules_equal_end_to_end_backprop(runs: Path, schedule: str) -> None:
    """The final weights (and BatchNorm statistics) of every stock schedule equal single-process end-to-end backprop
    on the same micro-batches, the epoch's short last batch cut unevenly included."""
    stages, micro = SCHEDULES[schedule]
    got = model_state(runs / schedule / "uninterrupted")
    ref = end_to_end(default_job(stages, micro, "train.method=bp"))
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("job", [default_job, gpt2_job])
def test_ppll_equals_sequential_local_learning(runs: Path, job, tmp_path: Path) -> None:
    """SchedulePPLL in the loop gives the weights and aux heads of sequential local learning, bit for bit."""
    stages, micro = SCHEDULES["PPLL"]
    run_training(job(stages, micro, "local.runtime=sequential", f"train.save_dir={tmp_path}"), out=io.StringIO())
    ref = ckpt.checkpoints(tmp_path)[-1]
    got = (runs / "PPLL" / "uninterrupted") if job is default_job else ckpt.checkpoints(runs / "PPLL" / "gpt2")[-1]
    for load in (model_state, ckpt.load_aux):
        a, b = load(got), load(ref)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_resume_is_exact(runs: Path) -> None:
    """Resumed from the checkpoint of step 3 (mid-epoch, before the short last batch and an epoch boundary), every
    schedule ends with the uninterrupted run's checkpoint: weights, optimizer states, schedules, steps; its curves
    continue the run's metrics.jsonl (one record per step, one evaluation per epoch)."""
    for schedule in SCHEDULES:
        a, b = runs / schedule / "uninterrupted", checkpoint(runs / schedule / "run", STEPS)
        files = sorted(str(p.relative_to(a)) for p in a.rglob("*.safetensors"))
        assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*.safetensors")), schedule
        for name in files:
            x, y = load_file(str(a / name)), load_file(str(b / name))
            assert x.keys() == y.keys(), (schedule, name)
            assert all(torch.equal(x[k], y[k]) for k in x.keys() - {"rng.cpu"}), (schedule, name)
        for stage in (a / ckpt.STATE_DIR).glob("stage-*.json"):
            assert json.loads(stage.read_text()) == json.loads((b / ckpt.STATE_DIR / stage.name).read_text()), schedule
        records = read_metrics(runs / schedule / "run")
        assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, STEPS + 1)), schedule
        assert [r["epoch"] for r in records if r["kind"] == "eval"] == list(range(EPOCHS)), schedule
        resumed, whole = (report(runs, schedule, run)["summary"] for run in ("resumed", "uninterrupted"))
        for key in ("accuracy", "loss", "aux_accuracy", "aux_loss"):
            assert resumed[key] == whole[key], (schedule, key)


@pytest.mark.parametrize(("sets", "message"), [
    (["local.schedule=Foo"], r"local.schedule='Foo' names no schedule torch.distributed.pipelining runs; use PPLL"),
    (["local.schedule=1F1B"], r"local.schedule=1F1B needs at least as many micro-batches as stages \(2\)"),
    (["local.schedule=DualPipeV", "local.stages=4", "local.micro_batches=2"],
     r"DualPipeV needs at least as many micro-batches as stages \(4\)"),
    (["local.schedule=ZBVZeroBubble", "local.stages=6", "local.stages_per_rank=3"],
     r"ZBVZeroBubble places exactly 2 stages per rank, V-shaped, not local.stages_per_rank=3"),
    (["local.schedule=Interleaved1F1B", "local.stages_per_rank=1"], r"takes at least 2 stages per rank, looped"),
    (["local.schedule=1F1B", "local.stages_per_rank=2", "local.micro_batches=2"], r"runs one stage per rank"),
    (["local.schedule=Interleaved1F1B", "local.stages=3"], r"local.stages=3 does not split into 2 stages per rank"),
    (["train.method=bp"], r"the schedule decides what is trained .* drop train.method=bp"),
    (["local.runtime=threads"], r"local.runtime=threads must be processes"),
    (["local.schedule=GPipe", "train.autocast=fp16"], r"train.autocast=none or bf16"),
])
def test_combinations_that_cannot_run_are_refused_when_the_config_is_read(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["local.engine=torch", *sets])


def test_schedule_settings_without_the_torch_engine_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"local.schedule=1F1B is used by local.engine=torch only .* --engine torch"):
        load_config(None, ["local.schedule=1F1B"])


def test_one_process_per_rank_of_the_placement() -> None:
    """`ppll train` starts local.stages / stages per rank processes with the torch engine."""
    assert processes(load_config(None, [*torch_engine("ZBVZeroBubble"), "local.stages=4"])) == 2
    assert processes(load_config(None, [*torch_engine("Interleaved1F1B"), "local.stages=6"])) == 3
    assert processes(load_config(None, [*torch_engine("1F1B"), "local.stages=4", "local.micro_batches=4"])) == 4
    assert processes(load_config(None, [*torch_engine("PPLL"), "local.stages=3"])) == 3


def test_a_last_batch_smaller_than_the_micro_batches_is_refused_before_any_process_starts() -> None:
    cfg = default_job(2, 4, *torch_engine("1F1B"), "data.train_subset=194")
    with pytest.raises(ConfigError, match=r"the epoch's last batch has 2 sample\(s\), fewer than local.micro_batches"):
        preflight(cfg)


def test_the_engine_flag_takes_torch(capsys: pytest.CaptureFixture[str]) -> None:
    """`ppll train --engine torch` (= --set local.engine=torch): a bad schedule is one line and exit code 2."""
    assert main(["train", "--engine", "torch", "--set", "local.schedule=ZBV"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppll: error: local.schedule='ZBV' names no schedule"), err
