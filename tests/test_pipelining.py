"""SchedulePPLL: a stock ScheduleGPipe script converted by its schedule line runs under torchrun, and
each stage's weights equal sequential local learning computed in one process."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ppll_ext.core import LocalBlock
from ppll_ext.runtime import SequentialRunner, StageStats

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "tests" / "dist"
sys.path.insert(0, str(DIST))
import pipelining_lm_ppll as lm_script  # noqa: E402
import pipelining_ppll as script  # noqa: E402
from procs import LAST, Family, communicate, env, free_port, plan, run, torchrun_cmd  # noqa: E402

PPLL_RUNS = [(2, 4), (3, 1)]
"""test_ppll_script_equals_sequential_local_learning: (stages, micro-batches), 12 steps."""
LM_RUNS = [(3, 1, False), (2, 2, True)]
"""test_lm_script_with_token_targets_equals_sequential_local_learning: (stages, micro-batches, soft targets), 6
steps."""
CKPT_ARGS = ["--steps", "12", "--microbatches", "2"]


T2, T3 = plan("torchrun", 2), plan("torchrun", 3)
"""The torchrun launches (one per process count) that run this module's script runs, with other modules' cases."""
T2.add("gpipe", "--steps", 3, script=DIST / "pipelining_gpipe.py")
for stages, micro in PPLL_RUNS:
    plan("torchrun", stages).add(f"ppll_{stages}_{micro}", "--steps", 12, "--microbatches", micro, "--save",
                                 f"{{root}}/ppll_{stages}_{micro}", script=DIST / "pipelining_ppll.py")
T2.add("ckpt_full", *CKPT_ARGS, "--save", "{root}/full", "--ckpt", "{root}/run", "--ckpt-at", 6,
       script=DIST / "pipelining_ppll.py")
T2.add("ckpt_resumed", *CKPT_ARGS, "--save", "{root}/resumed", "--resume", "{root}/run/step-000006",
       script=DIST / "pipelining_ppll.py")
T2.add("lm_gpipe", "--steps", 2, script=DIST / "pipelining_lm_gpipe.py")
for stages, micro, soft in LM_RUNS:
    plan("torchrun", stages).add(f"lm_{stages}_{micro}", "--steps", 6, "--microbatches", micro, "--save",
                                 f"{{root}}/lm_{stages}_{micro}", *(["--soft"] if soft else []),
                                 script=DIST / "pipelining_lm_ppll.py")
T3.add("exit_return", "--steps", 6, "--end", "return", script=DIST / "pipelining_exit.py", order=LAST)


@pytest.fixture
def two(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return T2.launch(tmp_path_factory)


@pytest.fixture
def three(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return T3.launch(tmp_path_factory)


def test_conversion_changes_only_the_schedule_aux_head_and_optimizer() -> None:
    gpipe = (DIST / "pipelining_gpipe.py").read_text().split('"""', 2)[2].splitlines()
    ppll = (DIST / "pipelining_ppll.py").read_text().split('"""', 2)[2].splitlines()
    removed = [line[1:].strip() for line in difflib.unified_diff(gpipe, ppll, lineterm="", n=0)
               if line.startswith("-") and not line.startswith("---")]
    assert removed == [
        "from torch.distributed.pipelining import PipelineStage, ScheduleGPipe",
        "optimizer = torch.optim.SGD(stage_mod.parameters(), lr=0.05, momentum=0.9)",
        "schedule = ScheduleGPipe(stage, n_microbatches=args.microbatches, loss_fn=loss_fn)",
    ]


def test_stock_gpipe_script_runs(two: Family) -> None:
    two.ok("gpipe")


