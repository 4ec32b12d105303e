"""Local-learning core: aux heads, partitioning, the local block, and LL(K=1) == backprop."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
from torch import nn

from ppll_ext.build import build_blocks, build_bp_block, build_layered
from ppll_ext.config import ModelConfig, load_config
from ppll_ext.core import LocalBlock, build_aux_head, build_stage_aux_head, partition
from ppll_ext.core.partition import (
    balanced_boundaries,
    choose_split,
    near_splits,
    parameter_counts,
    partition_plan,
    plan_from_costs,
    preferred,
    refine_plan,
)
from ppll_ext.core.profile import LayerCosts, Timing, profile_costs
from ppll_ext.data import BatchLoader, load_dataset
from ppll_ext.errors import ConfigError, PipelineError
from ppll_ext.models import build_model
from ppll_ext.runtime import SequentialRunner, StageStats


def _resnet(name: str = "resnet32"):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name), in_channels=3, image_size=32, num_classes=10)


def _vit():
    torch.manual_seed(0)
    cfg = ModelConfig(name="vit", depth=3, hidden_dim=32, heads=2, mlp_dim=64)
    return build_model(cfg, in_channels=3, image_size=32, num_classes=10)


@pytest.mark.parametrize("kind", ["conv", "mlp-sr", "vit", "next-blocks"])
@pytest.mark.parametrize("model", ["resnet", "vit"])
def test_aux_head_shapes(kind: str, model: str) -> None:
    layered = _resnet() if model == "resnet" else _vit()
    x = torch.randn(4, 3, 32, 32)
    for cut in (1, len(layered.layers) // 2, len(layered.layers) - 2):
        with torch.no_grad():
            h = layered.sequential(0, cut)(x)
        head = build_aux_head(kind, h, 10, hidden=64, next_layers=layered.layers[cut:cut + 1],
                              final_head=layered.layers[-1], grid=model == "vit")
        out = head(h)
        assert out.shape == (4, 10), (kind, model, cut, tuple(h.shape))
        out.sum().backward()
        assert all(p.grad is not None for p in head.parameters())


def test_next_blocks_head_is_a_fresh_copy() -> None:
    layered = _resnet("resnet8")
    h = layered.sequential(0, 2)(torch.randn(2, 3, 32, 32)).detach()
    head = build_aux_head("next-blocks", h, 10, next_layers=layered.layers[2:3], final_head=layered.layers[-1])
    original = {id(p) for p in layered.model.parameters()}
    assert not any(id(p) in original for p in head.parameters())


def test_unknown_aux_kind() -> None:
    with pytest.raises(ConfigError, match="aux head kind 'nope' is not one of conv, .*auto") as err:
        build_aux_head("nope", torch.randn(2, 16, 8, 8), 10)
    assert err.value.key == "aux"


def test_auto_aux_head_fits_the_activation() -> None:
    conv = build_aux_head("auto", torch.randn(2, 16, 8, 8), 10)
    tokens = build_aux_head("auto", torch.randn(2, 5, 12), 10)
    flat = build_aux_head("auto", torch.randn(2, 12), 10)
    assert isinstance(conv[1], torch.nn.Conv2d) and isinstance(tokens[0], torch.nn.LayerNorm)
    assert isinstance(flat, torch.nn.Linear)
    for head, x in ((conv, torch.randn(3, 16, 8, 8)), (tokens, torch.randn(3, 5, 12)), (flat, torch.randn(3, 12))):
        assert head.eval()(x).shape == (3, 10)


def test_token_heads_keep_tokens_and_pooling_heads_refuse_to_guess_a_grid() -> None:
    h = torch.randn(3, 7, 12)
    lm = build_aux_head("lm", h, 50)
    assert lm(h).shape == (3, 7, 50)
    block = torch.nn.TransformerEncoderLayer(12, 2, 24, dropout=0.0, batch_first=True)
    deep = build_aux_head("lm-blocks", h, 50, next_layers=[block])
    assert deep(h).shape == (3, 7, 50) and not {id(p) for p in block.parameters()} & {id(p) for p in deep.parameters()}
    for kind in ("conv", "mlp-sr"):
        for t in (64, 50, 7):  # a square grid, a square grid after a class token, neither: never read silently
            with pytest.raises(ConfigError, match="pools a feature map") as err:
                build_aux_head(kind, torch.randn(2, t, 12), 10)
            assert err.value.key == "aux"
        assert build_aux_head(kind, torch.randn(2, 65, 12), 10, grid=True)(torch.randn(2, 65, 12)).shape == (2, 10)
        with pytest.raises(ConfigError, match="cannot lay 7 tokens out as a square grid"):
            build_aux_head(kind, h, 10, grid=True)
    with pytest.raises(ConfigError, match="maps \\(N, T, D\\) tokens"):
        build_aux_head("lm", torch.randn(2, 12), 10)


def test_stage_aux_head_auto_is_per_token_for_a_language_model() -> None:
    torch.manual_seed(0)
    layers = [torch.nn.Embedding(30, 16), torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
              torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), torch.nn.Linear(16, 30)]
    tokens = torch.randint(0, 30, (2, 9))
    for kind in ("auto", "lm", "lm-blocks"):
        head = build_stage_aux_head(layers, 0, [0, 2, 4], kind, tokens)
        assert head(layers[1](layers[0](tokens))).shape == (2, 9, 30), kind
    assert isinstance(build_stage_aux_head(layers, 0, [0, 2, 4], "auto", tokens)[0], torch.nn.LayerNorm)


def test_partition_methods() -> None:
    layers = _resnet("resnet110").layers
    assert len(layers) == 56
    for method in ("uniform", "parameters"):
        b = partition(layers, 4, method)
        assert b[0] == 0 and b[-1] == 56 and len(b) == 5 and all(x < y for x, y in zip(b, b[1:]))
    assert partition(layers, 4, "uniform") == [0, 14, 28, 42, 56]
    assert partition(layers, 3, "0,10,30") == [0, 10, 30, 56]


def test_parameter_partition_balance_resnet110_k4() -> None:
    layers = _resnet("resnet110").layers
    counts = parameter_counts(layers)
    b = partition(layers, 4, "parameters")
    blocks = [sum(counts[b[i]:b[i + 1]]) for i in range(4)]
    ideal = sum(counts) / 4
    assert max(blocks) <= 1.5 * ideal, (blocks, ideal)


def test_profile_partition_counts_aux_cost(one_thread: None) -> None:
    layered = _resnet("resnet8")
    x = torch.randn(8, 3, 32, 32)
    b = partition(layered.layers, 2, "profile", example=x,
                  aux_factory=lambda h: build_aux_head("conv", h, 10))
    assert len(b) == 3 and b[0] == 0 and b[-1] == len(layered.layers) and 0 < b[1] < b[2]


@pytest.mark.parametrize("k, spec", [(0, "uniform"), (99, "parameters"), (2, "0,5,9"), (3, "1,5,9"),
                                     (3, "0,9,5"), (2, "a,b")])
def test_bad_partition(k: int, spec: str) -> None:
    with pytest.raises(ConfigError):
        partition(_resnet("resnet8").layers, k, spec)


def test_micro_batch_accumulation_equals_full_batch() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    aux = nn.Linear(8, 3)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    full = LocalBlock(body, aux, nn.CrossEntropyLoss())
    twin = LocalBlock(copy.deepcopy(body), copy.deepcopy(aux), nn.CrossEntropyLoss())
    for blk in (full, twin):
        blk.optimizer = torch.optim.SGD(blk.parameters(), lr=0.5)
    full.train_step(x, y, n_micro=1)
    sent = []
    for xm, ym in zip(x.chunk(3), y.chunk(3)):
        out, _ = twin.train_step(xm, ym, n_micro=3, on_output=sent.append)
        assert out.requires_grad is False
    assert twin.steps == 1 and full.steps == 1
    assert len(sent) == 3
    for a, b in zip(full.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_nan_loss_names_stage_and_step() -> None:
    blk = LocalBlock(nn.Linear(2, 2), None, nn.CrossEntropyLoss(), index=3)
    blk.optimizer = torch.optim.SGD(blk.parameters(), lr=0.1)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    blk.train_step(x, y)
    with pytest.raises(PipelineError, match="^stage 3: loss is nan at step 1; "):
        blk.train_step(torch.full_like(x, math.nan), y)


def _train(cfg, blocks, steps: int) -> None:
    ds = load_dataset(cfg.data, "train")
    loader = BatchLoader(ds, cfg.train.batch_size, shuffle=True, augment=True, seed=cfg.train.seed)
    runner = SequentialRunner(blocks, cfg.local.micro_batches)
    stats = [StageStats(b.index) for b in blocks]
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        runner.train_batch(x, y, stats)


def test_local_learning_k1_equals_backprop_exactly() -> None:
    cfg = load_config(None, ["local.stages=1", "train.batch_size=32"])
    ds = load_dataset(cfg.data, "test")
    example = torch.zeros(2, ds.in_channels, ds.image_size, ds.image_size)
    ll_model = build_layered(cfg, in_channels=1, image_size=8, num_classes=10)
    _, blocks = build_blocks(cfg, ll_model, example, total_steps=100)
    bp_model = build_layered(cfg, in_channels=1, image_size=8, num_classes=10)
    bp = build_bp_block(cfg, bp_model, total_steps=100)
    _train(cfg, [blocks[0]], 5)
    _train(cfg, [bp], 5)
    ll_state, bp_state = ll_model.model.state_dict(), bp_model.model.state_dict()
    assert ll_state.keys() == bp_state.keys()
    for k in ll_state:
        assert torch.equal(ll_state[k], bp_state[k]), k
    init = build_layered(cfg, in_channels=1, image_size=8, num_classes=10).model.state_dict()
    changed = sum(not torch.equal(init[k], bp_state[k]) for k in init)
    assert changed > len(init) // 2


def test_sequential_local_learning_lowers_every_stage_loss() -> None:
    cfg = load_config(None, ["local.stages=3", "train.batch_size=32", "optim.lr=0.05"])
    layered = build_layered(cfg, in_channels=1, image_size=8, num_classes=10)
    _, by_index = build_blocks(cfg, layered, torch.zeros(2, 1, 8, 8), total_steps=1000)
    blocks = [by_index[i] for i in range(3)]
    ds = load_dataset(cfg.data, "train")
    loader = BatchLoader(ds, 32, shuffle=True, augment=False, seed=0)
    runner = SequentialRunner(blocks)
    first = runner.train_segment(loader)
    loader.set_epoch(1)
    second = runner.train_segment(loader)
    for a, b in zip(first.stages, second.stages):
        assert b.mean_loss < a.mean_loss
    assert all(s.steps == 2 * len(loader) for s in second.stages)


FAST = Timing(warmup=1, min_rounds=3, budget_s=0.05)
"""Short timings for tests: the splits checked below do not hinge on a few percent."""


@pytest.fixture
def one_thread():
    """Time on one torch thread, as a stage does (train.threads=0): several threads on a busy machine are slow."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


