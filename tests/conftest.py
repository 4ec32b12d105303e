"""Session fixtures shared by the multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BUILD_SHM_OP = ("from deepspeed.accelerator import get_accelerator; "
                "b = get_accelerator().create_op_builder('ShareMemCommBuilder'); "
                "b is None or b.load()")


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
