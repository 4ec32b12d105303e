"""The one stage protocol: the native runtime, SchedulePPLL and LocalPipelineEngine obey the same rules and say the
same thing when they are broken (tests/dist/protocol_worker.py, one torchrun launch of all three)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from procs import Launch, env

from ppll_ext.deepspeed.engine import CALLS as DEEPSPEED_CALLS
from ppll_ext.pipelining import CALLS as SCHEDULE_CALLS
from ppll_ext.runtime.stage import NATIVE_CALLS

REPO = Path(__file__).resolve().parents[1]
CALLS = {"native": NATIVE_CALLS, "schedule": SCHEDULE_CALLS, "deepspeed": DEEPSPEED_CALLS}
MORE = ("stage 1 expected more micro-batches but stage 0 had ended: stage 1 made more <calls> calls than stage 0; "
        "every rank must make the same <calls> calls")
FEWER = ("stage 1 ended while stage 0 still sent 2 micro-batch(es), which were never trained there: stage 1 made "
         "fewer <calls> calls than stage 0; every rank must make the same <calls> calls")


@pytest.fixture(scope="module")
def raised(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, str | None]]:
    """{rank: {"<adapter> <case>": message}} from one launch of the three adapters."""
    out = tmp_path_factory.mktemp("protocol")
    run = Launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(REPO / "tests" / "dist" / "protocol_worker.py"), str(out)], env(), timeout=240)
    assert run.finish() == 0, run.stderr[-4000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def generic(adapter: str, message: str | None) -> str | None:
    """The message with the adapter's own call names replaced by <calls>."""
    return None if message is None else message.replace(CALLS[adapter], "<calls>")


@pytest.mark.parametrize("case", ["more", "fewer"])
def test_every_adapter_gives_the_same_error_for_uneven_calls(raised: dict, case: str) -> None:
    adapters = ["native", "schedule", "deepspeed"] if case == "more" else ["schedule", "deepspeed"]
    want = MORE if case == "more" else FEWER
    for rank, errors in raised.items():
        expected = want if rank == 1 else f"stage 0 stops too: {want}"
        got = {a: generic(a, errors[f"{a} {case}"]) for a in adapters}
        assert got == dict.fromkeys(adapters, expected), (rank, case, got)


def test_run_training_raises_inside_a_multi_process_run_instead_of_exiting(raised: dict) -> None:
    for errors in raised.values():
        assert "no-such-run" in errors["run_training"], errors["run_training"]


def test_the_adapters_name_their_own_calls() -> None:
    assert CALLS == {"native": "train_segment / evaluate / checkpoint / close", "schedule": "step() / eval()",
                     "deepspeed": "train_batch / eval_batch"}
