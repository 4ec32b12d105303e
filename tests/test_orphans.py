"""No process of a run outlives the process the user started: SIGTERM and SIGKILL of `ppll train`, torchrun, the
deepspeed launcher and accelerate launch, each while the stages train; every process below it must be gone
within 30 s (the launchers start each worker in a session of its own, so nothing else would reach them)."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

from procs import REPO, Launch, alive, env, free_port, started

from ppll_ext.runtime.guard import is_launcher

RUN = ["--set", "model.name=resnet8", "--set", "model.width=4", "--set", "local.partition=uniform",
       "--set", "train.epochs=200", "--set", "train.progress=false", "--set", "data.train_subset=256",
       "--set", "data.test_subset=100", "--set", "local.stages=2"]
BIN = Path(sys.executable).parent
LAUNCHERS = {
    "ppll train": lambda: [sys.executable, "-m", "ppll_ext", "train"],
    "torchrun": lambda: [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "ppll_ext.train"],
    "deepspeed": lambda: [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
                          str(free_port()), "--module", "ppll_ext.train"],
    "accelerate launch": lambda: [str(BIN / "accelerate"), "launch", "--config_file",
                                  str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port",
                                  str(free_port()), "-m", "ppll_ext.train"],
}
GONE_WITHIN_S = 30


def _tree(launch: Launch) -> dict[int, str | None]:
    """{pid: start time} of the launcher the user started and every process below it, whatever its session."""
    return {pid: started(pid) for pid in launch.descendants() | {launch.proc.pid}}


def test_killing_the_launcher_ends_every_process_of_the_run() -> None:
    """The kill matrix, eight runs started side by side: as soon as a run's stages train, its launcher gets SIGTERM
    or SIGKILL; every process of each run must be gone within 30 s, and a SIGTERMed launcher exit non-zero."""
    runs = {(name, sig): Launch([*command(), *RUN], env(), timeout=300)
            for name, command in LAUNCHERS.items() for sig in (signal.SIGTERM, signal.SIGKILL)}
    trees: dict[tuple[str, signal.Signals], dict[int, str | None]] = {}
    sent: dict[tuple[str, signal.Signals], float] = {}
    gone: dict[tuple[str, signal.Signals], float] = {}
    try:
        while len(gone) < len(runs):
            for key, launch in runs.items():
                launch.proc.poll()  # reap a launcher that has exited
                if key not in sent and any(re.match(r"epoch 1/200 ", line) for _, line in list(launch.out)):
                    trees[key] = _tree(launch)  # the stages train: kill the launcher the user started
                    launch.proc.send_signal(key[1])
                    sent[key] = time.monotonic()
                elif key in sent and key not in gone:
                    left = [pid for pid, t in trees[key].items() if alive(pid) and started(pid) == t]
                    waited = time.monotonic() - sent[key]
                    assert left or waited < GONE_WITHIN_S, (key, left, launch.stderr[-2000:])
                    if not left:
                        gone[key] = waited
                elif key not in sent:
                    assert launch.proc.poll() is None, (key, launch.stderr[-2000:])
                    launch.left()  # fails the test past the overall deadline
            time.sleep(0.1)
        codes = {f"{name} {sig.name}": launch.proc.wait(timeout=5) for (name, sig), launch in runs.items()}
        assert all(code != 0 for code in codes.values()), codes
    finally:
        for launch in runs.values():
            launch.close()


def test_the_watch_follows_only_launchers() -> None:
    """A stage process watches the launcher processes above it, and not the shell or test that started those."""
    python = sys.executable
    assert is_launcher([python, "-m", "torch.distributed.run", "--standalone", "-m", "ppll_ext.train"])
    assert is_launcher([python, "-u", "-m", "deepspeed.launcher.launch", "--world_info=abc"])
    assert is_launcher([python, str(BIN / "accelerate"), "launch", "-m", "ppll_ext.train"])
    assert is_launcher([python, str(BIN / "ppll"), "train"])
    assert is_launcher([python, "-m", "ppll_ext.runtime.torchrun", "123", "--standalone"])
    assert not is_launcher([python, "-m", "pytest", "tests/test_orphans.py"])
    assert not is_launcher(["/bin/bash", "launch/torchrun.sh"])
    assert not is_launcher([python, "train.py", "--deepspeed"])
