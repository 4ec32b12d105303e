"""Mixed precision per stage in the native engine: under fp16 every LocalBlock owns its GradScaler (dynamic loss
scale), so a gradient overflow on one stage skips that stage's update only, with a warning like on_nan="skip"'s,
and no scaler state is shared between stages. bf16 needs no scaler. (The DeepSpeed adapter's fp16 and ZeRO-1 are
in tests/test_deepspeed.py.)"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn

from ppll_ext.cli import main as cli_main
from ppll_ext.core import LocalBlock
from ppll_ext.runtime import SequentialRunner, ThreadRunner

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import overflow  # noqa: E402
from procs import plan  # noqa: E402

STEPS, BATCH, MICRO = 6, 32, 2


def digits() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of BATCH digits (8x8 images, flattened by the first layer)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(STEPS)]


def make_blocks(autocast: str) -> list[LocalBlock]:
    """Three stages of a small MLP, each with its aux head (but the last), AdamW and gradient clipping."""
    torch.manual_seed(0)
    bodies = [nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU()), nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
              nn.Linear(64, 10)]
    auxes = [nn.Linear(64, 10), nn.Linear(64, 10), None]
    blocks = []
    for k, (body, aux) in enumerate(zip(bodies, auxes, strict=True)):
        params = [*body.parameters(), *(aux.parameters() if aux is not None else [])]
        blocks.append(LocalBlock(body, aux, nn.CrossEntropyLoss(), index=k, autocast=autocast, grad_clip=1.0,
                                 optimizer=torch.optim.AdamW(params, lr=1e-2)))
    return blocks


def train(runner_cls: type, autocast: str = "fp16", fault: str | None = None) -> list[LocalBlock]:
    """STEPS mini-batches of MICRO micro-batches through the three blocks (one torch thread), with `fault` (stage:step
    of tests/overflow.py) installed."""
    if fault:
        overflow.install(fault)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    blocks = make_blocks(autocast)
    runner = runner_cls(blocks, MICRO)
    try:
        runner.train_segment(digits())
    finally:
        if isinstance(runner, ThreadRunner):
            runner.close()
        torch.set_num_threads(threads)
        overflow.clear()
    return blocks


def adam_steps(block: LocalBlock) -> set[int]:
    """The update count AdamW holds for each of the block's parameters."""
    return {int(s["step"]) for s in block.optimizer.state.values()}


def overflow_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The overflow warnings logged since the last call (which clears the captured records)."""
    found = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    caplog.clear()
    return found


def test_fp16_overflow_skips_only_that_stages_update(caplog: pytest.LogCaptureFixture) -> None:
    """fp16 autocast, K = 3: infinite gradients on stage 1 at step 2 make stage 1 (only) skip that update and halve its
    own loss scale, with one warning naming stage and step; stage 0 (upstream) ends with exactly the weights of a run
    without the overflow, stage 2 trains on (on stage 1's outputs); the threads runtime does the same bit for bit."""
    clean = train(SequentialRunner)
    caplog.set_level(logging.WARNING, logger="ppll_ext")
    faulty = train(SequentialRunner, fault="1:2")
    warned = [overflow_warnings(caplog)]
    threaded = train(ThreadRunner, fault="1:2")
    warned.append(overflow_warnings(caplog))
    scale = clean[1].updater.loss_scale
    assert scale is not None and all(b.updater.loss_scale == scale for b in clean)
    assert len({id(b.updater.scaler) for b in faulty}) == 3  # one GradScaler per stage
    assert [b.skipped_steps for b in clean] == [0, 0, 0] and [b.skipped_steps for b in faulty] == [0, 1, 0]
    assert [b.updater.loss_scale for b in faulty] == [scale, scale / 2, scale]
    assert [adam_steps(b) for b in faulty] == [{STEPS}, {STEPS - 1}, {STEPS}]
    assert [b.steps for b in faulty] == [STEPS] * 3  # the step count (and LR schedule) advances all the same
    want = [f"stage 1: gradients overflowed at step 2; this stage skips the step's update (loss scale now "
            f"{scale / 2:g})"]
    assert warned == [want, want], warned  # one warning per run, sequential and threads
    want, got = clean[0].state_dict(), faulty[0].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    for k in (1, 2):
        want, got = clean[k].state_dict(), faulty[k].state_dict()
        assert any(not torch.equal(want[n], got[n]) for n in want), k
    for a, b in zip(faulty, threaded, strict=True):
        want, got = a.state_dict(), b.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), a.index
        assert b.skipped_steps == a.skipped_steps and b.updater.loss_scale == a.updater.loss_scale


