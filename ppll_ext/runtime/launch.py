"""Process-group set-up for the processes runtime, and spawning torchrun when no launcher started us."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist

from ppll_ext.errors import ConfigError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
PER_NODE_KEYS = ("data.root", "data.download", "train.progress", "train.save_dir", "train.resume")
"""Settings that may differ between ranks (paths on each node's file system, progress bars)."""


def under_launcher() -> bool:
    """True when torchrun, the deepspeed launcher or accelerate launch started this process."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def spawn_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run `python -m ppll_ext.train argv` as `nproc` local ranks under torchrun; returns its exit code.

    torchrun (ppll_ext.runtime.torchrun) dies with this process; SIGTERM or SIGHUP here is passed on to it, so the
    stages stop, and the run ends with a non-zero code."""
    cmd = [sys.executable, "-m", "ppll_ext.runtime.torchrun", str(os.getpid()), "--standalone",
           f"--nproc_per_node={nproc}", "-m", "ppll_ext.train", *argv]
    # One torch thread per stage process (torchrun would set it too, with a banner saying so).
    child = subprocess.Popen(cmd, env={"OMP_NUM_THREADS": "1", **os.environ})
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # the terminal sent SIGINT to torchrun too: wait for it to stop the stages
                received.append(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and code == 0:
        return 128 + received[0]
    return code if code >= 0 else 128 - code


def init_distributed(stages: int, device: str, timeout_s: float, data_parallel: int = 1,
                     stages_per_rank: int = 1) -> tuple[int, bool, torch.device]:
    """Join the launcher's process group (gloo on CPU, NCCL on CUDA); check world size == stages x replicas /
    stages per rank.

    Returns (rank, whether this call created the process group, this rank's device).
    """
    world, expected = int(os.environ.get("WORLD_SIZE", "1")), stages * data_parallel // stages_per_rank
    if world != expected:
        replicas = f" x local.data_parallel={data_parallel}" if data_parallel > 1 else ""
        per_rank = f" / local.stages_per_rank={stages_per_rank}" if stages_per_rank > 1 else ""
        raise ConfigError(f"the launcher started {world} processes but local.stages={stages}{replicas}{per_rank} "
                          f"needs {expected}; start {expected} processes (e.g. torchrun --nproc_per_node {expected}) "
                          f"or change local.stages")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), created, dev


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_config(settings: dict[str, Any]) -> None:
    """ConfigError on every rank if any rank was started with other settings than rank 0 (e.g. two nodes given
    different --set): its stages would otherwise train a silently different model."""
    mine = {k: v for k, v in _flatten(settings).items() if k not in PER_NODE_KEYS}
    everyone: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    ref = everyone[0]
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in ref.keys() | theirs.keys() if ref.get(k) != theirs.get(k))
        if differ:
            key = differ[0]
            raise ConfigError(f"rank {rank} was started with {key}={theirs.get(key)!r} but rank 0 with "
                              f"{key}={ref.get(key)!r} ({len(differ)} setting(s) differ); start every rank with the "
                              f"same --config and --set options", every_rank=True)
