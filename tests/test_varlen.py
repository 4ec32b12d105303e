"""Variable sequence lengths: batches whose length changes from step to step (32, 48, 17, 64, 5, 40 tokens), and
micro-batches of different lengths within a step, flow through every transport — the sequential, threads and
processes runtimes, SchedulePPLL and the DeepSpeed adapter — and every one of them trains exactly the weights of
sequential local learning (the header carries each message's shape)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppll_ext.runtime import SequentialRunner, ThreadRunner, evaluate_blocks

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "tests" / "dist"
sys.path.insert(0, str(REPO / "tests"))
from procs import Family, plan  # noqa: E402
from varlen_cases import (  # noqa: E402
    LENGTHS,
    as_steps,
    batches,
    build,
    eval_batches,
    micro_steps,
    train_sequential,
    weights,
)

T2, D2 = plan("torchrun", 2), plan("deepspeed", 2)
"""The launches that run this module's multi-process cases, with other modules' cases."""
T2.add("varlen_runtime", "--mode", "runtime", "--model", "gpt2", "--micro", 2, "--out", "{root}/varlen_runtime",
       script=DIST / "varlen_torchrun.py")
T2.add("varlen_schedule", "--mode", "schedule", "--model", "llama", "--out", "{root}/varlen_schedule",
       script=DIST / "varlen_torchrun.py")
D2.add("varlen_deepspeed", "--out", "{root}/varlen_deepspeed", script=DIST / "deepspeed_varlen.py")


@pytest.fixture
def torchrun2(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return T2.launch(tmp_path_factory)


@pytest.fixture
def deepspeed2(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return D2.launch(tmp_path_factory)


def reference(model: str, stages: int, micro: int, steps: list) -> dict[int, dict[str, torch.Tensor]]:
    """Each block's tensors after sequential local learning on `steps` (lists of micro-batches)."""
    blocks = build(model, stages, micro)
    train_sequential(blocks, steps)
    return {k: weights(b) for k, b in blocks.items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, t in want.items():
        assert torch.equal(got[name], t), (what, name, (got[name] - t).abs().max())


def test_cases_change_length_every_step() -> None:
    assert [x.shape[1] for x, _ in batches()] == list(LENGTHS) and len(set(LENGTHS)) == len(LENGTHS)
    assert all(len({x.shape[1] for x, _ in step}) == 2 for step in micro_steps()[::2])  # two lengths in one step


@pytest.mark.parametrize(("model", "stages", "micro"), [("gpt2", 2, 2), ("llama", 3, 1)])
def test_sequential_and_threads_runtimes_train_on_changing_lengths(model: str, stages: int, micro: int) -> None:
    """GPT-2's learned positions and Llama's rotary ones (and its "lm-blocks" heads) take every length; the
    threads runtime's queues carry them and it trains the weights of the sequential runtime bit for bit, which are
    those of block-by-block local learning."""
    want = reference(model, stages, micro, as_steps(batches(), micro))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq_blocks = build(model, stages, micro)
        SequentialRunner(list(seq_blocks.values()), micro).train_segment(batches())
        thr_blocks = build(model, stages, micro)
        runner = ThreadRunner(list(thr_blocks.values()), micro, timeout_s=120)
        try:
            runner.train_segment(batches())
            got_eval = runner.evaluate(eval_batches())
        finally:
            runner.close()
    finally:
        torch.set_num_threads(threads)
    want_eval = evaluate_blocks(list(seq_blocks.values()), eval_batches())
    for k in range(stages):
        assert_same(weights(seq_blocks[k]), want[k], f"sequential stage {k}")
        assert_same(weights(thr_blocks[k]), want[k], f"threads stage {k}")
    assert got_eval.loss == pytest.approx(want_eval.loss, rel=1e-6)
    assert got_eval.aux_loss == pytest.approx(want_eval.aux_loss, rel=1e-6)


def test_processes_runtime_trains_and_evaluates_on_changing_lengths(torchrun2: Family) -> None:
    """Over gloo links (shape guess wrong at every step, the header's shape wins) K = 2 stages train the sequential
    weights exactly and evaluate batches of other lengths as the sequential runtime does."""
    torchrun2.ok("varlen_runtime")
    tmp_path = torchrun2.root / "varlen_runtime"
    want = reference("gpt2", 2, 2, as_steps(batches(), 2))
    for k in range(2):
        assert_same(load_file(str(tmp_path / f"stage{k}.safetensors")), want[k], f"processes stage {k}")
    blocks = build("gpt2", 2, 2)
    train_sequential(blocks, as_steps(batches(), 2))
    want_eval = evaluate_blocks(list(blocks.values()), eval_batches())
    got_eval = json.loads((tmp_path / "eval.json").read_text())
    assert got_eval["loss"] == pytest.approx(want_eval.loss, rel=1e-6)
    assert got_eval["aux_loss"] == pytest.approx(want_eval.aux_loss, rel=1e-6)


def test_schedule_ppll_trains_on_changing_lengths_and_micro_batches_of_different_lengths(torchrun2: Family) -> None:
    """SchedulePPLL (Llama, rotary positions, "lm-blocks" heads): whole batches of a new length every step, then
    steps given as arg_mbs / target_mbs whose two micro-batches differ in length; the sequential weights exactly."""
    torchrun2.ok("varlen_schedule")
    tmp_path = torchrun2.root / "varlen_schedule"
    want = reference("llama", 2, 2, as_steps(batches(), 2) + micro_steps())
    for k in range(2):
        assert_same(load_file(str(tmp_path / f"stage{k}.safetensors")), want[k], f"SchedulePPLL stage {k}")


@pytest.mark.usefixtures("deepspeed_cpu_ops")
def test_deepspeed_adapter_trains_on_micro_batches_of_changing_lengths(deepspeed2: Family) -> None:
    """LocalPipelineModule under the deepspeed launcher: the first stage loads micro-batches of different lengths
    (within a step and across steps), the second receives them whole; both stages end with the sequential weights
    (to DeepSpeed's optimizer's rounding). (The family's launch checks that no shared-memory buffer is left.)"""
    res = deepspeed2["varlen_deepspeed"]
    tmp_path = deepspeed2.root / "varlen_deepspeed"
    assert "lengths [32, 17]" in res.stdout and "lengths [5, 64]" in res.stdout, res.stdout[-2000:]
    blocks = build("gpt2", 2, 2)
    train_sequential(blocks, micro_steps() + as_steps(batches(), 2))
    start = 0
    for k, block in sorted(blocks.items()):
        got = load_file(str(tmp_path / f"rank{k}.safetensors"))
        want = {f"{start + int(n.split('.')[1])}.{n.split('.', 2)[2]}": t for n, t in weights(block).items()
                if n.startswith("body.")}
        want.update({f"aux_head.{n[4:]}": t for n, t in weights(block).items() if n.startswith("aux.")})
        assert got.keys() == want.keys(), (k, sorted(got)[:5], sorted(want)[:5])
        for name, t in want.items():
            assert torch.allclose(got[name], t, atol=1e-5, rtol=0), (k, name, (got[name] - t).abs().max())
        start += len(block.body)
