"""Fixtures shared by the tests: one torch thread, DeepSpeed's CPU ops built once, small file systems that really
fill up."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

BUILD_SHM_OP = ("from deepspeed.accelerator import get_accelerator; "
                "b = get_accelerator().create_op_builder('ShareMemCommBuilder'); "
                "b is None or b.load()")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread in the tests' own process, as in every process they launch (tests/procs.py env()): the
    models are tiny, and a second OpenMP thread on a busy 2-core machine spins more than it computes (a test of a few
    hundred small steps took 3x as long with two)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.fixture(scope="session")
def deepspeed_cpu_ops() -> None:
    """Build DeepSpeed's CPU shared-memory comm op once, before any DeepSpeed process starts.

    Every `deepspeed.init_distributed` on the CPU loads it, and the first one in an environment (or after the venv
    moved) compiles it: about 40 s alone, several minutes when two ranks and leftover compilers share two cores,
    which would otherwise count against each launch's time limit.
    """
    env = {**os.environ, "DS_ACCELERATOR": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run([sys.executable, "-c", BUILD_SHM_OP], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, f"DeepSpeed's CPU shm comm op did not build:\n{res.stderr[-4000:]}"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`tmpfs(name, size, inodes=None)` mounts a small tmpfs (e.g. size "200k") at tmp_path/name and returns it: a
    file system that really fills up. Mounting needs root (as the CI runs); where it is refused the test is skipped
    with the reason. Everything mounted is unmounted when the test ends."""
    mounted: list[Path] = []

    def mount(name: str, size: str, inodes: int | None = None) -> Path:
        where = tmp_path / name
        where.mkdir()
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"needs a small file system of its own, and mounting a tmpfs was refused (it needs root): "
                        f"{res.stderr.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "--lazy", str(where)], check=True)  # lazy: a file left open cannot block it