def test_bf16_trains_without_a_scaler() -> None:
    """bf16 autocast needs no loss scaling: no scaler, no skipped step, finite weights that moved."""
    before = [b.state_dict() for b in make_blocks("bf16")]
    blocks = train(SequentialRunner, autocast="bf16")
    for b, init in zip(blocks, before, strict=True):
        assert b.updater.scaler is None and b.updater.loss_scale is None and b.skipped_steps == 0
        state = b.state_dict()
        assert all(torch.isfinite(v).all() for v in state.values())
        assert any(not torch.equal(state[k], init[k]) for k in state)


FP16_SETS = ["data.train_subset=256", "data.test_subset=64", "train.batch_size=32", "train.epochs=1",
             "train.progress=false", "train.autocast=fp16", "local.micro_batches=2"]
"""`ppll train` on 256 digits with fp16 autocast (test_fp16_overflow_in_stage_processes_equals_sequential)."""
T2 = plan("torchrun", 2)
T2.add("fp16_overflow", "1:3", "train", "--runtime", "processes", *[a for s in FP16_SETS for a in ("--set", s)],
       "--save-dir", "{root}/fp16_overflow", script=REPO / "tests" / "overflow.py")


def ppll_train(capsys: pytest.CaptureFixture[str], out: Path, *args: str, fault: str | None = None) -> str:
    """`ppll train` (the CLI's code, sequential runtime, in this process) with FP16_SETS, writing its final
    checkpoint to `out`, with the overflow `fault` (tests/overflow.py) installed; what it wrote to stderr."""
    if fault:
        overflow.install(fault)
    try:
        capsys.readouterr()
        rc = cli_main(["train", *args, *[a for s in FP16_SETS for a in ("--set", s)], "--save-dir", str(out)])
        out_text, err = capsys.readouterr()
    finally:
        overflow.clear()
    assert rc == 0, out_text[-2000:] + err[-3000:]
    return err


def test_fp16_overflow_in_stage_processes_equals_sequential(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """`ppll train` with fp16 autocast and an overflow on stage 1 at step 3: one stage process per stage (torchrun)
    writes the same checkpoint as the sequential runtime, bit for bit; stage 0's shard equals a run without the
    overflow, stage 1's does not; the warning reaches the user as one `ppll: warning:` line."""
    clean = ppll_train(capsys, tmp_path / "clean", "--runtime", "sequential")
    seq = ppll_train(capsys, tmp_path / "seq", "--runtime", "sequential", fault="1:3")
    ran = T2.launch(tmp_path_factory)
    procs = ran["fp16_overflow"].stderr
    line = "ppll: warning: stage 1: gradients overflowed at step 3; this stage skips the step's update"
    assert line in seq and line in procs and "overflowed" not in clean, procs[-2000:]
    seq_step, procs_step = tmp_path / "seq" / "step-000008", ran.root / "fp16_overflow" / "step-000008"
    files = sorted(str(p.relative_to(seq_step)) for p in seq_step.rglob("*.safetensors"))
    assert "training_state/stage-1.safetensors" in files
    for name in files:
        a, b = load_file(str(seq_step / name)), load_file(str(procs_step / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "rng.cpu"), name

    def shard(run: str, k: int) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / run / "step-000008" / f"model-0000{k}-of-00002.safetensors"))

    assert all(torch.equal(v, shard("seq", 1)[n]) for n, v in shard("clean", 1).items())
    assert any(not torch.equal(v, shard("seq", 2)[n]) for n, v in shard("clean", 2).items())
