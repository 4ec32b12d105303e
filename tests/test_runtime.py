"""PPLL runtimes equal sequential local learning, weight for weight; failures stop every stage."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from equivalence_cases import DEPTHS, VARIANTS, case_config
from procs import env, kill_tree, plan, run
from safetensors.torch import load_file

from ppll_ext.cli import main as cli_main
from ppll_ext.core import LocalBlock
from ppll_ext.core.payload import Structure
from ppll_ext.errors import PipelineError
from ppll_ext.runtime import SequentialRunner, ThreadRunner
from ppll_ext.train import run_training
from ppll_ext.transport import Kind, Msg, decode_header, encode_header

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "dist"))
import pipelining_lm_ppll as lm  # noqa: E402

_REFERENCE: dict[tuple[str, int], dict[int, dict[str, torch.Tensor]]] = {}


def _states(cfg) -> dict[int, dict[str, torch.Tensor]]:
    got: dict[int, dict[str, torch.Tensor]] = {}

    def keep(blocks) -> None:
        got.update({k: {n: t.detach().cpu().clone() for n, t in b.state_dict().items()} for k, b in blocks.items()})

    run_training(cfg, out=io.StringIO(), on_finish=keep)
    return got


def reference(variant: str, stages: int) -> dict[int, dict[str, torch.Tensor]]:
    """Sequential local learning, the ground truth (computed once per case)."""
    if (variant, stages) not in _REFERENCE:
        _REFERENCE[variant, stages] = _states(case_config(variant, stages, "sequential"))
    return _REFERENCE[variant, stages]


def assert_same(ref: dict[int, dict[str, torch.Tensor]], got: dict[int, dict[str, torch.Tensor]], where: str) -> None:
    assert sorted(got) == sorted(ref), where
    for k in ref:
        assert got[k].keys() == ref[k].keys(), (where, k)
        for name, t in ref[k].items():
            assert torch.allclose(got[k][name].float(), t.float(), atol=1e-6, rtol=0), f"{where} stage {k} {name}"
            assert torch.equal(got[k][name], t), f"{where} stage {k} {name}: close but not bit-exact"


def test_reference_actually_trains() -> None:
    frozen = case_config("resnet_m1", 2, "sequential")
    frozen.optim.lr = 0.0
    start = _states(frozen)
    trained = reference("resnet_m1", 2)
    moved = [n for n, t in trained[0].items() if t.is_floating_point() and not torch.equal(t, start[0][n])]
    assert len(moved) > len(trained[0]) // 2


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_threads_equal_sequential(variant: str, stages: int, depth: int) -> None:
    got = _states(case_config(variant, stages, "threads", depth))
    assert_same(reference(variant, stages), got, f"threads {variant} K={stages} depth={depth}")


PROCESS_STAGES = [3]
"""test_processes_equal_sequential: every case of equivalence_worker.py, run in the torchrun launch of this many
processes (with other modules' cases)."""
for _stages in PROCESS_STAGES:
    plan("torchrun", _stages).add(f"equivalence_{_stages}", f"{{root}}/equivalence_{_stages}", _stages,
                                  script=REPO / "tests" / "dist" / "equivalence_worker.py")


@pytest.mark.parametrize("stages", PROCESS_STAGES)
def test_processes_equal_sequential(stages: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    ran = plan("torchrun", stages).launch(tmp_path_factory)
    ran.ok(f"equivalence_{stages}")
    tmp_path = ran.root / f"equivalence_{stages}"
    for variant in VARIANTS:
        for depth in DEPTHS:
            folder = tmp_path / f"{variant}-d{depth}"
            got = {k: load_file(str(folder / f"stage{k}.safetensors")) for k in range(stages)}
            assert_same(reference(variant, stages), got, f"processes {variant} K={stages} depth={depth}")


def test_header_round_trip_keeps_target_shape_and_dtype() -> None:
    x = torch.randn(3, 5, 7).to(torch.bfloat16)
    for y in (torch.arange(3), torch.randint(0, 50, (3, 5)), torch.rand(3, 10), torch.rand(3, 5, 50).half()):
        kind, count, shape, structure, resent = decode_header(encode_header(Msg(Kind.TRAIN, x, y, 4), True))
        assert (kind, count, shape, structure, resent) == (
            Kind.TRAIN, 4, (((3, 5, 7), torch.bfloat16), (tuple(y.shape), y.dtype)), Structure(), True)
    assert decode_header(encode_header(Msg(Kind.EPOCH_END))) == (Kind.EPOCH_END, 1, None, None, False)
    assert decode_header(encode_header(Msg(Kind.CHECKPOINT, step=17)))[:2] == (Kind.CHECKPOINT, 17)
    several = {"h": x, "mask": torch.ones(3, 5, dtype=torch.bool), "pos": torch.arange(5)[None]}
    kind, count, shape, structure, _ = decode_header(encode_header(Msg(Kind.EVAL, several, torch.arange(3), 2)))
    assert (kind, count, structure) == (Kind.EVAL, 2, Structure("dict", ("h", "mask", "pos")))
    assert shape == (((3, 5, 7), torch.bfloat16), ((3, 5), torch.bool), ((1, 5), torch.int64), ((3,), torch.int64))
    with pytest.raises(PipelineError, match="targets of dtype torch.complex64 cannot be sent"):
        encode_header(Msg(Kind.TRAIN, x, torch.zeros(3, dtype=torch.complex64)))


def test_threads_stage_exception_is_raised_with_stage() -> None:
    faults.install("1:3:raise")
    try:
        with pytest.raises(PipelineError, match=r"stage 1 failed: RuntimeError: fault injected at step 3"):
            run_training(case_config("resnet_m1", 3, "threads"), out=io.StringIO())
    finally:
        faults.clear()


@pytest.mark.parametrize("kind", ["raise"])  # SIGKILLs from outside: tests/test_reliability.py
def test_processes_fault_in_stage_1_of_3_stops_everyone(kind: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           str(REPO / "tests" / "faults.py"), f"1:5:{kind}", "train", "--set", "local.stages=3", "--set",
           "train.epochs=50", "--set", "train.progress=false", "--set", "local.runtime=processes"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60 + 30, elapsed  # 60 s for the failure, plus process start-up
    if kind == "raise":
        assert "stage 1 (rank 1) failed: RuntimeError: fault injected at step 5" in err, err[-3000:]
    else:
        assert "rank      : 1" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]
    assert "summary:" not in out


def test_default_job_sequential_equals_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The promise of docs/training.md (Runtimes): with the default thread setting (one torch thread per stage for
    local learning), `--runtime sequential` (the CLI's code in this process) and the default processes runtime
    (`ppll train` as a user runs it, which spawns torchrun) train the default job to bit-identical weights."""
    args = ["--set", "train.epochs=1", "--set", "train.progress=false"]
    rc = cli_main(["train", "--runtime", "sequential", *args, "--save-dir", str(tmp_path / "sequential")])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    runs = {"sequential": out}
    res = run([sys.executable, "-m", "ppll_ext", "train", "--runtime", "processes", *args, "--save-dir",
               str(tmp_path / "processes")])
    assert res.returncode == 0, res.stderr[-3000:]
    runs["processes"] = res.stdout
    line = [x for x in runs["sequential"].splitlines() if "test accuracy" in x]
    assert line and line[0] in runs["processes"], runs
    curves = [[(r["loss"], r["lr"]) for r in map(json.loads, (tmp_path / rt / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "step"] for rt in runs]
    assert len(curves[0]) == 23 and curves[0] == curves[1]  # every stage's loss per step, bit for bit
    a, b = tmp_path / "sequential" / "step-000023", tmp_path / "processes" / "step-000023"
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.safetensors"))
    assert len(files) == 5 and files == sorted(str(p.relative_to(b)) for p in b.rglob("*.safetensors"))
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x if k != "rng.cpu"), name


def test_threads_runtime_keeps_token_and_soft_targets_whole() -> None:
    """(N, T) token ids and (N, T, V) soft targets through stage threads: each stage's loss (torchtitan's form) sees
    them whole, and the weights equal sequential local learning."""
    for soft in (False, True):
        trained = []
        for runner_cls in (SequentialRunner, ThreadRunner):
            blocks = []
            for k, mod in enumerate(lm.stage_modules(2)):
                aux = lm.aux_head(2, k)
                params = [*mod.parameters(), *(aux.parameters() if aux is not None else [])]
                blocks.append(LocalBlock(mod, aux, lm.loss_fn, index=k, optimizer=torch.optim.AdamW(params, lr=3e-3)))
            runner = runner_cls(blocks, 2)
            try:
                runner.train_segment(lm.batches(3, 8, soft))
            finally:
                runner.close()
            trained.append([b.state_dict() for b in blocks])
        for want, got in zip(*trained, strict=True):
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want), soft
