"""The example pairs under examples/: each stock script and its PPLL twin differ exactly by the lines the diff on
its docs page shows (docs/deepspeed.md, docs/torchtitan.md), and each runs under its own launcher (deepspeed,
torchrun) with falling losses."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXAMPLES = REPO / "examples"
MEGATRON = EXAMPLES / "megatron_gpt"
TITAN = EXAMPLES / "torchtitan_llama"
sys.path.insert(0, str(REPO / "tests"))
from procs import Family, deepspeed_cmd, family, free_port, torchrun_cmd  # noqa: E402

# docs page and its section holding the pair's diff -> (stock script, PPLL twin)
PAIRS = {("deepspeed.md", "A Megatron-DeepSpeed script"): (MEGATRON / "pretrain_gpt_stock.py",
                                                          MEGATRON / "pretrain_gpt_ppll.py"),
         ("torchtitan.md", "A torchtitan trainer"): (TITAN / "train_stock.py", TITAN / "train_ppll.py")}


def docs_diff(page: str, section: str) -> tuple[list[str], list[str]]:
    """(removed, added) lines of the ```diff block in section `section` of docs/`page` (stripped, blank lines left
    out)."""
    text = (DOCS / page).read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/{page} has no section '## {section}'"
    blocks = re.findall(r"```diff\n(.*?)```", match.group(1), re.S)
    assert len(blocks) == 1, f"docs/{page} section {section!r} needs exactly one diff block, has {len(blocks)}"
    lines = blocks[0].splitlines()
    return ([line[1:].strip() for line in lines if line.startswith("-") and line[1:].strip()],
            [line[1:].strip() for line in lines if line.startswith("+") and line[1:].strip()])


def file_diff(stock: Path, ppll: Path) -> tuple[list[str], list[str]]:
    """(removed, added) lines of the unified diff of the two scripts below their module docstrings (stripped, blank
    lines left out)."""
    old, new = (p.read_text().split('"""', 2)[2].splitlines() for p in (stock, ppll))
    diff = [line for line in difflib.unified_diff(old, new, lineterm="", n=0)
            if not line.startswith(("---", "+++", "@@"))]
    return ([line[1:].strip() for line in diff if line.startswith("-") and line[1:].strip()],
            [line[1:].strip() for line in diff if line.startswith("+") and line[1:].strip()])


@pytest.mark.parametrize(("page", "section"), sorted(PAIRS))
def test_pair_differs_only_where_the_docs_say(page: str, section: str) -> None:
    """The docs page's diff is the whole difference (docstrings aside), line for line and in order."""
    stock, ppll = PAIRS[page, section]
    removed, added = file_diff(stock, ppll)
    want_removed, want_added = docs_diff(page, section)
    assert removed == want_removed, f"{ppll.name} removes other lines than the diff in docs/{page} shows"
    assert added == want_added, f"{ppll.name} adds other lines than the diff in docs/{page} shows"
    assert removed and added


def _falls(losses: list[float], steps: int) -> None:
    assert len(losses) == steps, losses
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert tail < head - 0.5, losses


def example(script: Path, *args: str) -> dict:
    """A case of a family launch: an example script with its arguments."""
    return {"name": script.stem, "script": str(script), "args": list(args)}


@pytest.fixture(scope="module")
def megatron(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Both Megatron-style scripts, one after the other in one `deepspeed --num_gpus 2` launch (K = 2 stages), 12
    iterations each with the pair's ds_config."""
    port = free_port()
    args = ["--pipeline-model-parallel-size", "2", "--train-iters", "12", "--deepspeed", "--deepspeed_config",
            str(MEGATRON / "ds_config_zero1_bf16.json")]
    try:
        return family(deepspeed_cmd(2, port), 2, [example(MEGATRON / f"pretrain_gpt_{kind}.py", *args)
                                                   for kind in ("stock", "ppll")], tmp_path_factory.mktemp("megatron"))
    finally:
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink()  # DeepSpeed's CPU comm op leaves them; a stock script has nobody to remove them


def megatron_losses(ran: Family, script: str) -> dict[int, list[float]]:
    """Each stage's printed losses of a Megatron-style script's run."""
    out = ran[script].stdout
    losses: dict[int, list[float]] = {0: [], 1: []}
    # Not anchored to line starts: the ranks share the launcher's stdout, unbuffered, so one rank's line may follow
    # another's before its newline.
    for stage, value in re.findall(r"iteration +\d+/ *\d+ \| stage (\d) \| lm loss: (\S+) \|", out):
        losses[int(stage)].append(float(value))
    assert re.search(r"validation loss at the end of training \| stage 1 \| lm loss: \S+", out), out[-2000:]
    return losses


@pytest.mark.usefixtures("deepspeed_cpu_ops")
def test_megatron_stock_pair_runs_under_deepspeed_and_its_loss_falls(megatron: Family) -> None:
    """Stock DeepSpeed 1F1B with ZeRO-1 and bf16 (the ds_config as it is): the model's loss falls."""
    losses = megatron_losses(megatron, "pretrain_gpt_stock")
    _falls(losses[1], 12)


@pytest.mark.usefixtures("deepspeed_cpu_ops")
def test_megatron_ppll_pair_runs_under_deepspeed_and_its_losses_fall(megatron: Family) -> None:
    """The PPLL twin with the same ds_config (ZeRO-1 within each stage's replicas, bf16): the model's loss (stage 1)
    and stage 0's aux-head loss fall."""
    losses = megatron_losses(megatron, "pretrain_gpt_ppll")
    _falls(losses[1], 12)
    _falls(losses[0], 12)


@pytest.fixture(scope="module")
def torchtitan(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Both torchtitan-style trainers, one after the other in one `torchrun --nproc_per_node 2` launch, 12 steps
    each."""
    return family(torchrun_cmd(2), 2, [example(TITAN / f"train_{kind}.py", "--training.steps", "12")
                                       for kind in ("stock", "ppll")], tmp_path_factory.mktemp("torchtitan"))


def titan_losses(ran: Family, script: str) -> list[float]:
    """The last stage's printed losses of a torchtitan-style trainer's run."""
    return [float(v) for v in re.findall(r"^step: +\d+  loss: +(\S+)$", ran[script].stdout, re.M)]


def test_torchtitan_stock_pair_runs_under_torchrun_and_its_loss_falls(torchtitan: Family) -> None:
    """Schedule1F1B chosen by name ("1F1B"): the model's loss falls."""
    _falls(titan_losses(torchtitan, "train_stock"), 12)


def test_torchtitan_ppll_pair_runs_under_torchrun_and_its_loss_falls(torchtitan: Family) -> None:
    """SchedulePPLL chosen by name ("PPLL"), the first stage given the targets: the model's loss falls."""
    _falls(titan_losses(torchtitan, "train_ppll"), 12)