def test_profile_refinement_keeps_valid_boundaries(one_thread: None) -> None:
    layered = _resnet("resnet20")
    x = torch.randn(8, 3, 32, 32)
    aux = lambda h: build_aux_head("conv", h, 10)  # noqa: E731
    costs = profile_costs(layered.layers, x, aux, FAST)
    cands = [[0, 1, 11], [0, 5, 11], [0, 9, 11]]
    plan = refine_plan(layered.layers, cands, x, costs, FAST)
    assert plan.boundaries in cands and plan.method == "profile"
    assert plan.stages is not None and len(plan.stages) == 2
    assert plan.stages[-1].aux_s == 0 and plan.stages[-1].send_s == 0
    assert plan.stages[0].aux_s == costs.aux_s[plan.boundaries[1]] > 0 and plan.stages[0].send_s > 0
    assert refine_plan(layered.layers, [[0, 4, 9, 11]], x, costs, FAST).boundaries == [0, 4, 9, 11]


def test_near_splits_are_the_choice_then_the_fastest_within_the_window() -> None:
    costs = [10.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    # K=2: 30|30 (best), then 20|40 and 40|20 (33 % slower), then 10|50, 50|10.
    assert near_splits(costs, 2, window=0.0) == [[0, 3, 6]]
    assert near_splits(costs, 2, window=0.4) == [[0, 3, 6], [0, 2, 6], [0, 4, 6]]
    assert near_splits(costs, 2, window=1.0, limit=4) == [[0, 3, 6], [0, 2, 6], [0, 4, 6], [0, 1, 6]]
    extra = [0.0, 0.0, 30.0, 0.0, 0.0]
    assert near_splits([34.0, 34.0, 2.0, 100.0], 2, extra, window=0.1) == [[0, 2, 4], [0, 3, 4]]


def _splits(n: int, k: int):
    for cut in itertools.combinations(range(1, n), k - 1):
        yield [0, *cut, n]


def test_choose_split_is_the_preferred_of_all_splits() -> None:
    """The pruned search returns exactly what `preferred` picks among every split (integer costs: exact sums, many
    ties, so the order's later keys matter too)."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        k = rng.randint(1, min(4, n))
        costs = [float(rng.randint(1, 20)) for _ in range(n)]
        extra = [float(rng.randint(0, 6)) for _ in range(n + 1)]
        tol = rng.choice([0.0, 0.03, 0.1, 0.5])
        every = list(_splits(n, k))
        stage = [[sum(costs[b[s]:b[s + 1]]) + (extra[b[s + 1]] if b[s + 1] < n else 0) for s in range(k)]
                 for b in every]
        expected = every[preferred(list(zip(every, stage)), tol)]
        assert choose_split(costs, k, extra, tol) == expected, (costs, extra, k, tol)


def test_tie_break_prefers_the_even_split_within_tolerance() -> None:
    costs, extra = [34.0, 34.0, 2.0, 100.0], [0.0, 0.0, 30.0, 0.0, 0.0]
    # [0,3,4]: stages 70, 100 (fastest, uneven); [0,2,4]: 98, 102 (2 % slower, even); [0,1,4]: 34, 136.
    assert balanced_boundaries(costs, 2, extra) == [0, 3, 4]
    assert choose_split(costs, 2, extra, tolerance=0.03) == [0, 2, 4]
    assert choose_split(costs, 2, extra, tolerance=0.01) == [0, 3, 4]
    # Equally even: the faster; equal in both: the lower boundaries.
    assert preferred([([0, 1, 3], [10.0, 10.0]), ([0, 2, 3], [9.0, 9.0])]) == 1
    assert preferred([([0, 2, 3], [9.0, 9.0]), ([0, 1, 3], [9.0, 9.0])]) == 1


def test_noise_of_one_percent_does_not_flip_the_split() -> None:
    """Two splits 0.5 % apart in bottleneck, one clearly more even: with every cost off by up to 1 % (seeded), the
    tolerant choice never changes, while the plain fastest-split choice flips between them."""
    layers, extra = [82.0, 4.5, 93.0], [0.0, 7.0, 10.5, 0.0]
    # [0,2,3]: 97, 93 (spread 4); [0,1,3]: 89, 97.5 (spread 8.5).
    rng = random.Random(1)
    tolerant, fastest = set(), set()
    for _ in range(200):
        noisy = LayerCosts([c * rng.uniform(0.99, 1.01) for c in layers],
                           [c * rng.uniform(0.99, 1.01) for c in extra], [0.0] * 4)
        tolerant.add(tuple(plan_from_costs(noisy, 2).boundaries))
        fastest.add(tuple(plan_from_costs(noisy, 2, tolerance=0.0).boundaries))
    assert tolerant == {(0, 2, 3)}
    assert fastest == {(0, 2, 3), (0, 1, 3)}


def test_plan_from_costs_predicts_body_aux_send() -> None:
    costs = LayerCosts([1.0, 2.0, 3.0, 4.0], [0.0, 0.5, 0.25, 0.5, 0.0], [0.0, 0.1, 0.1, 0.1, 0.0])
    plan = plan_from_costs(costs, 2)
    assert plan.boundaries == [0, 3, 4] and plan.starts == "0,3"
    assert [(s.body_s, s.aux_s, s.send_s) for s in plan.stages] == [(6.0, 0.5, 0.1), (4.0, 0.0, 0.0)]
    assert plan.bottleneck_s == pytest.approx(6.6) and plan.shares() == pytest.approx([1.0, 4.0 / 6.6])
    assert plan.to_dict()["stages"][1]["total_s"] == 4.0


def _mlp(widths: list[int]) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(w_in, w_out), nn.BatchNorm1d(w_out), nn.ReLU())
            for w_in, w_out in zip(widths, widths[1:])]


def test_real_profile_twice_gives_the_same_split_and_leaves_no_trace(one_thread: None) -> None:
    """Two wide layers, then narrow ones: K=2 must cut between the wide ones (one wide layer per stage, against two
    in one stage for any other cut), every time; profiling restores BatchNorm statistics, leaves no gradients and
    draws no random numbers from the caller's stream."""
    layers = _mlp([512, 512, 512, 16, 16, 16, 16])  # a wide layer: ~5 ms, far above the ~0.2 ms of a narrow one
    x = torch.randn(128, 512)
    before = [copy.deepcopy(m.state_dict()) for m in layers]
    rng = torch.get_rng_state()
    plans = [partition_plan(layers, 2, "profile", example=x, aux_factory=lambda h: nn.Linear(h.shape[-1], 10),
                            timing=FAST) for _ in range(2)]
    assert [p.boundaries for p in plans] == [[0, 1, 6], [0, 1, 6]]
    assert torch.equal(torch.get_rng_state(), rng)
    for m, state in zip(layers, before):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
        assert all(p.grad is None for p in m.parameters())


def test_non_profile_plans_are_timed_only_when_asked(one_thread: None) -> None:
    layered = _resnet("resnet8")
    x = torch.randn(8, 3, 32, 32)
    plain = partition_plan(layered.layers, 2, "uniform")
    assert plain.stages is None and plain.bottleneck_s is None and plain.shares() is None
    assert plain.boundaries == partition(layered.layers, 2, "uniform")
    timed = partition_plan(layered.layers, 2, "0,2", example=x, aux_factory=lambda h: build_aux_head("conv", h, 10),
                           timed=True, timing=FAST)
    assert timed.boundaries == [0, 2, 5] and len(timed.stages) == 2
    assert timed.stages[0].aux_s > 0 and timed.stages[1].aux_s == timed.stages[1].send_s == 0
    assert max(timed.shares()) == 1.0
    with pytest.raises(ConfigError, match="example input batch"):
        partition_plan(layered.layers, 2, "uniform", timed=True)