def reference(stages: int, micro: int, steps: int) -> dict[int, dict[str, torch.Tensor]]:
    """Sequential local learning of the script's stages, aux heads and optimizer in this process."""
    mods = script.stage_modules(stages)
    blocks = []
    for k, mod in enumerate(mods):
        aux = script.aux_head(stages, k)
        params = list(mod.parameters()) + (list(aux.parameters()) if aux is not None else [])
        blocks.append(LocalBlock(mod, aux, nn.CrossEntropyLoss(), index=k,
                                 optimizer=torch.optim.SGD(params, lr=0.05, momentum=0.9)))
    runner = SequentialRunner(blocks, micro)
    stats = [StageStats(k) for k in range(stages)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for x, y in script.batches(steps, 64):
            runner.train_batch(x, y, stats)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for k, b in enumerate(blocks):
        state = {f"stage.{n}": t for n, t in b.body.state_dict().items()}
        if b.aux is not None:
            state.update({f"aux.{n}": t for n, t in b.aux.state_dict().items()})
        out[k] = state
    return out


@pytest.mark.parametrize(("stages", "micro"), PPLL_RUNS)
def test_ppll_script_equals_sequential_local_learning(stages: int, micro: int, request: pytest.FixtureRequest) -> None:
    steps = 12
    ran = request.getfixturevalue("two" if stages == 2 else "three")
    root = ran.root
    res = ran[f"ppll_{stages}_{micro}"]
    assert "terminate called" not in res.stderr
    losses = [float(line.split()[-1]) for line in res.stdout.splitlines() if line.startswith(f"rank {stages - 1} loss")]
    assert len(losses) == steps and losses[-1] < losses[0]
    # eval() after training: forward only, so weights and BatchNorm statistics still equal the reference below
    assert f"rank {stages - 1} eval loss" in res.stdout, res.stdout
    ref = reference(stages, micro, steps)
    for k in range(stages):
        got = load_file(str(root / f"ppll_{stages}_{micro}" / f"stage{k}.safetensors"))
        assert got.keys() == ref[k].keys()
        for name, t in ref[k].items():
            assert torch.allclose(got[name].float(), t.float(), atol=1e-6, rtol=0), (stages, micro, k, name)
            assert torch.equal(got[name], t), ("close but not bit-exact", stages, micro, k, name)


def test_argument_errors() -> None:
    res = run([sys.executable, str(DIST / "pipelining_errors.py")], timeout=120, MASTER_ADDR="127.0.0.1",
              MASTER_PORT=str(free_port()))
    assert res.returncode == 0, res.stderr[-3000:]
    oks = [line for line in res.stdout.splitlines() if line.startswith("ok ")]
    assert len(oks) == 17, res.stdout
    # a bad count or setting is refused when the schedule is built, in one line naming the argument
    assert "ok no micro-batches: n_microbatches=0 must be an integer >= 1 (micro-batches per step(), e.g. 4)" in oks


ORDER_SCRIPT = """
from torch.distributed.pipelining.schedules import get_schedule_class  # torch's function, taken first
from torch.distributed.pipelining.schedules import ScheduleGPipe

import ppll_ext.pipelining
from ppll_ext import torch_patches
from ppll_ext.pipelining import SchedulePPLL

torch_patches.register_schedule("PPLL", SchedulePPLL)  # a second registration changes nothing
assert get_schedule_class("PPLL") is SchedulePPLL and get_schedule_class("ppll") is SchedulePPLL
assert get_schedule_class("GPipe") is ScheduleGPipe
assert ppll_ext.pipelining.get_schedule_class is get_schedule_class
try:
    get_schedule_class("NoSuchSchedule")
except ValueError as exc:
    assert "Unknown schedule name 'NoSuchSchedule'" in str(exc), exc
else:
    raise AssertionError("an unknown name was accepted")
print("ok")
"""


def test_get_schedule_class_knows_ppll_whatever_the_import_order() -> None:
    """A script that imports torch's get_schedule_class before ppll_ext.pipelining gets SchedulePPLL for "PPLL"."""
    res = run([sys.executable, "-c", ORDER_SCRIPT], timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_schedule_checkpoints_load_into_the_plain_model_and_resume_exactly(two: Family) -> None:
    """SchedulePPLL.save_checkpoint writes ppll_ext's layout under the unsplit model's names (via names=); a run
    resumed from the step-6 checkpoint with load_checkpoint ends with the uninterrupted run's weights."""
    ran, root = two, two.root
    ran.ok("ckpt_full")
    assert sorted(p.name for p in (root / "run").iterdir()) == ["step-000006", "step-000012"]
    model = nn.Sequential(*script.stage_modules(1)[0])
    merged = {k: v for f in sorted((root / "run" / "step-000012").glob("model-*.safetensors"))
              for k, v in load_file(str(f)).items()}
    model.load_state_dict(merged, strict=True)
    for k, cut in enumerate([0, 2]):
        trained = load_file(str(root / "full" / f"stage{k}.safetensors"))
        stage = {key.removeprefix("stage."): v for key, v in trained.items() if key.startswith("stage.")}
        for key, v in stage.items():
            assert torch.equal(merged[script.checkpoint_names(cut)(key)], v), (k, key)
    ran.ok("ckpt_resumed")
    for k in range(2):
        a = load_file(str(root / "full" / f"stage{k}.safetensors"))
        b = load_file(str(root / "resumed" / f"stage{k}.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)


def test_lm_conversion_changes_only_the_schedule_aux_head_and_first_target(two: Family) -> None:
    gpipe = (DIST / "pipelining_lm_gpipe.py").read_text().split('"""', 2)[2].splitlines()
    ppll = (DIST / "pipelining_lm_ppll.py").read_text().split('"""', 2)[2].splitlines()
    removed = [line[1:].strip() for line in difflib.unified_diff(gpipe, ppll, lineterm="", n=0)
               if line.startswith("-") and not line.startswith("---")]
    assert removed == [
        "from torch.distributed.pipelining import PipelineStage, ScheduleGPipe",
        "optimizer = torch.optim.AdamW(stage_mod.parameters(), lr=3e-3)",
        "schedule = ScheduleGPipe(stage, n_microbatches=args.microbatches, loss_fn=loss_fn)",
        "schedule.step(x)",
        "schedule.eval(x)",
    ]
    res = two["lm_gpipe"]
    assert "rank 1 eval loss" in res.stdout, res.stdout


def lm_reference(stages: int, micro: int, steps: int, soft: bool) -> dict[int, dict[str, torch.Tensor]]:
    """Sequential local learning of the LM script's stages and per-token aux heads in this process."""
    blocks = []
    for k, mod in enumerate(lm_script.stage_modules(stages)):
        aux = lm_script.aux_head(stages, k)
        params = [*mod.parameters(), *(aux.parameters() if aux is not None else [])]
        blocks.append(LocalBlock(mod, aux, lm_script.loss_fn, index=k, optimizer=torch.optim.AdamW(params, lr=3e-3)))
    runner = SequentialRunner(blocks, micro)
    stats = [StageStats(k) for k in range(stages)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for x, y in lm_script.batches(steps, 16, soft):
            runner.train_batch(x, y, stats)
    finally:
        torch.set_num_threads(threads)
    return {k: {**{f"stage.{n}": t for n, t in b.body.state_dict().items()},
                **({f"aux.{n}": t for n, t in b.aux.state_dict().items()} if b.aux is not None else {})}
            for k, b in enumerate(blocks)}


@pytest.mark.parametrize(("stages", "micro", "soft"), LM_RUNS)
def test_lm_script_with_token_targets_equals_sequential_local_learning(stages: int, micro: int, soft: bool,
                                                                       request: pytest.FixtureRequest) -> None:
    """(N, T) token ids (and (N, T, V) soft targets) reach every stage whole; torchtitan's loss form works there;
    eval() afterwards changes no weight."""
    steps = 6
    ran = request.getfixturevalue("two" if stages == 2 else "three")
    root = ran.root
    res = ran[f"lm_{stages}_{micro}"]
    losses = [float(line.split()[-1]) for line in res.stdout.splitlines() if line.startswith(f"rank {stages - 1} loss")]
    assert len(losses) == steps and losses[-1] < losses[0], losses
    # a forward-only eval() after training: the last stage returns the (B, T, V) output, and (below) no weight moved
    assert f"rank {stages - 1} eval loss" in res.stdout and f"output (16, {lm_script.SEQ}, {lm_script.VOCAB})" in \
        res.stdout, res.stdout
    ref = lm_reference(stages, micro, steps, soft)
    for k in range(stages):
        got = load_file(str(root / f"lm_{stages}_{micro}" / f"stage{k}.safetensors"))
        assert got.keys() == ref[k].keys() and any(n.startswith("aux.") for n in got) == (k < stages - 1)
        for name, t in ref[k].items():
            assert torch.equal(got[name], t), (stages, micro, soft, k, name)


def test_ranks_that_make_different_step_counts_fail_on_every_rank() -> None:
    """Three stages started as plain processes (each one's exit code seen exactly). The last rank makes one step()
    call fewer, then (on new schedules) one more: every rank's close() raises, then every process ends non-zero
    with one error line saying which stage made more calls: from step() on the last rank, from
    destroy_process_group() on the middle one, from the exit hook on the first (which just returns: exit code 2)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(DIST / "pipelining_exit.py"), "--steps", "3", "--end", "uneven"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r),
                                      WORLD_SIZE="3")) for r in range(3)]
    res = [communicate(proc, 120, f"rank {r}") for r, proc in enumerate(procs)]
    fewer = ("stage 2 ended while stage 1 still sent 2 micro-batch(es), which were never trained there: stage 2 made "
             "fewer step() / eval() calls than stage 1; every rank must make the same step() / eval() calls")
    more = ("stage 2 expected more micro-batches but stage 1 had ended: stage 2 made more step() / eval() calls than "
            "stage 1; every rank must make the same step() / eval() calls")
    for r, out in enumerate(res):
        prefix = "" if r == 2 else f"stage {r} stops too: "
        assert out.stdout.splitlines()[0] == f"rank {r} close: {prefix}{fewer}", out.stdout
        errors = [line for line in out.stderr.splitlines() if more in line]
        raised = f"[rank{r}]: ppll_ext.errors.PipelineError: {prefix}{more}"  # torch prefixes a traceback's lines
        assert errors == ([f"{prefix}{more}"] if r == 0 else [raised]), (r, out.stderr[-3000:])
        assert out.returncode == (2 if r == 0 else 1), (r, out.returncode, out.stderr[-3000:])
        assert "terminate called" not in out.stderr and (r > 0 or "Traceback" not in out.stderr), out.stderr


@pytest.mark.parametrize("end", ["return", "destroy"])
def test_a_script_ending_right_after_its_last_step_exits_0_on_every_rank(end: str,
                                                                         request: pytest.FixtureRequest) -> None:
    """A fast first stage ends its script while the slow last stage is steps behind: it just returns, or calls
    destroy_process_group(). SchedulePPLL closes its links first (end marker down the pipeline), so every rank
    trains every step and exits 0, with no abort at exit. (The "return" run is the last case of the 3-rank
    launch: its end is the end of the processes; the "destroy" run has a launch of its own.)"""
    if end == "return":
        ran = request.getfixturevalue("three")
        case_run, launch = ran["exit_return"], ran.launch
        stdout, stderr = case_run.stdout, case_run.stderr + launch.stderr
    else:
        launch = run([*torchrun_cmd(3), str(DIST / "pipelining_exit.py"), "--steps", "6", "--end", end])
        stdout, stderr = launch.stdout, launch.stderr
    assert launch.returncode == 0, stderr[-3000:]
    assert sorted(line for line in stdout.splitlines() if "trained" in line) == [
        f"rank {r} trained 6 steps" for r in range(3)]
    assert "terminate called" not in stderr
