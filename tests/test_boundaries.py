"""Several tensors per stage boundary: payloads, the wire, and every engine equal to sequential local learning.

A Llama whose boundary carries (hidden states, attention mask, position ids) and a CNN whose boundary carries
{features, skip map, int64 index} (tests/boundary_cases.py), cut into K = 2 and 3, train bit for bit like
sequential local learning under threads (in process), processes and SchedulePPLL (one torchrun launch per K) and
the DeepSpeed adapter (one deepspeed launch per K).
"""

from __future__ import annotations

import sys
from pathlib import Path

import boundary_cases as cases
import pytest
import torch
from procs import Launch, deepspeed_launch, env
from safetensors.torch import load_file
from torch import nn

from ppll_ext.core import payload
from ppll_ext.errors import PipelineError
from ppll_ext.runtime import ThreadRunner
from ppll_ext.transport import Kind, Msg, encode_header

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist" / "boundary_worker.py"
KS = (2, 3)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), (what, sorted(got.keys() ^ want.keys()))
    for key, value in want.items():
        assert torch.equal(got[key], value), (what, key, (got[key].float() - value.float()).abs().max())


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both models trained by every multi-process engine at K = 2 and 3 (four launches, run once)."""
    out = tmp_path_factory.mktemp("boundaries")
    for k in KS:
        run = Launch([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
                      str(WORKER), str(out), str(k)], env(), timeout=300)
        assert run.finish() == 0, run.stderr[-4000:]
        ds = deepspeed_launch(k, WORKER, str(out), str(k), "--deepspeed", timeout=300)
        assert ds.finish() == 0, ds.stderr[-4000:]
    return out


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", ["llama", "cnn"])
@pytest.mark.parametrize("engine", ["processes", "schedule", "deepspeed"])
def test_multi_process_engines_equal_sequential(launched: Path, engine: str, name: str, k: int) -> None:
    want = cases.reference(name, k)
    for s in range(k):
        got = load_file(str(launched / f"{engine}-{name}-K{k}-stage{s}.safetensors"))
        assert_same(got, want[s], f"{engine} {name} K={k} stage {s}")


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", ["llama", "cnn"])
def test_threads_equal_sequential(name: str, k: int) -> None:
    blocks = cases.blocks(name, k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = ThreadRunner(blocks, cases.MICRO)
    try:
        runner.train_segment(cases.build(name).batches)
    finally:
        runner.close()
        torch.set_num_threads(threads)
    want = cases.reference(name, k)
    untrained = cases.stage_tensors(name, k, cases.blocks(name, k)[0])
    assert any(not torch.equal(t, untrained[n]) for n, t in want[0].items()), "the reference did not train"
    for s, block in enumerate(blocks):
        assert_same(cases.stage_tensors(name, k, block), want[s], f"threads {name} K={k} stage {s}")


def test_payload_travels_as_the_unsplit_model_passes_it() -> None:
    seen: list[tuple] = []

    class Takes(nn.Module):
        def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
            seen.append((len(args), sorted(kwargs)))
            return torch.zeros(1)

    h = torch.ones(2, 3, requires_grad=True) * 2
    mask = torch.ones(2, dtype=torch.bool)
    payload.call(Takes(), (h, mask))
    payload.call(Takes(), {"h": h, "mask": mask})
    payload.call(Takes(), [h, mask], spread=False)
    assert seen == [(2, []), (0, ["h", "mask"]), (1, [])]
    out = payload.detach({"h": h, "mask": mask, "index": torch.arange(2)})
    assert not out["h"].requires_grad and out["mask"].dtype == torch.bool and out["index"].dtype == torch.int64
    assert payload.describe((h, mask)) == "(2, 3) float32 + (2,) bool"


@pytest.mark.parametrize(("output", "message"), [
    ((torch.zeros(1), 3), "entry 1 of a stage output tuple is a int; every entry must be a tensor"),
    ({"h": torch.zeros(1), 1: torch.zeros(1)}, "a stage output dict has the key 1; keys must be strings"),
    ((), "a stage output is an empty tuple"),
    ("text", "a stage output is a str; a stage hands on a tensor or a tuple, list or dict of tensors"),
])
def test_bad_stage_outputs_are_one_line(output: object, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        payload.flatten(output)
    with pytest.raises(PipelineError, match=message):
        encode_header(Msg(Kind.TRAIN, output, torch.zeros(1)))


def test_too_many_tensors_or_long_keys_are_refused_before_sending() -> None:
    with pytest.raises(PipelineError, match="a stage output of 9 tensors cannot be sent .at most 8."):
        encode_header(Msg(Kind.TRAIN, tuple(torch.zeros(1) for _ in range(9)), torch.zeros(1)))
    with pytest.raises(PipelineError, match="at most 256 fit in a message header"):
        encode_header(Msg(Kind.TRAIN, {"k" * 300: torch.zeros(1)}, torch.zeros(1)))


def test_a_stage_body_returning_several_tensors_trains_through_its_aux_head() -> None:
    """The aux head is called with the boundary's tensors as the next stage's body is (a dict as keywords)."""
    block = cases.blocks("cnn", 2)[0]
    x, y = cases.build("cnn").batches[0]
    before = {n: p.clone() for n, p in block.named_parameters()}
    out, loss = block.train_step(x, y)
    assert set(out) == {"features", "skip", "index"} and not out["features"].requires_grad
    assert torch.isfinite(loss)
    changed = {n for n, p in block.named_parameters() if not torch.equal(before[n], p)}
    assert {"body.0.conv.weight", "body.1.conv.weight", "aux.fc.weight"} <= changed, changed


def test_aux_kinds_built_from_shapes_refuse_a_boundary_of_several_tensors() -> None:
    from ppll_ext.core import build_stage_aux_head
    from ppll_ext.errors import ConfigError

    case = cases.build("cnn")
    with pytest.raises(ConfigError, match=r"aux head kind 'conv' is built for a stage boundary of one tensor, and this "
                       r"one carries features \(1, 8, 8, 8\) float32 \+ skip .* build the aux heads yourself"):
        build_stage_aux_head(case.layers, 0, [0, 2, 4], "conv", case.batches[0][0][:1])
