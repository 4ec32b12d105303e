"""Reliability: dead and stalled stages, NaN losses, crash -> exact resume, bad input, bounded memory.

Multi-process tests start real launchers (torchrun, the deepspeed launcher) in their own session, find
the stage processes among the launcher's descendants (the process whose environment has RANK), and
signal them from outside. Every launch has a timeout, and every process it started is killed when the
test ends, whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import faults
import pytest
import torch
from procs import Launch, alive, deepspeed_launch, env, torchrun, vm_rss_mb
from safetensors.torch import load_file, save_file
from torch import nn

from ppll_ext import checkpoint as ckpt
from ppll_ext.cli import main as cli_main
from ppll_ext.core import LocalBlock
from ppll_ext.errors import PipelineError
from ppll_ext.runtime.threads import ThreadRunner

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "tests" / "dist"
TINY = ["model.name=resnet8", "model.width=4", "local.partition=uniform", "train.progress=false", "train.threads=1",
        "data.test_subset=100"]

def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def kill_and_watch(launch: Launch, ranks: dict[int, int], dead: int) -> float:
    """SIGKILL stage `dead`; seconds until every stage process and the launcher are gone (asserted < 60)."""
    killed = time.monotonic()
    os.kill(ranks[dead], signal.SIGKILL)
    rc = launch.finish()
    while any(alive(pid) for pid in ranks.values()) and time.monotonic() - killed < 60:
        time.sleep(0.05)
    elapsed = time.monotonic() - killed
    assert rc != 0, launch.stderr[-3000:]
    assert elapsed < 60 and not any(alive(pid) for pid in ranks.values()), elapsed
    return elapsed


def assert_survivors_name(launch: Launch, stages: int, dead: int) -> None:
    """A neighbour of the dead stage failed loudly naming it; every other survivor printed its own error line or
    was ended by the launcher's teardown (which can reach a stage two hops away before it notices): torchrun
    reports exit code -15 for it, the deepspeed launcher logs "Killing subprocess PID"."""
    err = launch.stderr
    logs = launch.stdout + err
    assert f"lost its link to stage {dead} (rank {dead})" in err, err[-4000:]
    for j in set(range(stages)) - {dead}:
        own_line = f"ppll: error: stage {j} (rank {j}) failed: PipelineError: stage {j} (rank {j})" in err
        torn_down = (re.search(rf"rank\s*: {j} \(local_rank: {j}\)\s*\n\s*exitcode\s*: -15", err) is not None
                     or f"Killing subprocess {launch.pids[j]}" in logs)
        assert own_line or (torn_down and abs(j - dead) > 1), (j, logs[-4000:])


# ---------------------------------------------------------------------------------------------- numerics


def _sgd_block(losses: list[float], micro: int) -> LocalBlock:
    torch.manual_seed(0)
    body, aux = nn.Linear(4, 6), nn.Linear(6, 3)
    calls = iter(losses)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y) * next(calls)

    block = LocalBlock(body, aux, loss_fn, index=2, on_nan="skip")
    block.optimizer = torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9)
    block.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(block.optimizer, lambda s: 1.0 / (s + 1))
    return block


def test_on_nan_skip_drops_the_update_but_keeps_step_and_schedule(caplog: pytest.LogCaptureFixture) -> None:
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    nan = float("nan")
    # step 0: normal; step 1: second micro-batch NaN (the first one's gradients must be dropped too); step 2: normal.
    block = _sgd_block([1.0, 1.0, 1.0, nan, 1.0, 1.0], micro=2)
    block.train_step(x, y, 2)
    block.train_step(x, y, 2)
    before = {n: t.clone() for n, t in block.state_dict().items()}
    momentum = [block.optimizer.state[p]["momentum_buffer"].clone() for p in block.parameters()]
    block.train_step(x, y, 2)
    _, loss = block.train_step(x, y, 2)
    assert torch.isnan(loss)
    assert all(torch.equal(t, before[n]) for n, t in block.state_dict().items())
    state = block.optimizer.state
    assert all(torch.equal(state[p]["momentum_buffer"], m) for p, m in zip(block.parameters(), momentum, strict=True))
    assert all(p.grad is None for p in block.parameters())
    assert (block.steps, block.skipped_steps, block.lr_scheduler.last_epoch) == (2, 1, 2)
    assert block.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    block.train_step(x, y, 2)
    block.train_step(x, y, 2)
    assert block.steps == 3 and not torch.equal(block.body.weight, before["body.weight"])
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ppll_ext.core.block", "WARNING", "stage 2: loss is nan at step 1; this stage skips the step's update "
                                           "(on_nan=skip)")]

    strict = LocalBlock(nn.Linear(4, 3), None, lambda out, t: out.sum() * nan, index=1)
    strict.optimizer = torch.optim.SGD(strict.parameters(), lr=0.1)
    with pytest.raises(PipelineError, match=r'^stage 1: loss is nan at step 0; .*on_nan="skip"$'):
        strict.train_step(x, y)
    assert all(p.grad is None for p in strict.parameters())  # raised before the update, its gradients dropped


Cli = Callable[..., tuple[int, str, list[str]]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """`ppll ...` in this process (the real CLI code path): (exit code, stdout, stderr lines)."""

    def run(*args: str) -> tuple[int, str, list[str]]:
        rc = cli_main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err.strip().splitlines()

    return run


def test_threads_stage_failure_reaches_the_caller_and_nan_skip(cli: Cli, request: pytest.FixtureRequest) -> None:
    args = ["train", "--runtime", "threads", *sets(*TINY, "local.stages=3", "data.train_subset=192",
                                                   "train.batch_size=32", "train.epochs=2")]
    faults.install("1:4:nan")
    request.addfinalizer(faults.clear)
    rc, _, err = cli(*args)
    assert rc == 2 and err == [
        "ppll: error: stage 1 failed: PipelineError: stage 1: loss is nan at step 4; lower the learning rate or clip "
        "gradients, or skip such steps with on_nan=\"skip\" (command line: --on-nan or --set train.on_nan=...)"], err
    deadline = time.monotonic() + 10
    while any(t.name.startswith("ppll-stage-") and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "stage threads still running after the failure"
        time.sleep(0.05)

    rc, out, err = cli(*args, "--on-nan", "skip")
    assert rc == 0 and err == ["ppll: warning: stage 1: loss is nan at step 4; this stage skips the step's update "
                               "(on_nan=skip)"]
    # the skipped step's NaN is left out of stage 1's mean loss; every stage did all 12 steps
    for epoch in (1, 2):
        assert re.search(rf"^epoch {epoch}/2 \| loss [0-9.]+ [0-9.]+ [0-9.]+ \|", out, re.M), out
    assert len(re.findall(r"stage \d: loss [0-9.]+ .*\| steps 12$", out, re.M)) == 3, out


# ------------------------------------------------------------------------------------ dead stages, resume

KILL_RUN = [*TINY, "local.stages=3", "local.runtime=processes", "data.train_subset=640", "train.batch_size=32",
            "train.epochs=3", "local.timeout_s=60"]
"""20 steps per epoch, 60 in all; killed runs save every 7 steps."""
_KILLED: dict[int, Path] = {}


def killed_run(dead: int, root: Path) -> tuple[Path, Launch | None]:
    """Train KILL_RUN under torchrun, SIGKILL stage `dead` from outside right after the first checkpoint.

    Cached per stage: the dead-stage test and the resume test share the run.
    """
    if dead in _KILLED:
        return _KILLED[dead], None
    run = root / f"killed-{dead}"
    launch = torchrun(3, [*sets(*KILL_RUN), "--save-dir", str(run), "--save-every", "7"])
    try:
        launch.wait_for(r"^training ")
        ranks = launch.stages(3)
        launch.wait_for(r"^checkpoint saved: .*step-000007")
        elapsed = kill_and_watch(launch, ranks, dead)
    finally:
        launch.close()
    assert "summary:" not in launch.stdout, "the run finished before the kill"
    print(f"stage {dead} killed: everything gone after {elapsed:.1f} s")
    _KILLED[dead] = run
    return run, launch


@pytest.mark.parametrize("dead", [0, 1])  # the data-reading first stage, and a middle stage (both neighbours)
def test_sigkill_any_stage_under_torchrun(dead: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    _, launch = killed_run(dead, tmp_path_factory.mktemp("kill"))
    assert launch is not None
    assert_survivors_name(launch, 3, dead)
    # torchrun's own report names the killed rank too
    assert re.search(rf"rank\s+: {dead} \(local_rank: {dead}\)\s+exitcode\s+: -9", launch.stderr), launch.stderr[-4000:]


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model shards, aux heads, optimizer states) but the per-process RNG."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.relative_to(folder)}:{k}": v for k, v in load_file(str(f)).items() if not k.startswith("rng")})
    return out


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                          cli: Cli) -> None:
    run, _ = killed_run(1, tmp_path_factory.mktemp("kill"))
    folder = ckpt.resolve(run)
    state = json.loads((folder / ckpt.TRAINER_STATE).read_text())["position"]
    step = state["step"]
    assert 7 <= step < 60 and step % 7 == 0
    assert (state["epoch"], state["batch"]) == (step // 20, step % 20) and state["batch"] != 0  # mid-epoch

    launch = torchrun(3, [*sets(*KILL_RUN), "--save-dir", str(run), "--save-every", "7", "--resume", str(run)])
    try:
        rc = launch.finish()
    finally:
        launch.close()
    assert rc == 0, launch.stderr[-4000:]
    assert f"resuming at epoch {step // 20 + 1} batch {step % 20} (step {step})" in launch.stdout
    resumed = ckpt.resolve(run)
    assert resumed.name == "step-000060"

    # the uninterrupted run: sequential local learning in this process, bit-identical to the processes runtime
    rc, _, err = cli("train", *sets(*KILL_RUN, "local.runtime=sequential"), "--save-dir",
                      str(tmp_path / "straight"))
    assert rc == 0, err
    straight = _all_tensors(ckpt.resolve(tmp_path / "straight"))
    got = _all_tensors(resumed)
    assert got.keys() == straight.keys() and len(got) > 20
    for key, value in straight.items():
        assert torch.equal(got[key], value), key


@pytest.mark.usefixtures("deepspeed_cpu_ops")
@pytest.mark.parametrize("dead", [1])
def test_sigkill_any_stage_under_the_deepspeed_launcher(dead: int) -> None:
    """The DeepSpeed adapter's stages talk over the same links: the stage upstream of the dead one fails while
    sending, the one downstream while receiving (a middle stage is killed, so both are seen); the launcher polls
    its children once a second, then kills the rest."""
    launch = deepspeed_launch(3, DIST / "reliability_deepspeed.py")
    try:
        launch.wait_for(r"^training$")
        ranks = launch.stages(3)
        elapsed = kill_and_watch(launch, ranks, dead)
    finally:
        launch.close()
    print(f"deepspeed: stage {dead} killed, everything gone after {elapsed:.1f} s")
    assert_survivors_name(launch, 3, dead)
    if dead < 2:
        assert f"stage {dead + 1} (rank {dead + 1}) lost its link to stage {dead} (rank {dead}) while receiving" \
            in launch.stderr, launch.stderr[-4000:]
    if dead > 0:
        assert f"stage {dead - 1} (rank {dead - 1}) lost its link to stage {dead} (rank {dead}) while sending" \
            in launch.stderr, launch.stderr[-4000:]


def test_an_error_inside_a_stage_is_one_line_and_exit_2() -> None:
    """A NaN loss (a learning rate of 1e9): spawned by `ppll train`, the run ends with exit code 2 and only `ppll:`
    lines, the first naming stage, rank and cause (the other stage then says it lost its link); under torchrun
    the same line and no traceback from ppll_ext (torchrun's own report follows)."""
    args = sets(*TINY, "local.runtime=processes", "local.stages=2", "data.train_subset=256", "optim.lr=1e9")
    spawned = Launch([sys.executable, "-m", "ppll_ext", "train", *args], env(), timeout=120)
    launched = torchrun(2, args)
    try:
        for launch in (spawned, launched):
            rc = launch.finish()
            errors = [line for line in launch.stderr.splitlines() if line.startswith("ppll: error:")]
            assert rc != 0 and errors, launch.stderr[-3000:]
            assert re.match(r"ppll: error: stage (\d) \(rank \1\) failed: PipelineError: stage \1: loss is nan at "
                            r"step \d+;", errors[0]), launch.stderr[-3000:]
            assert "ppll_ext" not in "".join(re.findall(r'File "[^"]*"', launch.stderr)), launch.stderr[-3000:]
        assert spawned.proc.returncode == 2, spawned.stderr[-3000:]
        assert all(line.startswith("ppll: ") for line in spawned.stderr.splitlines()), spawned.stderr[-3000:]
        assert "Traceback" not in spawned.stderr, spawned.stderr[-3000:]
    finally:
        spawned.close()
        launched.close()


# ------------------------------------------------------------------------------------------ timeouts


def test_stalled_stage_times_out_with_a_clear_message() -> None:
    """SIGSTOP the middle stage half a second into the first epoch (90 steps, the first report exchange comes
    at its end): the stage it feeds gives up after local.timeout_s naming it; the stage feeding it gives up either
    on the link or, when the kernel's socket buffers took the whole epoch, at the epoch's report exchange."""
    timeout = 6
    launch = torchrun(3, sets(*TINY, "local.stages=3", "local.runtime=processes", "train.batch_size=16",
                              "train.epochs=100", f"local.timeout_s={timeout}"))
    try:
        launch.wait_for(r"^training ")
        ranks = launch.stages(3)
        time.sleep(0.5)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        t0, line0 = launch.wait_for(r"stage 0 \(rank 0\) failed", "err")
        t2, line2 = launch.wait_for(r"stage 2 \(rank 2\) failed", "err")
        os.kill(ranks[1], signal.SIGKILL)
        assert launch.finish() != 0
    finally:
        launch.close()
    assert (f"waited {timeout} s to take a message from stage 1 (rank 1)" in line0
            or f"exchanging reports with the other stages failed: one of them exited, was killed or stalled longer "
               f"than local.timeout_s={timeout} s" in line0), line0
    assert f"waited {timeout} s for a message from stage 1 (rank 1)" in line2, line2
    for line, t in ((line0, t0), (line2, t2)):
        assert "raise local.timeout_s" in line
        assert timeout - 1 < t - stopped < timeout + 10, (t - stopped, line)


# ------------------------------------------------------------------------------------ bounded memory


def test_memory_stays_flat_with_a_slow_last_stage_and_nan_skip() -> None:
    """506 steps, stage 0 = the stem conv and a small aux head, stage 1 = the rest (~1.7x slower).

    Each message is a 64 x 4 x 8 x 8 float32 activation (64 KB). The sender holds at most queue_depth messages
    (the kernel's socket buffers, outside RSS and bounded by the kernel, may take a few more), so RSS from the end
    of epoch 6 to the end of the run moves only by allocator noise (< 1 MB measured here); an unbounded queue
    would hold ~40 % of the remaining 368 activations (stage 1's backlog), ~9 MB, so the bound is 4 MB.
    The same run injects a NaN loss into stage 1 at step 200 with --on-nan skip.
    """
    launch = torchrun(2, [*sets(*TINY, "local.stages=2", "local.runtime=processes", "local.partition=0,1",
                                "local.aux_hidden=16", "train.batch_size=64", "train.epochs=22"), "--on-nan", "skip"],
                      fault="1:200:nan")
    samples: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    try:
        launch.wait_for(r"^training ")
        ranks = launch.stages(2)
        while launch.proc.poll() is None:
            for r, pid in ranks.items():
                try:
                    samples[r].append((time.monotonic(), vm_rss_mb(pid)))
                except (OSError, AssertionError):
                    pass
            time.sleep(0.1)
        rc = launch.finish()
    finally:
        launch.close()
    assert rc == 0, launch.stderr[-4000:]
    t_early = launch.wait_for(r"^epoch 6/22")[0]
    t_late = launch.wait_for(r"^epoch 22/22")[0]
    for r, series in samples.items():
        early = max(v for t, v in series if t <= t_early)
        late = max(v for t, v in series if t <= t_late)
        print(f"stage {r}: RSS {early:.1f} MB after epoch 6, {late:.1f} MB at the end ({len(series)} samples)")
        assert late - early < 4, (r, early, late, [round(v - early, 1) for _, v in series])
    summary = {int(m[1]): m for m in re.finditer(
        r"stage (\d): loss \S+ \| busy [\d.]+ s \((\d+)%\) \| wait in [\d.]+ s, out [\d.]+ s \| steps (\d+)",
        launch.stdout)}
    assert summary[0][3] == summary[1][3] == "506"
    # the last epoch's stats: stage 1 is the slower one, so the epoch lasts as long as stage 1 works
    assert int(summary[1][2]) > int(summary[0][2]), ("stage 1 was not the slow stage", launch.stdout[-1000:])
    warnings = [line for line in launch.stderr.splitlines() if "ppll: warning:" in line]
    assert warnings == ["ppll: warning: stage 1: loss is nan at step 200; this stage skips the step's update "
                        "(on_nan=skip)"]


# ---------------------------------------------------------------------------------------------- bad input


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (or was not) executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, cli: Cli,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    small = [*TINY, "local.runtime=sequential", "data.train_subset=64", "train.batch_size=32", "train.epochs=2"]
    run = tmp_path / "run"
    rc, _, err = cli("train", *sets(*small, "train.stop_at_step=2"), "--save-dir", str(run))
    assert rc == 0, err
    good = ckpt.resolve(run)
    shard = ckpt.shard_name(1, 2)
    marker = tmp_path / "UNPICKLED"
    evil = pickle.dumps(_Marker(marker))

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / "bad" / name))

    truncated = copy("truncated")
    (truncated / shard).write_bytes((good / shard).read_bytes()[:200])
    corrupt = copy("corrupt")
    (corrupt / shard).write_bytes(b"\x00" * 64)
    foreign = copy("foreign")
    save_file({"something.else": torch.ones(3)}, str(foreign / shard), metadata={"format": "pt"})
    no_index = copy("no-index")
    (no_index / ckpt.INDEX).unlink()
    pickled_shard = copy("pickled-shard")
    (pickled_shard / shard).write_bytes(evil)
    pickled_state = copy("pickled-state")
    (pickled_state / ckpt.STATE_DIR / "stage-1.safetensors").write_bytes(evil)
    bad_state = copy("bad-trainer-state")
    (bad_state / ckpt.TRAINER_STATE).write_text("{not json")
    hf_pickle = tmp_path / "bad" / "hf-pickle"
    hf_pickle.mkdir()
    (hf_pickle / "pytorch_model.bin").write_bytes(evil)
    bad_yaml = tmp_path / "bad" / "bad.yaml"
    bad_yaml.write_text("model: {name: resnet8\n  oops: [\n")
    list_yaml = tmp_path / "bad" / "list.yaml"
    list_yaml.write_text("- model\n- data\n")
    typo_yaml = tmp_path / "bad" / "typo.yaml"
    typo_yaml.write_text("model:\n  widht: 8\n")

    cases: list[tuple[str, list[str], str]] = [
        ("K larger than the layer count", ["local.stages=40"], "local.stages=40 is larger than the model's 5 layers"),
        ("partition for another K", ["local.stages=3", "local.partition=0,2"], "gives 2 blocks but local.stages=3"),
        ("partition beyond the layers", ["local.partition=0,9"], "strictly increase below 5"),
        ("unknown partition method", ["local.partition=fastest"], "local.partition='fastest' is neither"),
        ("unknown aux kind", ["local.aux=magic"], "local.aux='magic' is not one of"),
        ("unknown config key", ["train.epoch=3"], "did you mean train.epochs"),
        ("unknown section", ["trainer.epochs=3"], "unknown config key 'trainer'"),
        ("wrong type", ["train.epochs=many"], "train.epochs: expected an integer"),
        ("override without =", ["train.epochs"], "expected key=value"),
        ("unknown model", ["model.name=resnet9000"], "model.name='resnet9000'"),
        ("batch not divisible by M", ["train.batch_size=30", "local.micro_batches=4"], "not divisible"),
        ("missing data root", ["data.name=cifar10", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
        ("image folder without root", ["data.name=imagefolder"], "needs data.root"),
        ("zero stages", ["local.stages=0"], "local.stages=0 must be at least 1"),
        ("truncated safetensors", ["train.resume=" + str(truncated)], shard),
        ("corrupt safetensors", ["train.resume=" + str(corrupt)], shard),
        ("foreign safetensors", ["train.resume=" + str(foreign)], f"{shard}' does not match its sha256"),
        ("checkpoint of another model", ["model.width=8", "train.resume=" + str(good)],
         "has shape (4, 1, 3, 3), the model has (8, 1, 3, 3)"),
        ("checkpoint without its index", ["train.resume=" + str(no_index)], "no model.safetensors.index.json"),
        ("pickle as a model shard", ["train.resume=" + str(pickled_shard)], shard),
        ("pickle as a training state", ["train.resume=" + str(pickled_state)], "stage-1.safetensors"),
        ("pickle checkpoint directory", ["train.resume=" + str(hf_pickle)], "no model.safetensors.index.json"),
        ("pickle file as checkpoint", ["train.resume=" + str(hf_pickle / "pytorch_model.bin")], "pytorch_model.bin"),
        ("corrupt trainer state", ["train.resume=" + str(bad_state)], "not valid JSON"),
        ("missing checkpoint", ["train.resume=" + str(tmp_path / "nowhere")], "does not exist"),
        ("nothing left to train", ["train.resume=" + str(run), "train.epochs=1"], "nothing to train"),
        ("trace path below a file", ["train.trace=" + str(bad_yaml / "t.json")], "bad.yaml' is a file"),
        ("trace path that is a folder", ["train.trace=" + str(tmp_path)], "is a directory; give a file path"),
        ("trace path that cannot be written", ["train.trace=/proc/ppll-trace/t.json"], "'/proc' is not writable"),
    ]
    file_cases: list[tuple[str, list[str], str]] = [
        ("bad YAML", ["--config", str(bad_yaml)], "is not valid YAML at line"),
        ("YAML that is not a mapping", ["--config", str(list_yaml)], "must hold a mapping"),
        ("unknown key in YAML", ["--config", str(typo_yaml)], "did you mean model.width"),
        ("missing config file", ["--config", str(tmp_path / "missing.yaml")], "does not exist"),
    ]
    before = _snapshot(tmp_path)
    results = []
    for name, overrides, needle in [(n, sets(*o), w) for n, o, w in cases] + file_cases:
        rc, out, err = cli("train", *sets(*small), *overrides, "--save-dir", str(run))
        results.append((name, rc, err))
        assert rc == 2 and len(err) == 1 and err[0].startswith("ppll: error:"), (name, rc, err)
        assert needle in err[0], (name, err[0])
        assert "Traceback" not in out
        assert _snapshot(tmp_path) == before, f"{name}: files were written or changed"
    # under a launcher: each rank checks the process count against K (x data-parallel) before joining a group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for world, extra, needle in (
        ("2", ["local.stages=3"], "started 2 processes but local.stages=3"),
        ("3", ["local.engine=deepspeed", "local.stages=2", "local.data_parallel=2"],
         "started 3 processes but local.stages=2"),
    ):
        monkeypatch.setenv("WORLD_SIZE", world)
        rc, _, err = cli("train", *sets(*small, "local.runtime=processes", *extra), "--save-dir", str(run))
        results.append((f"world size {world} for {extra}", rc, err))
        assert rc == 2 and len(err) == 1 and err[0].startswith("ppll: error: the launcher ") and needle in err[0], err
    assert _snapshot(tmp_path) == before
    assert not marker.exists(), "a pickle was unpickled"
    assert len(results) >= 20

    # not an error: resuming with another K re-partitions the model
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    rc, out, err = cli("train", *sets(*small, "local.stages=3"), "--resume", str(run), "--save-dir",
                        str(tmp_path / "k3"))
    assert rc == 0, err
    assert err == ["ppll: resuming with stages at [0, 2, 4, 5] from a checkpoint cut at [0, 3, 5]: model weights "
                   "loaded, aux heads and optimizer states start fresh"], err
    assert "resuming at epoch" in out
    assert ckpt.resolve(tmp_path / "k3").name == "step-000004"


def test_stages_that_do_not_fit_name_the_stage_and_shape() -> None:
    """A stage built for another cut (Linear(6, ...) after a stage that outputs 8 features) fails in its thread;
    the caller gets a PipelineError naming the stage and the shape it received."""
    ce = nn.CrossEntropyLoss()
    blocks = [LocalBlock(nn.Linear(4, 8), nn.Linear(8, 3), ce, index=0), LocalBlock(nn.Linear(6, 3), None, ce, index=1)]
    for b in blocks:
        b.optimizer = torch.optim.SGD(b.parameters(), lr=0.1)
    runner = ThreadRunner(blocks, timeout_s=30)
    try:
        with pytest.raises(PipelineError, match=r"stage 1 failed: PipelineError: stage 1: the forward pass failed on "
                                                r"an input of shape \(5, 8\) torch.float32: .*built from different"):
            runner.train_segment([(torch.randn(5, 4), torch.zeros(5, dtype=torch.int64))])
    finally:
        runner.close()
