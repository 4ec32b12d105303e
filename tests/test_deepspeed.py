"""ppll_ext.deepspeed under the real `deepspeed` launcher on CPU: every stage's weights equal sequential local
learning in one process, data-parallel replicas stay identical, checkpoints round-trip, bad input is refused."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import sys
from pathlib import Path

import faults
import pytest
import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe import schedule
from safetensors.torch import load_file
from torch import nn

from ppll_ext.build import build_blocks
from ppll_ext.cli import main as cli_main
from ppll_ext.config import ModelConfig, load_config
from ppll_ext.core import LocalBlock
from ppll_ext.deepspeed import LocalBackwardPass, LocalPipelineEngine, LocalTrainSchedule, build_stage_aux_head
from ppll_ext.models import build_model
from ppll_ext.runtime import SequentialRunner, StageStats
from ppll_ext.train import prepare

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "tests" / "dist"
sys.path.insert(0, str(DIST))
import deepspeed_lm as lm_script  # noqa: E402
import deepspeed_train as script  # noqa: E402
from procs import LAST, LATE, Family, plan  # noqa: E402

pytestmark = pytest.mark.usefixtures("deepspeed_cpu_ops")

TRAIN = DIST / "deepspeed_train.py"
FAULTS = REPO / "tests" / "faults.py"
CONFIGS = REPO / "configs" / "deepspeed"
D2, D3, D4 = plan("deepspeed", 2), plan("deepspeed", 3), plan("deepspeed", 4)
"""The launches (launch/deepspeed.sh, one per process count) that run this module's cases, with other modules'."""

Runs = dict[int, tuple[dict, dict[str, torch.Tensor]]]


def runs(out: Path, nproc: int) -> Runs:
    """What deepspeed_train.py wrote to `out`: per rank (its JSON info, its final tensors)."""
    return {r: (json.loads((out / f"rank{r}.json").read_text()), load_file(str(out / f"rank{r}.safetensors")))
            for r in range(nproc)}


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def ppll_train(*args: object) -> list[object]:
    """Arguments of `ppll train --engine deepspeed args` (python -m ppll_ext.train, as the deepspeed launcher's
    --module starts it)."""
    return ["--engine", "deepspeed", *args]


NATIVE_COMMON = ["--on-nan", "skip", *sets("train.epochs=2", "train.progress=false", "local.micro_batches=2",
                                           "data.train_subset=1409")]
"""test_ppll_train_engine_deepspeed_equals_native_and_resumes: both engines' arguments."""
GPT2_SETS = ["model.name=gpt2", "model.depth=2", "model.hidden_dim=32", "model.heads=2", "model.mlp_dim=64",
             "data.name=pydoc", "data.seq_len=32", "data.train_subset=96", "data.test_subset=8", "train.batch_size=16",
             "train.epochs=1", "train.progress=false", "local.micro_batches=2", "local.aux=lm", "optim.name=adamw",
             "optim.lr=0.003"]
UNEVEN_SETS = ["model.name=vit", "model.hidden_dim=16", "model.mlp_dim=32", "model.depth=2", "model.heads=2",
               "data.train_subset=70", "data.test_subset=50", "train.batch_size=32", "train.epochs=2",
               "train.progress=false", "local.stages=1", "local.data_parallel=2", "optim.lr=0.05"]
FP16_ARGS = ("--stages", "2", "--micro", "2", "--size", "8", "--steps", "5", "--aux", "list", "--clip", "0.5", "--fp16")
ACT_PARAMS = [(2, True, None), (3, False, 0.5)]
"""test_activation_checkpointing_clipping_and_nan_skip_equal_sequential: (stages, reentrant, clip)."""
LM_RUNS = [(2, 2, False, 6), (3, 1, True, 4)]
"""deepspeed_lm.py runs (stages, micro-batches, soft targets, steps), each the last case of its launch."""
ZERO_RUN = ("--stages", "2", "--micro", "2", "--aux", "conv", "--clip", "1.0")
"""K = 2 stages x D = 2 replicas (4 processes), 2 micro-batches, per-stage clipping (ZeRO-1 computes the norm from
its shards)."""
PPLL_ZERO_SETS = ["model.name=resnet8", "model.width=8", "data.train_subset=128", "data.test_subset=16",
                  "train.batch_size=16", "train.epochs=1", "train.progress=false", "local.stages=2",
                  "local.data_parallel=2", "local.micro_batches=2", "optim.lr=0.05", "optim.grad_clip=1.0"]
"""`ppll train --engine deepspeed`, K = 2 stages x D = 2 replicas (4 processes), 4 steps of 2 x 16 digits, with the
default optimizer (SGD with Nesterov momentum, which DeepSpeed's ZeRO runs only when the ds_config allows untested
optimizers: ppll train does)."""


def act_args(stages: int, reentrant: bool, clip: float | None) -> list[str]:
    return ["--stages", str(stages), "--micro", "2", "--size", "8", "--steps", "6", "--aux", "list",
            "--checkpoint-interval", "1", *([] if reentrant else ["--non-reentrant"]), "--nan-step", "3", "--on-nan",
            "skip", *(["--clip", str(clip)] if clip else [])]


