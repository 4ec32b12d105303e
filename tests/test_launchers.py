"""Every launcher a user already has runs PPLL for real: torchrun, accelerate launch, two local "nodes"."""

from __future__ import annotations

import re
import subprocess
import sys

import procs
import pytest
from procs import REPO, free_port

TINY = ["--set", "train.epochs=2", "--set", "train.progress=false", "--set", "data.train_subset=640"]


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher to completion (tests/procs.py run: on timeout every process below it is killed and the test
    fails)."""
    return procs.run(cmd, timeout=timeout, **(env or {}))


def assert_trained(res: subprocess.CompletedProcess, stages: int, runtime: str = "processes") -> None:
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [float(m.group(1)) for m in re.finditer(r"^epoch \d+/\d+ \| loss (\S+)", res.stdout, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0], res.stdout
    assert f"runtime={runtime} stages={stages}" in res.stdout
    assert re.search(r"test accuracy 0\.\d+", res.stdout)


def test_torchrun_script() -> None:
    assert_trained(run(["launch/torchrun.sh", *TINY], env={"NPROC": "2"}), 2)


def test_accelerate_launch_cpu_2proc() -> None:
    assert_trained(run(["launch/accelerate.sh", *TINY, "--set", "local.stages=2"]), 2)


@pytest.mark.usefixtures("deepspeed_cpu_ops")
def test_accelerate_launch_deepspeed_on_cpu() -> None:
    """distributed_type DEEPSPEED: ACCELERATE_USE_DEEPSPEED selects the DeepSpeed adapter, with the ds_config file
    that the Accelerate config names."""
    res = run(["launch/accelerate.sh", *TINY], env={"ACCELERATE_CONFIG": "configs/accelerate/deepspeed_cpu_2proc.yaml"})
    assert_trained(res, 2, runtime="processes (deepspeed)")


@pytest.mark.parametrize("per_node", [1, 2])
def test_multinode_localhost(per_node: int) -> None:
    assert_trained(run(["launch/multinode_localhost.sh", *TINY], env={"NPROC_PER_NODE": str(per_node)}), 2 * per_node)


def test_nodes_started_with_different_settings_stop_with_one_line_each() -> None:
    """Two torchrun "nodes" whose --set differ (model.width) would train a silently inconsistent pipeline: every
    rank stops before training with the same one-line error naming the setting and both values."""
    port = free_port()
    env = procs.env()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", f"mismatch-{port}", "-m", "ppll_ext.train", *TINY,
                               "--set", "local.stages=2", "--set", f"model.width={width}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for n, width in ((0, 8), (1, 16))]
    outcomes = [node.communicate(timeout=120) for node in nodes]
    errors = []
    for node, (out, err) in zip(nodes, outcomes, strict=True):
        assert node.returncode != 0 and "epoch 1/" not in out
        errors += [line for line in err.splitlines() if line.startswith("ppll: error:")]
    # c10d assigns the ranks, so either node may be rank 0; like every configuration error, rank 0 prints it
    widths = {"8", "16"}
    assert len(errors) == 1, outcomes
    m = re.fullmatch(r"ppll: error: rank 1 was started with model\.width=(\d+) but rank 0 with model\.width=(\d+) "
                     r"\(1 setting\(s\) differ\); start every rank with the same --config and --set options", errors[0])
    assert m and {m[1], m[2]} == widths, errors


def test_accelerate_with_wrong_process_count_is_one_line() -> None:
    res = run(["launch/accelerate.sh", *TINY, "--set", "local.stages=3"])
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("ppll: error:")]
    assert len(errors) == 1 and "started 2 processes but local.stages=3" in errors[0], res.stderr[-2000:]


def test_missing_accelerate_config_is_one_line() -> None:
    res = run(["launch/accelerate.sh", *TINY], env={"ACCELERATE_CONFIG": "configs/accelerate/nope.yaml"})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "launch/accelerate.sh: error: Accelerate config 'configs/accelerate/nope.yaml' does not exist; "
        "set ACCELERATE_CONFIG to a file in configs/accelerate/"]


def test_accelerate_environment_maps_onto_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from ppll_ext.config import load_config
    from ppll_ext.launchers import apply_launcher_env

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    cfg = load_config(None)
    assert apply_launcher_env(cfg) == ["train.autocast=bf16"] and cfg.train.device == "cpu"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/ppll_train.json")
    cfg = load_config(None)
    assert apply_launcher_env(cfg)[1:] == ["local.engine=deepspeed",
                                           "local.deepspeed_config=configs/deepspeed/ppll_train.json"]
    cfg = load_config(None, ["train.autocast=fp16"])
    apply_launcher_env(cfg)
    assert cfg.train.autocast == "fp16"
