"""ppll_ext.memory: the saved-tensor meter against hand-computed bytes, state bytes, activation checkpointing (same
training, fewer saved bytes) and the benchmark workers' per-stage figures (PPLL below 1F1B's first stage)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from ppll_ext.build import build_blocks, build_layered
from ppll_ext.config import load_config
from ppll_ext.core.recompute import CheckpointedSequential
from ppll_ext.memory import (
    SavedTensorMeter,
    StageMemory,
    StateWatch,
    state_bytes,
)
from ppll_ext.runtime import SequentialRunner

F32 = 4


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_meter_counts_what_autograd_saves_and_releases_it_after_backward() -> None:
    net, n = _mlp(), 10
    meter = SavedTensorMeter(net)
    x = torch.randn(n, 8)
    with meter:
        out = net(x)
        # addmm saves its input x (not W.t(): x needs no gradient); relu saves its output, which the second addmm
        # saves again (one storage, counted once); W2.t() is a parameter view, not counted.
        assert meter.live == F32 * n * (8 + 16)
        loss = out.pow(2).sum()  # pow saves its input
    assert meter.live == meter.peak == F32 * n * (8 + 16 + 4)
    loss.backward()
    assert meter.live == 0 and meter.peak == F32 * n * (8 + 16 + 4)
    with meter:
        loss = net(x).sum()
    del loss  # a graph dropped without backward frees its saves too
    assert meter.live == 0


def test_parameters_and_their_views_are_not_counted_unless_the_meter_is_not_told() -> None:
    net, n = _mlp(), 3
    x = torch.randn(n, 8, requires_grad=True)  # now addmm also saves W1.t(), a view of a parameter
    told, blind = SavedTensorMeter(net), SavedTensorMeter()
    for meter in (told, blind):
        with meter:
            net(x).sum().backward()
    w1, w2 = (F32 * m.weight.numel() for m in (net[0], net[2]))
    # The second addmm saves W2.t() only if its input needs a gradient: it does (x requires grad).
    assert blind.peak - told.peak == w1 + w2


def test_a_storage_saved_through_several_views_counts_once() -> None:
    meter = SavedTensorMeter()
    base = torch.randn(6, 5, requires_grad=True)
    with meter:
        a, b = base[:3], base[3:]  # two views of base's storage, each saved by mul
        loss = (a * b).sum() + (base * base).sum()
    assert meter.live == F32 * base.numel()
    loss.backward()
    assert meter.live == 0


def test_each_thread_counts_in_its_own_meter() -> None:
    meters = [SavedTensorMeter(), SavedTensorMeter()]
    sizes = [(4, 4), (8, 16)]
    graphs = []

    def work(k: int) -> None:
        with meters[k]:
            t = torch.randn(*sizes[k], requires_grad=True)
            graphs.append((t * t).sum())

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [m.live for m in meters] == [F32 * 16, F32 * 128]
    graphs.clear()
    assert [m.live for m in meters] == [0, 0]


def test_state_bytes_and_watch_see_grads_and_optimizer_state() -> None:
    net = _mlp()
    params = sum(p.numel() for p in net.parameters()) * F32
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    watch = StateWatch(net, opt)
    assert state_bytes(net, opt) == {"parameters": params, "gradients": 0, "optimizer": 0}
    net(torch.randn(2, 8)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert state_bytes(net, opt) == {"parameters": params, "gradients": 0, "optimizer": params}
    assert watch.peak == {"parameters": params, "gradients": params, "optimizer": params}
    watch.remove()
    memory = StageMemory(10, 20, 30, 40, 50)
    assert memory.total == 150 and memory.to_dict()["total"] == 150 and memory.to_dict()["cuda_peak"] is None


def _tiny_resnet_run(checkpoint: bool) -> tuple[list[float], dict[str, torch.Tensor], list[int]]:
    """Three steps of sequential local learning (K = 2, M = 2) of a small ResNet; losses, final state, saved
    peak per block."""
    cfg = load_config(None, ["model.name=resnet8", "model.width=8", "local.aux=conv", "local.stages=2",
                             "local.micro_batches=2", "local.runtime=sequential", "train.batch_size=8",
                             f"local.checkpoint_activations={str(checkpoint).lower()}"])
    torch.manual_seed(0)
    layered = build_layered(cfg, num_classes=10, in_channels=3, image_size=16)
    example = torch.randn(2, 3, 16, 16)
    _, blocks = build_blocks(cfg, layered, example, total_steps=3, boundaries=[0, 2, len(layered.layers)])
    ordered = [blocks[k] for k in sorted(blocks)]
    meters = [SavedTensorMeter(b) for b in ordered]
    for block, meter in zip(ordered, meters, strict=True):
        block.train_step = meter.wrap(block.train_step)
    runner = SequentialRunner(ordered, 2)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]
    stats = runner.train_segment(data)
    losses = [loss for st in stats.stages for loss in st.step_loss]  # each stage's loss per step
    state = {f"{k}.{n}": t.detach().clone() for k, b in enumerate(ordered) for n, t in b.state_dict().items()}
    return losses, state, [m.peak for m in meters]


def test_checkpoint_activations_trains_the_same_with_fewer_saved_bytes() -> None:
    plain_losses, plain, plain_peak = _tiny_resnet_run(False)
    ckpt_losses, ckpt, ckpt_peak = _tiny_resnet_run(True)
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7)
    assert plain.keys() == ckpt.keys()  # the same modules and names (CheckpointedSequential is an nn.Sequential)
    for name, t in plain.items():  # weights, aux heads and BatchNorm statistics (updated once, not twice)
        torch.testing.assert_close(ckpt[name], t, rtol=1e-5, atol=1e-6, msg=name)
    assert all(c < p for c, p in zip(ckpt_peak, plain_peak, strict=True)), (ckpt_peak, plain_peak)


def test_checkpointed_sequential_is_plain_without_gradients() -> None:
    net = _mlp()
    twin = CheckpointedSequential(*copy.deepcopy(net))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(net(x), twin(x))


def test_ppll_processes_stage_saves_less_than_1f1b_first_stage() -> None:
    """Real runs of the benchmark workers (2 processes each, a small ResNet, M = 4): every PPLL stage's saved peak
    is below 1F1B's first stage, and every figure is reported per stage."""
    from ppll_ext.bench.driver import Work, command, run_workers

    work = Work("resnet8", 2, 16, "0,3", 4, 1, 2)
    ppll, f1b = (r["memory"] for r in run_workers(  # both at once: mostly start-up time
        command("processes", work, memory=True), command("1f1b", work, memory=True), what="memory workers"))
    assert [s["stage"] for s in ppll] == [s["stage"] for s in f1b] == [0, 1]
    for s in ppll + f1b:
        assert s["saved_peak"] > 0 and s["parameters"] > 0 and s["gradients"] == s["parameters"]
        assert s["total"] == sum(s[k] for k in ("saved_peak", "parameters", "gradients", "optimizer", "buffers"))
        assert s["saved_live_end"] == 0  # every graph was freed (also torch's shape-inference forward)
    assert ppll[0]["buffers"] > 0 and ppll[1]["buffers"] > 0  # in-flight sends and the posted receive
    # 1F1B's first stage holds up to K micro-batches, PPLL's largest stage one (with its aux head's saves).
    assert max(s["saved_peak"] for s in ppll) < f1b[0]["saved_peak"]