def add_cases() -> None:
    """This module's cases. With 2 processes the fp16 cases run late (they let DeepSpeed's accelerator claim fp16
    for the rest of the process) and deepspeed_lm.py last (it returns right after its last train_batch, with no
    barrier or flush, as stock scripts do); so with 3. With 4 (K = 2 x D = 2), deepspeed_train.py with ZeRO-1 for
    6 steps, DeepSpeed's checkpoint written after 3 ("zero"), and `ppll train --engine deepspeed` with ZeRO-1 in
    local.deepspeed_config (a one-line ds_config: ppll train adds the rest), a checkpoint every 2 steps
    ("ppll_zero")."""
    native = ["1:4:nan", "train", *ppll_train(*NATIVE_COMMON, "--save-dir", "{root}/native")]
    D2.add("two_a", "--out", "{root}/two_a", "--stages", 2, "--micro", 2, "--steps", 12, "--aux", "auto",
           "--save-ckpt", "{root}/two_ckpt", "--save-at", 6, "--eval", script=TRAIN)
    D2.add("two_b", "--out", "{root}/two_b", "--stages", 2, "--micro", 2, "--steps", 6, "--start", 6, "--aux", "auto",
           "--load-ckpt", "{root}/two_ckpt", script=TRAIN)
    D2.add("act2", "--out", "{root}/act2", *act_args(*ACT_PARAMS[0]), script=TRAIN)
    D3.add("act3", "--out", "{root}/act3", *act_args(*ACT_PARAMS[1]), script=TRAIN)
    D2.add("bf16", "--out", "{root}/bf16", "--model", "resnet8", "--stages", 2, "--steps", 4, "--config",
           CONFIGS / "ppll_bf16.json", "--save-ckpt", "{root}/bf16_ckpt", "--save-at", 4, script=TRAIN)
    D2.add("stock", "--out", "{root}/stock", "--model", "resnet8", "--stages", 2, "--steps", 3, "--engine", "stock",
           "--config", CONFIGS / "stock_1f1b.json", "--save-ckpt", "{root}/stock_ckpt", "--save-at", 3, script=TRAIN)
    D2.add("native_a", *native, "--set", "train.stop_at_step=30", script=FAULTS)
    D2.add("native_b", *native, "--resume", "{root}/native", script=FAULTS)
    D2.add("gpt2", *ppll_train("--save-dir", "{root}/gpt2", *sets(*GPT2_SETS)), module="ppll_ext.train")
    D2.add("uneven", *ppll_train("--save-dir", "{root}/uneven", *sets(*UNEVEN_SETS)), module="ppll_ext.train")
    D2.add("errors", script=DIST / "deepspeed_errors.py")
    D2.add("fp16_clean", "--out", "{root}/fp16_clean", *FP16_ARGS, script=TRAIN, order=LATE)
    D2.add("fp16_faulty", "--out", "{root}/fp16_faulty", *FP16_ARGS, "--overflow", "1:2", script=TRAIN, order=LATE)
    for run, (stages, micro, soft, steps) in enumerate(LM_RUNS):
        plan("deepspeed", stages).add(f"lm{run}", "--out", f"{{root}}/lm{run}", "--steps", steps, "--micro", micro,
                                      *(["--soft"] if soft else []), script=DIST / "deepspeed_lm.py", order=LAST)

    D4.write("zero1.json", json.dumps({"zero_optimization": {"stage": 1}}))
    zero1 = ["--set", "local.deepspeed_config={root}/zero1.json"]
    ppll = ["--keep", 5, *sets(*PPLL_ZERO_SETS)]
    D4.add("dp", "--out", "{root}/dp", "--stages", 2, "--micro", 2, "--steps", 6, "--aux", "conv", script=TRAIN)
    D4.add("zero", "--out", "{root}/zero", *ZERO_RUN, "--steps", 6, "--zero", 1, "--save-ckpt", "{root}/zero_ckpt",
           "--save-at", 3, script=TRAIN)
    D4.add("zero_plain", "--out", "{root}/zero_plain", *ZERO_RUN, "--steps", 6, script=TRAIN)
    D4.add("zero_resumed", "--out", "{root}/zero_resumed", *ZERO_RUN, "--steps", 3, "--start", 3, "--zero", 1,
           "--load-ckpt", "{root}/zero_ckpt", script=TRAIN)
    D4.add("zero_bf16", "--out", "{root}/zero_bf16", "--stages", 2, "--steps", 2, "--aux", "conv", "--config",
           CONFIGS / "ppll_zero1_bf16.json", script=TRAIN)
    D4.add("ppll_zero", *ppll_train(*ppll, "--save-dir", "{root}/ppll_zero", *zero1, "--save-every", 2),
           module="ppll_ext.train")
    D4.add("ppll_plain", *ppll_train(*ppll, "--save-dir", "{root}/ppll_plain", *sets("train.stop_at_step=2")),
           module="ppll_ext.train")
    D4.add("ppll_resumed", *ppll_train(*ppll, "--save-dir", "{root}/ppll_resumed", *zero1, "--resume",
                                       "{root}/ppll_zero/step-000002"), module="ppll_ext.train")
    D4.add("zero_fp16", "--out", "{root}/zero_fp16", "--stages", 2, "--micro", 2, "--size", 8, "--steps", 5, "--aux",
           "conv", "--clip", 0.5, "--zero", 1, "--fp16", "--overflow", "1:2:1", "--nan-step", 3, "--on-nan", "skip",
           script=TRAIN, order=LATE)


add_cases()


@pytest.fixture
def two(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return D2.launch(tmp_path_factory)


@pytest.fixture
def three(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return D3.launch(tmp_path_factory)


@pytest.fixture
def four(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return D4.launch(tmp_path_factory)


def reference(parts: list[int], micro: int, size: int, steps: int, replicas: int = 1,
              clip: float | None = None, nan_step: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Sequential local learning of the script's layers, aux heads, AdamW and LR warm-up in this process, with
    all replicas' micro-batches of a step as one mini-batch; tensors named as in the stage's module."""
    layers = script.make_layers()
    x_all, _ = script.digits()
    blocks = []
    for s in range(len(parts) - 1):
        body = nn.Sequential(*layers[parts[s]:parts[s + 1]])
        aux = None
        if s < len(parts) - 2:
            aux = build_stage_aux_head(layers, s, parts, "conv", x_all[:2], hidden=script.AUX_HIDDEN, seed=0)
        params = list(body.parameters()) + (list(aux.parameters()) if aux is not None else [])
        opt = torch.optim.AdamW(params, lr=script.LR, betas=script.BETAS, eps=script.EPS,
                                weight_decay=script.WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, script.lr_factor)
        blocks.append(LocalBlock(body, aux, nn.CrossEntropyLoss(), index=s, optimizer=opt, lr_scheduler=sched,
                                 grad_clip=clip, on_nan="skip" if nan_step is not None else "error"))
    runner = SequentialRunner(blocks, micro * replicas)
    stats = [StageStats(b.index) for b in blocks]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            mbs = [mb for r in range(replicas) for mb in script.micro_batches(step, r, replicas, micro, size, nan_step)]
            runner.train_batch(torch.cat([x for x, _ in mbs]), torch.cat([y for _, y in mbs]), stats)
    finally:
        torch.set_num_threads(threads)
    out = []
    for s, block in enumerate(blocks):
        tensors = {f"{parts[s] + i}.{k}": v for i, layer in enumerate(block.body) for k, v in
                   layer.state_dict().items()}
        if block.aux is not None:
            tensors.update({f"aux_head.{k}": v for k, v in block.aux.state_dict().items()})
        out.append(tensors)
    return out


def params_only(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without BatchNorm statistics buffers: each data-parallel replica keeps its own (DeepSpeed syncs none)."""
    return {k: v for k, v in tensors.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, atol: float) -> None:
    module_keys = {k for k in got if not k.startswith("opt.")}
    assert module_keys == set(want), (what, sorted(module_keys ^ set(want)))
    for k, v in want.items():
        assert torch.allclose(got[k], v.float(), atol=atol, rtol=0), (what, k, (got[k] - v.float()).abs().max())


def test_schedule_never_moves_gradients_and_steps_once() -> None:
    for stages, stage in [(1, 0), (3, 0), (3, 1), (3, 2)]:
        steps = list(LocalTrainSchedule(micro_batches=4, stages=stages, stage_id=stage))
        cmds = [type(c) for step in steps for c in step]
        assert len(steps) == 5 and [type(c) for c in steps[-1]] == [schedule.ReduceGrads, schedule.OptimizerStep]
        assert not {schedule.SendGrad, schedule.RecvGrad, schedule.BackwardPass} & set(cmds)
        assert cmds.count(schedule.OptimizerStep) == 1 and cmds[-1] is schedule.OptimizerStep
        assert cmds.count(LocalBackwardPass) == 4
        assert cmds.count(schedule.LoadMicroBatch) == (4 if stage == 0 else 0)
        assert cmds.count(schedule.RecvActivation) == (0 if stage == 0 else 4)
        assert cmds.count(schedule.SendActivation) == (0 if stage == stages - 1 else 4)
    handled = set(LocalPipelineEngine._INSTRUCTION_MAP)
    assert {schedule.SendGrad, schedule.RecvGrad, schedule.BackwardPass, schedule.ReduceTiedGrads}.isdisjoint(handled)
    assert LocalPipelineEngine._INSTRUCTION_MAP[schedule.ForwardPass] is LocalPipelineEngine._local_forward
    # a replica with no batch in an epoch's last step only joins the reduce and the step
    idle = list(LocalTrainSchedule(micro_batches=0, stages=2, stage_id=1))
    assert [[type(c) for c in step] for step in idle] == [[schedule.ReduceGrads, schedule.OptimizerStep]]


def test_configs_are_consistent() -> None:
    cfg = {name: json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
           for name in ("ppll", "ppll_bf16", "ppll_zero1_bf16", "stock_1f1b")}
    for c in cfg.values():
        assert c["optimizer"]["params"]["torch_adam"] is True
        assert "train_batch_size" not in c  # derived from micro-batch x accumulation x data-parallel size
    assert cfg["ppll_bf16"]["bf16"]["enabled"] is True
    # DeepSpeed 0.19.8 keeps buffers in fp32 under bf16 unless told otherwise; CPU BatchNorm then fails.
    assert cfg["ppll_bf16"]["data_types"]["buffer_dtype"] == "bf16"
    strip = {k: v for k, v in cfg["ppll_bf16"].items() if k not in ("bf16", "data_types")}
    assert strip == cfg["ppll"] == cfg["stock_1f1b"]  # same hyper-parameters: only the engine or precision differs
    assert cfg["ppll_zero1_bf16"]["zero_optimization"] == {"stage": 1}  # ZeRO-1 + bf16, otherwise ppll_bf16's
    assert {**cfg["ppll_zero1_bf16"], "zero_optimization": {"stage": 0}} == cfg["ppll_bf16"]


def test_two_stages_equal_sequential_and_checkpoint_resumes(two: Family) -> None:
    ran, root = two, two.root
    ran.ok("two_a", "two_b")
    ckpt = root / "two_ckpt"
    first = runs(root / "two_a", 2)
    parts = first[0][0]["parts"]
    ref = reference(parts, micro=2, size=16, steps=12)
    for r, (info, tensors) in first.items():
        assert info["stage"] == r and info["finite"] and info["global_steps"] == 12
        assert info["global_samples"] == 12 * 2 * 16
        assert torch.isfinite(torch.tensor(info["eval_loss"]))
        assert_matches(tensors, ref[r], f"stage {r} after 12 steps", atol=1e-5)
    saved = sorted(p.name for p in (ckpt / "step6").iterdir())
    assert "aux_head_00-model_states.pt" in saved and "aux_head_01-model_states.pt" not in saved, saved

    second = runs(root / "two_b", 2)
    for r, (info, tensors) in second.items():
        assert info["loaded_steps"] == 6 and info["loaded_samples"] == 6 * 2 * 16
        at_save = load_file(str(root / "two_a" / f"ckpt_rank{r}.safetensors"))
        loaded = load_file(str(root / "two_b" / f"loaded_rank{r}.safetensors"))
        assert loaded.keys() == at_save.keys() and any(k.startswith("opt.") for k in loaded)
        for k in at_save:
            assert torch.equal(loaded[k], at_save[k]), (r, k)
        assert info["losses"] == first[r][0]["losses"][6:]
        for k, v in first[r][1].items():
            assert torch.equal(tensors[k], v), ("resumed run differs", r, k)
        assert info["lr"] == first[r][0]["lr"]


@pytest.mark.parametrize("stages, reentrant, clip", ACT_PARAMS)
def test_activation_checkpointing_clipping_and_nan_skip_equal_sequential(request: pytest.FixtureRequest, stages: int,
                                                                         reentrant: bool, clip: float | None) -> None:
    """activation_checkpoint_interval=1 with DeepSpeed's reentrant (default) or non-reentrant checkpointing trains
    every stage's parameters exactly as sequential local learning, also with per-stage gradient clipping; with
    on_nan="skip", a train_batch whose labels make every stage's loss NaN is skipped by every stage, as sequential
    local learning skips it. (BatchNorm running statistics are left out: checkpointing recomputes the forward pass,
    which updates them again.)"""
    ran = request.getfixturevalue("two" if stages == 2 else "three")
    root = ran.root
    ran.ok(f"act{stages}")
    trained = runs(root / f"act{stages}", stages)
    ref = reference(trained[0][0]["parts"], micro=2, size=8, steps=6, nan_step=3, clip=clip)
    for r, (info, tensors) in trained.items():
        assert info["stage"] == r and info["global_steps"] == 6 and info["skipped_steps"] == 1, info
        assert [math.isnan(v) for v in info["losses"]] == [False, False, False, True, False, False], info
        assert_matches(params_only(tensors), params_only(ref[r]), f"stage {r} of {stages}", atol=1e-5)


def test_data_parallel_replicas_stay_identical(four: Family) -> None:
    ran, root = four, four.root
    ran.ok("dp")
    trained = runs(root / "dp", 4)
    by_stage: dict[int, list[dict[str, torch.Tensor]]] = {}
    for info, tensors in trained.values():
        by_stage.setdefault(info["stage"], []).append(tensors)
        assert info["finite"] and info["global_samples"] == 6 * 2 * 16 * 2
    ref = reference(trained[0][0]["parts"], micro=2, size=16, steps=6, replicas=2)
    for stage, (a, b) in by_stage.items():
        a, b = params_only(a), params_only(b)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), ("replicas differ", stage, k)
        assert_matches(a, params_only(ref[stage]), f"stage {stage} vs sequential over both replicas' data",
                       atol=1e-5)


def import_and_check(ckpt: Path, out: Path, runs: dict[int, tuple[dict, dict[str, torch.Tensor]]]) -> None:
    """`ppll import-deepspeed` of a resnet8 checkpoint written by deepspeed_train.py: the plain model loads it
    (strict) and every tensor equals the one the stage held; aux heads land in training_state/. (The CLI's code runs
    in this process.)"""
    assert cli_main(["import-deepspeed", str(ckpt), str(out), "--set", "model.name=resnet8", "--set",
                     "model.width=8"]) == 0
    torch.manual_seed(0)
    layered = build_model(ModelConfig(name="resnet8", width=8), in_channels=1, image_size=8, num_classes=10)
    state = load_file(str(out / "model.safetensors"))
    layered.model.load_state_dict(state, strict=True)
    for info, tensors in runs.values():
        start, stop = info["parts"][info["stage"]], info["parts"][info["stage"] + 1]
        for idx in range(start, stop):
            for key, name in layered.key_map(layered.layers[idx]).items():
                assert torch.equal(state[name].float(), tensors[f"{idx}.{key}"]), (idx, key)
    aux_file = out / "training_state" / "aux-heads.safetensors"
    stage0 = {k.removeprefix("aux_head."): v for k, v in runs[0][1].items() if k.startswith("aux_head.")}
    if not stage0:
        assert not aux_file.exists()
        return
    aux = load_file(str(aux_file))
    assert {k.removeprefix("stage0.") for k in aux} == stage0.keys()
    for k, v in stage0.items():
        assert torch.equal(aux[f"stage0.{k}"].float(), v), k


def test_bf16_config_trains_a_ppll_ext_model_and_its_checkpoint_imports(tmp_path: Path,
                                                                        two: Family) -> None:
    ran, root = two, two.root
    ran.ok("bf16")
    trained = runs(root / "bf16", 2)
    for info, tensors in trained.values():
        assert info["finite"] and info["global_steps"] == 4
        assert any(k.startswith("aux_head.") for k in tensors) == (info["stage"] == 0)
    import_and_check(root / "bf16_ckpt", tmp_path / "imported", trained)


def test_stock_deepspeed_checkpoint_imports_and_bad_ones_are_refused(tmp_path: Path, two: Family,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ran, root = two, two.root
    ran.ok("stock")
    shutil.copytree(root / "stock", tmp_path / "run")
    shutil.copytree(root / "stock_ckpt", tmp_path / "ckpt")  # a copy: the test breaks its files one by one
    import_and_check(tmp_path / "ckpt", tmp_path / "imported", runs(tmp_path / "run", 2))

    def refused(ckpt: Path, *sets: str) -> str:
        """`ppll import-deepspeed` through the CLI's own code in this process: one error line, exit 2."""
        capsys.readouterr()
        rc = cli_main(["import-deepspeed", str(ckpt), str(tmp_path / "never"), "--set", "model.name=resnet8", *sets])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and not (tmp_path / "never").exists() and len(err.splitlines()) == 1, err
        return err

    assert "'conv1.weight' has shape (8, 1, 3, 3), the model has (16, 1, 3, 3)" in refused(tmp_path / "ckpt")
    step = tmp_path / "ckpt" / "step3"
    marker = tmp_path / "unpickled"
    layer = next(step.glob("layer_01-*"))
    layer.write_bytes(pickle.dumps(_Marker(str(marker))))
    assert "weights_only=True" in refused(tmp_path / "ckpt", "--set", "model.width=8") and not marker.exists()
    layer.unlink()
    assert "missing" in refused(tmp_path / "ckpt", "--set", "model.width=8")
    assert "not a DeepSpeed pipeline checkpoint" in refused(tmp_path / "run", "--set", "model.width=8")


class _Marker:
    """Unpickling this creates a file: proof that a loader executed pickle code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_bad_arguments_raise_config_error(two: Family) -> None:
    res = two["errors"]
    lines = [line for line in res.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
    assert len(lines) == 27 and all(line.startswith("ok ") for line in lines), "\n".join(lines)
    # the engine's arguments and calls: one line naming the argument, before any work
    assert "ok train_batch with 0 micro-batches: num_micro_batches=0 must be an integer >= 1 (micro-batches in this " \
           "train_batch; a data-parallel replica without data in a step calls join_step())" in lines, lines
    assert any(line.startswith("ok ZeRO-1 with an untested client optimizer: zero_optimization.stage=1 with the "
                               "client optimizer SGD") for line in lines), lines
    for stage in (2, 3):  # ZeRO-1 is accepted; 2 and 3 are refused with the reason and the fix
        assert any(line.startswith(f"ok ZeRO-{stage}: zero_optimization.stage={stage}: use stage 1") and
                   "DeepSpeed refuses for pipelines too" in line for line in lines), lines
    # on_nan="error" (the default): every stage stops at the NaN batch, naming itself and the step
    assert {line for line in lines if line.startswith("ok nan loss")} == {
        f"ok nan loss: stage {k}: loss is nan at step 2; lower the learning rate or clip gradients, or skip such "
        f"steps with on_nan=\"skip\"" for k in (0, 1)}, lines
    # stage 1 made one train_batch call fewer: close() raises on both stages, saying so
    fewer = ("stage 1 ended while stage 0 still sent 1 micro-batch(es), which were never trained there: stage 1 made "
             "fewer train_batch / eval_batch calls than stage 0; every rank must make the same train_batch / "
             "eval_batch calls")
    assert {line for line in lines if line.startswith("ok uneven calls")} == {
        f"ok uneven calls: {fewer}", f"ok uneven calls: stage 0 stops too: {fewer}"}, lines


def test_ppll_train_engine_deepspeed_equals_native_and_resumes(tmp_path: Path, two: Family,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`ppll train --engine deepspeed --on-nan skip` under the deepspeed launcher, with a NaN loss on stage 1 at
    step 4, stopped at step 30 and resumed, ends with the same weights, aux heads and optimizer state as the native
    engine's uninterrupted run. 1409 training images in batches of 64 cut into M = 2 micro-batches: the last batch
    of each epoch holds one image (fewer than M), and both engines train on it."""
    ran, root = two, two.root
    first, second = ran["native_a"], ran["native_b"]
    assert "stopped at step 30" in first.stdout and "step-000030" in first.stdout, first.stdout
    assert "ppll: warning: stage 1: loss is nan at step 4; this stage skips the step's update" in first.stderr
    assert "resuming at epoch 2 batch 7 (step 30)" in second.stdout, second.stdout
    # the native engine's run in this process (the CLI's own code, sequential runtime), with the same fault
    faults.install("1:4:nan")
    try:
        capsys.readouterr()
        rc = cli_main(["train", "--runtime", "sequential", *NATIVE_COMMON, "--save-dir", str(tmp_path / "native")])
        native_out, native_err = capsys.readouterr()
    finally:
        faults.clear()
    assert rc == 0, native_err[-3000:]
    accuracy = [line for line in native_out.splitlines() if "test accuracy" in line]
    assert accuracy and accuracy[0] in second.stdout, (accuracy, second.stdout)
    assert "(1409 train / 360 test)" in second.stdout and second.stdout.count("| steps 46") == 2, second.stdout
    a, b = root / "native" / "step-000046", tmp_path / "native" / "step-000046"
    files = sorted(str(p.relative_to(b)) for p in b.rglob("*.safetensors"))
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*.safetensors")) == files
    assert "training_state/stage-1.safetensors" in files
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        for k in x.keys() - {"rng.cpu"}:  # DeepSpeed draws random numbers of its own while starting
            assert torch.equal(x[k], y[k]), (name, k)


def test_gpt2_engine_deepspeed_equals_native(tmp_path: Path, two: Family,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`ppll train --engine deepspeed` on a GPT-2 language model (K = 2, token ids in, per-token aux head, M = 2)
    writes the same checkpoint as the native engine: weights, aux head, optimizer state, config.json."""
    ran, root = two, two.root
    res = ran["gpt2"]
    assert "validation perplexity" in res.stdout, res.stdout
    capsys.readouterr()  # the native engine's run in this process (the CLI's own code, sequential runtime)
    rc = cli_main(["train", "--runtime", "sequential", *sets(*GPT2_SETS), "--save-dir", str(tmp_path / "native")])
    native_out, native_err = capsys.readouterr()
    assert rc == 0, native_err[-3000:]
    perplexity = [line for line in native_out.splitlines() if "validation perplexity" in line]
    assert perplexity and perplexity[0] in res.stdout, (perplexity, res.stdout)
    a, b = root / "gpt2" / "step-000006", tmp_path / "native" / "step-000006"
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    files = sorted(str(p.relative_to(b)) for p in b.rglob("*.safetensors"))
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*.safetensors")) == files and len(files) == 5
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        for k in x.keys() - {"rng.cpu"}:  # DeepSpeed draws random numbers of its own while starting
            assert torch.equal(x[k], y[k]), (name, k)


def test_data_parallel_trains_the_last_uneven_step(two: Family) -> None:
    """`ppll train --engine deepspeed` with 2 data-parallel replicas and 3 batches per epoch (32, 32, 6 images):
    step 1 averages the replicas' batches, step 2 trains the 6-image batch on replica 0 alone (replica 1 only joins
    the all-reduce), as one process training on batches 0+1 together, then batch 2."""
    ran, root = two, two.root
    res = ran["uneven"]
    assert "| steps 4" in res.stdout and "(70 train / 50 test)" in res.stdout, res.stdout
    cfg = load_config(None, [*UNEVEN_SETS, "local.runtime=sequential", "local.engine=native", "local.data_parallel=1"])
    job = prepare(cfg)
    _, blocks = build_blocks(cfg, job.layered, job.example, total_steps=4)
    block = blocks[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(2):
            job.train_loader.set_epoch(epoch)
            (x0, y0), (x1, y1), (x2, y2) = job.train_loader.iter_from(0)
            assert len(y2) == 6
            block.train_step(torch.cat([x0, x1]), torch.cat([y0, y1]))
            block.train_step(x2, y2)
    finally:
        torch.set_num_threads(threads)
    trained = load_file(str(root / "uneven" / "step-000004" / "model-00001-of-00001.safetensors"))
    want = job.layered.model.state_dict()
    assert trained.keys() == want.keys()
    for k, v in want.items():
        assert torch.allclose(trained[k], v, atol=1e-5, rtol=0), (k, (trained[k] - v).abs().max())


def lm_reference(stages: int, micro: int, steps: int, soft: bool) -> list[dict[str, torch.Tensor]]:
    """Sequential local learning of deepspeed_lm.py's layers (each built from its DeepSpeed layer seed), per-token
    aux heads and AdamW in this process; tensors named as in the stage's module."""
    layers = []
    for i, spec in enumerate(lm_script.specs()):
        ds_utils.set_random_seed(lm_script.BASE_SEED + i)
        layers.append(spec.build())
    example = lm_script.batches(1, 2)[0][0]
    parts = lm_script.PARTS[stages]
    blocks = []
    for s in range(stages):
        body = nn.Sequential(*layers[parts[s]:parts[s + 1]])
        aux = build_stage_aux_head(layers, s, parts, "auto", example, seed=0) if s < stages - 1 else None
        params = [*body.parameters(), *(aux.parameters() if aux is not None else [])]
        opt = torch.optim.AdamW(params, lr=lm_script.LR, weight_decay=lm_script.WEIGHT_DECAY)
        blocks.append(LocalBlock(body, aux, lm_script.loss_fn, index=s, optimizer=opt))
    assert isinstance(blocks[0].aux[0], nn.LayerNorm)  # "auto" chose the per-token lm head
    runner = SequentialRunner(blocks, micro)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for x, y in lm_script.batches(steps, micro * lm_script.SIZE, soft):
            runner.train_batch(x, y, [StageStats(k) for k in range(stages)])
    finally:
        torch.set_num_threads(threads)
    out = []
    for s, block in enumerate(blocks):
        want = {f"{parts[s] + i}.{k}": v for i, layer in enumerate(block.body) for k, v in layer.state_dict().items()}
        if block.aux is not None:
            want.update({f"aux_head.{k}": v for k, v in block.aux.state_dict().items()})
        out.append(want)
    return out


def test_lm_from_layer_specs_with_token_targets_equals_sequential_and_exits_cleanly(
        two: Family, three: Family) -> None:
    """DeepSpeedExamples-style LM: (N, T) token ids (K=2, M=2) and soft (N, T, V) targets (K=3, M=1) reach every
    stage whole, aux_heads="auto" gives per-token heads; a fast first stage and a script that returns right after
    its last train_batch (no flush), the last case of its launch: every rank exits 0."""
    for run, (stages, micro, soft, steps) in enumerate(LM_RUNS):
        ran = (two, three)[run]
        root = ran.root
        res = ran[f"lm{run}"]
        assert ran.launch.returncode == 0, (run, ran.launch.stdout[-2000:], ran.launch.stderr[-3000:])
        stderr = res.stderr + ran.launch.stderr  # what the process printed while it ended lands in the launch's
        assert "Traceback" not in stderr and "terminate called" not in stderr, (run, stderr[-3000:])
        out = root / f"lm{run}"
        for s, want in enumerate(lm_reference(stages, micro, steps, soft)):
            got = load_file(str(out / f"rank{s}.safetensors"))
            assert got.keys() == want.keys()
            for k, v in want.items():
                assert torch.allclose(got[k], v, atol=1e-5, rtol=0), (run, s, k, (got[k] - v).abs().max())


def test_zero1_shards_optimizer_states_within_each_stage(four: Family) -> None:
    """ZeRO-1 over each stage's 2 replicas trains the same weights as the same run without ZeRO, its optimizer states
    gathered from the shards equal the unsharded ones, and each process holds half the optimizer-state bytes."""
    ran, root = four, four.root
    ran.ok("zero", "zero_plain")
    zero, plain = runs(root / "zero", 4), runs(root / "zero_plain", 4)
    for r in range(4):
        (zi, zt), (pi, pt) = zero[r], plain[r]
        assert (zi["stage"], zi["replica"]) == (pi["stage"], pi["replica"]) == divmod(r, 2)
        assert zi["global_steps"] == 6 and zi["finite"] and zi["skipped_steps"] == 0
        assert zt.keys() == pt.keys() and any(k.startswith("opt.") for k in zt)
        for k, v in pt.items():
            assert torch.allclose(zt[k], v, atol=1e-5, rtol=1e-4), (r, k, (zt[k] - v).abs().max())
        ratio = zi["optimizer_bytes"] / pi["optimizer_bytes"]
        assert 0.45 < ratio < 0.55, (r, zi["optimizer_bytes"], pi["optimizer_bytes"])
        # the norm ZeRO-1 clips by is the stage's own, summed from its replicas' shards (not over both stages)
        assert len(zi["grad_norms"]) == 6 and all(n > 0 for n in zi["grad_norms"]), zi["grad_norms"]
        assert torch.allclose(torch.tensor(zi["grad_norms"]), torch.tensor(pi["grad_norms"]), rtol=1e-4), (
            r, zi["grad_norms"], pi["grad_norms"])
    for stage in (0, 1):
        a, b = zero[2 * stage][1], zero[2 * stage + 1][1]
        assert all(torch.equal(a[k], b[k]) for k in params_only(a)), ("replicas differ", stage)
        assert zero[2 * stage][0]["grad_norms"] == zero[2 * stage + 1][0]["grad_norms"]


def test_zero1_bf16_config_shards_optimizer_states_within_each_stage(four: Family) -> None:
    """configs/deepspeed/ppll_zero1_bf16.json (K = 2 x D = 2): DeepSpeed picks its ZeRO-1 optimizer, which shards the
    fp32 optimizer states over the stage's replicas (each holds half of exp_avg + exp_avg_sq); replicas stay
    identical, the losses are finite and each stage clips by its own gradient norm (the same on both replicas)."""
    ran, root = four, four.root
    ran.ok("zero_bf16")
    trained = runs(root / "zero_bf16", 4)
    for r, (info, _) in trained.items():
        assert info["finite"] and info["global_steps"] == 2 and info["optimizer"] == "DeepSpeedZeroOptimizer", info
        ratio = info["optimizer_bytes"] / (2 * 4 * info["trainable_numel"])  # exp_avg, exp_avg_sq: fp32
        assert 0.45 < ratio < 0.55, (r, info["optimizer_bytes"], info["trainable_numel"])
    for stage in (0, 1):
        (a_info, a), (b_info, b) = trained[2 * stage], trained[2 * stage + 1]
        assert all(torch.equal(a[k], b[k]) for k in params_only(a)), ("replicas differ", stage)
        assert a_info["grad_norms"] == b_info["grad_norms"] and all(n > 0 for n in a_info["grad_norms"])
    assert trained[0][0]["grad_norms"] != trained[2][0]["grad_norms"]


def test_zero1_deepspeed_checkpoint_resumes_exactly(four: Family) -> None:
    """DeepSpeed's own save_checkpoint / load_checkpoint under ZeRO-1: one optimizer shard file per process, and a run
    resumed at step 3 ends with exactly the weights, optimizer states and losses of the uninterrupted run. (DeepSpeed
    saves a stage's module once, from replica 0: every replica resumes with replica 0's BatchNorm statistics.)"""
    ran, root = four, four.root
    ran.ok("zero", "zero_resumed")
    first = runs(root / "zero", 4)
    shards = sorted(p.name for p in (root / "zero_ckpt" / "step3").glob("*optim_states.pt"))
    assert len(shards) == 4, shards
    second = runs(root / "zero_resumed", 4)
    for r, (info, tensors) in second.items():
        assert info["loaded_steps"] == 3
        at_save = load_file(str(root / "zero" / f"ckpt_rank{r}.safetensors"))
        want = {**load_file(str(root / "zero" / f"ckpt_rank{r - r % 2}.safetensors")), **params_only(at_save)}
        loaded = load_file(str(root / "zero_resumed" / f"loaded_rank{r}.safetensors"))
        assert loaded.keys() == want.keys() and any(k.startswith("opt.") for k in want)
        assert all(torch.equal(loaded[k], v) for k, v in want.items()), r
        assert info["losses"] == first[r][0]["losses"][3:]
        final = first[r][1] if r % 2 == 0 else params_only(first[r][1])
        assert all(torch.equal(tensors[k], v) for k, v in final.items()), ("resumed run differs", r)


def test_fp16_loss_scale_is_per_stage(two: Family) -> None:
    """DeepSpeed's fp16 optimizer with dynamic loss scaling, K = 2 (on this CPU with torch's fp16 kernels, see
    deepspeed_train.allow_fp16_on_cpu): infinite gradients on stage 1 at train_batch 2 skip stage 1's update only and
    halve its loss scale, with one warning; stage 0 keeps its scale and ends with exactly the weights of the run
    without the overflow (stock DeepSpeed reduces the overflow flag over all stages). Without an overflow the fp16
    weights follow fp32 sequential local learning with the same clipping, up to fp16 rounding (measured: within 8-18%
    of each tensor's fp32 displacement after 5 steps)."""
    ran, root = two, two.root
    ran.ok("fp16_clean")
    res = ran["fp16_faulty"]
    clean, faulty = runs(root / "fp16_clean", 2), runs(root / "fp16_faulty", 2)
    (c0, t0), (f0, g0), (c1, t1), (f1, g1) = clean[0], faulty[0], clean[1], faulty[1]
    assert c0["loss_scale"] == c1["loss_scale"] == f0["loss_scale"] == 256.0 and f1["loss_scale"] == 128.0
    assert [c0["skipped_steps"], c1["skipped_steps"], f0["skipped_steps"], f1["skipped_steps"]] == [0, 0, 0, 1]
    assert c1["lr"] == f1["lr"] and f1["global_steps"] == 5  # the schedule advances over the skipped step
    assert t0.keys() == g0.keys() and all(torch.equal(t0[k], g0[k]) for k in t0)
    assert any(not torch.equal(t1[k], g1[k]) for k in t1)
    warnings = [line for line in res.stderr.splitlines() if "overflowed" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "stage 1: gradients overflowed at step 2; this stage skips the step's update (loss scale now 128)"), warnings
    ref = reference(c0["parts"], micro=2, size=8, steps=5, clip=0.5)
    init = reference(c0["parts"], micro=2, size=8, steps=0)
    for r, (_, tensors) in clean.items():
        for k, v in params_only(ref[r]).items():  # fp16 rounding: within 30% of how far fp32 moved each tensor
            err, moved = (tensors[k] - v).norm(), (v - init[r][k]).norm()
            assert moved > 0 and err < 0.3 * moved, (r, k, float(err), float(moved))


def test_zero1_fp16_overflow_on_one_replica_and_nan_skip_stay_within_the_stage(four: Family) -> None:
    """ZeRO-1 with fp16 (K = 2 x D = 2): infinite gradients on replica 1 of stage 1 at train_batch 2 make both replicas
    of stage 1 (the overflow flag is reduced over the stage's replicas) and no replica of stage 0 skip that update
    and halve their loss scale; a NaN loss on every stage at train_batch 3 (on_nan="skip") drops ZeRO's reduced
    gradients on every rank. Replicas stay identical; the schedule advances over every skipped step."""
    ran, root = four, four.root
    ran.ok("zero_fp16")
    trained = runs(root / "zero_fp16", 4)
    for r, (info, tensors) in trained.items():
        stage = r // 2
        assert info["optimizer"] == "DeepSpeedZeroOptimizer" and info["global_steps"] == 5, info
        assert (info["skipped_steps"], info["loss_scale"]) == ((1, 256.0) if stage == 0 else (2, 128.0)), (r, info)
        assert [math.isnan(v) for v in info["losses"]] == [False, False, False, True, False], (r, info["losses"])
        assert math.isinf(info["grad_norms"][2]) == (stage == 1), (r, info["grad_norms"])
        assert all(torch.isfinite(v).all() for v in tensors.values()), r
    assert trained[0][0]["lr"] == trained[2][0]["lr"]
    for stage in (0, 1):
        a, b = trained[2 * stage][1], trained[2 * stage + 1][1]
        assert all(torch.equal(a[k], b[k]) for k in params_only(a)), ("replicas differ", stage)


def assert_same_checkpoint(a: Path, b: Path, exact: bool) -> None:
    """The same safetensors files with the same keys; every tensor equal (or close) but the RNG state."""
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.safetensors"))
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*.safetensors"))
    assert "training_state/stage-1.safetensors" in files
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        for k in x.keys() - {"rng.cpu"}:
            same = torch.equal(x[k], y[k]) if exact else torch.allclose(x[k], y[k], atol=1e-6, rtol=1e-4)
            assert same, (name, k, (x[k] - y[k]).abs().max())


def test_ppll_train_zero1_checkpoint_gathers_the_states(four: Family) -> None:
    """With ZeRO-1 the checkpoint holds each stage's optimizer states gathered whole from its replicas' shards, in
    ppll_ext's layout: the same files and tensors (up to rounding) as the same run without ZeRO."""
    ran, root = four, four.root
    ran.ok("ppll_zero", "ppll_plain")
    zero = root / "ppll_zero"
    assert_same_checkpoint(zero / "step-000002", root / "ppll_plain" / "step-000002", exact=False)
    state = load_file(str(zero / "step-000002" / "training_state" / "stage-0.safetensors"))
    assert any(k.endswith("momentum_buffer") for k in state), sorted(state)


def test_ppll_train_zero1_resumes_exactly(four: Family) -> None:
    """A ZeRO-1 run resumed from its step-2 checkpoint (the gathered states re-sharded over the replicas) ends with
    exactly the uninterrupted run's checkpoint."""
    ran, root = four, four.root
    ran.ok("ppll_zero", "ppll_resumed")
    assert_same_checkpoint(root / "ppll_zero" / "step-000004", root / "ppll_resumed" / "step-000004", exact=True)
