"""Saving a checkpoint: each stage's `write_stage`, the first rank's one `commit` (checksums, index last, then the
rename), the disk-space estimate and checks before training, and moving aside or pruning older checkpoints."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from ppll_ext import hooks
from ppll_ext.checkpoint.layout import (
    AUX,
    CHECKSUMS,
    HEADER_BYTES,
    INDEX,
    STATE_DIR,
    SUPERSEDED,
    TRAINER_STATE,
    Position,
    StageManifest,
    atomic_bytes,
    atomic_json,
    atomic_save,
    json_bytes,
    sha256_file,
    shard_name,
    step_dirs,
)
from ppll_ext.core import LocalBlock
from ppll_ext.errors import CheckpointError, ConfigError
from ppll_ext.paths import free_bytes, is_no_space, size_text

log = logging.getLogger(__name__)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors keyed 'state.<param>.<key>', JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def stage_bytes(block: LocalBlock) -> int:
    """About how many bytes stage `block` adds to a checkpoint, known before its first step: the tensors of its body
    (its shard) and of its aux head, its optimizer's state as that optimizer will hold it (per trainable parameter:
    SGD one momentum buffer, none without momentum; Adam and AdamW two moments, three with amsgrad, and a 4-byte step
    count), its RNG state, and HEADER_BYTES per tensor. Left out: the JSON files and a language model's config and
    tokenizer files (kilobytes to a few MB)."""
    tensors = [*block.body.state_dict().values(), *(block.aux.state_dict().values() if block.aux is not None else ())]
    total = sum(t.numel() * t.element_size() + HEADER_BYTES for t in tensors)
    opt = block.optimizer
    if opt is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        if isinstance(opt, torch.optim.SGD):
            copies, step = int(any(group.get("momentum", 0) for group in opt.param_groups)), 0
        else:  # Adam, AdamW and DeepSpeed's Adam variants
            copies, step = 2 + int(any(group.get("amsgrad", False) for group in opt.param_groups)), 4 + HEADER_BYTES
        total += sum(copies * (p.numel() * p.element_size() + HEADER_BYTES) + step for p in params)
    return total + torch.get_rng_state().numel() + HEADER_BYTES


def check_free_space(save_dir: str | Path, checkpoint_bytes: int, free: int, every_rank: bool = False) -> None:
    """ConfigError before training unless `free` bytes (on `save_dir`'s file system) hold two checkpoints of about
    `checkpoint_bytes` (stage_bytes of every stage): a save writes the new checkpoint in full before an older one is
    pruned, so a run that has room for one only fails at its second save (or at its only one, after all its epochs).
    `every_rank`: every rank of a multi-process run decides alike (the error's every_rank)."""
    if free < 2 * checkpoint_bytes:
        raise ConfigError(f"train.save_dir={str(save_dir)!r} has {size_text(free)} free, but one checkpoint of this "
                          f"run takes about {size_text(checkpoint_bytes)} and saving needs room for two (the new one "
                          f"is written before the previous one is removed); free space there or choose another "
                          f"train.save_dir", key="train.save_dir", every_rank=every_rank)


def _disk_full(folder: Path) -> CheckpointError:
    """The one-line error of a save into `folder` (a run directory's step-N.tmp) that found its disk full."""
    root = folder.parent
    latest = [c.name for _, c in step_dirs(root) if (c / INDEX).is_file()]
    kept = (f"the latest complete checkpoint, {latest[-1]}, is intact; free space there (or choose another "
            f"train.save_dir) and resume from it" if latest else
            "no checkpoint of it is complete; free space there or choose another train.save_dir")
    return CheckpointError(f"no space left on the device of {str(root)!r} while saving "
                           f"{folder.name.removesuffix('.tmp')} ({size_text(free_bytes(root))} free): {kept}",
                           key="train.save_dir")


@contextmanager
def _disk_full_is_one_line(folder: Path) -> Iterator[None]:
    """Turn a full disk while writing checkpoint folder `folder` into _disk_full's CheckpointError (safetensors
    reports it as a SafetensorError carrying the OS error in its text)."""
    try:
        yield
    except Exception as exc:
        if not is_no_space(exc):
            raise
        raise _disk_full(folder) from None


def discard(folder: Path) -> None:
    """Remove `folder`, the step-N.tmp of a save that failed: it is never loaded, and on a full disk it holds space."""
    shutil.rmtree(folder, ignore_errors=True)


def write_stage(folder: Path, block: LocalBlock, num_stages: int, key_map: dict[str, str],
                optimizer_state: dict | None = None) -> StageManifest:
    """Write stage `block.index`'s shard (original names) and training state into `folder`; returns its manifest.

    `optimizer_state` replaces `block.optimizer.state_dict()` (the DeepSpeed engine passes ZeRO-1's gathered one).
    A full disk is a one-line CheckpointError (no .part file is left; whoever commits discards `folder`)."""
    with _disk_full_is_one_line(folder):
        return _write_stage(folder, block, num_stages, key_map, optimizer_state)


def _write_stage(folder: Path, block: LocalBlock, num_stages: int, key_map: dict[str, str],
                 optimizer_state: dict | None) -> StageManifest:
    folder.mkdir(parents=True, exist_ok=True)
    k = block.index
    body = {key_map[n]: t for n, t in block.body.state_dict().items()}
    shard = shard_name(k, num_stages)
    atomic_save(body, folder / shard)
    hooks.shard_written(folder, k)
    if optimizer_state is None and block.optimizer is not None:
        optimizer_state = block.optimizer.state_dict()
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state) if optimizer_state is not None else ({}, None)
    (folder / STATE_DIR).mkdir(exist_ok=True)
    atomic_save({**opt_tensors, "rng.cpu": torch.get_rng_state()}, folder / STATE_DIR / f"stage-{k}.safetensors")
    scalars = {"steps": block.steps, "optimizer": opt_meta,
               "lr_scheduler": block.lr_scheduler.state_dict() if block.lr_scheduler else None}
    atomic_json(scalars, folder / STATE_DIR / f"stage-{k}.json")
    aux = {f"stage{k}.{n}": t.detach().cpu().clone() for n, t in block.aux.state_dict().items()} if block.aux else {}
    files = (shard, f"{STATE_DIR}/stage-{k}.safetensors", f"{STATE_DIR}/stage-{k}.json")
    return StageManifest(k, shard, {name: t.numel() * t.element_size() for name, t in body.items()}, aux,
                         {name: sha256_file(folder / name) for name in files})


def commit(folder: Path, manifests: Iterable[StageManifest], position: Position, boundaries: list[int] | None,
           config: dict, keep: int, extra: Callable[[Path], object] | None = None,
           fingerprints: dict[str, str] | None = None) -> Path:
    """Complete the checkpoint the stages wrote into `folder` (`step-N.tmp`): drop what an earlier, interrupted save
    of that step left there, then aux heads, trainer state, `extra` files (a language model's config.json and
    tokenizer), the checksums, the index (last), the rename to `step-N`; move checkpoints after it aside (an
    earlier run's) and prune to the `keep` newest, never this one. `fingerprints` ({setting: digest of what it
    names}, e.g. the tokenizer's content) are recorded so a resume can tell when a path now names other content.
    The one place a checkpoint becomes visible, called once (on the first rank) by every engine and by
    SchedulePPLL.save_checkpoint. If it fails before the rename, `folder` is discarded (a full disk: a one-line
    CheckpointError), and earlier checkpoints stay as they were."""
    try:
        with _disk_full_is_one_line(folder):
            final = _complete(folder, manifests, position, boundaries, config, extra, fingerprints)
    except BaseException:
        discard(folder)
        raise
    supersede(final.parent, position.step)
    _prune(final.parent, keep, final)
    return final


def _complete(folder: Path, manifests: Iterable[StageManifest], position: Position, boundaries: list[int] | None,
              config: dict, extra: Callable[[Path], object] | None, fingerprints: dict[str, str] | None) -> Path:
    """commit's writes, up to the rename of `folder` to its final name (returned)."""
    manifests = sorted(manifests, key=lambda m: m.index)
    sums = {name: digest for m in manifests for name, digest in m.checksums.items()}
    _drop_stale(folder, set(sums))
    if extra is not None:
        extra(folder)
    atomic_save({k: v for m in manifests for k, v in m.aux.items()}, folder / AUX)
    atomic_json({"position": asdict(position), "num_stages": len(manifests), "boundaries": boundaries,
                 "config": config, **({"fingerprints": fingerprints} if fingerprints else {})},
                folder / TRAINER_STATE)
    weight_map: dict[str, str] = {}
    for m in manifests:
        for name in m.sizes:
            if name in weight_map:
                raise CheckpointError(f"tensor name {name!r} is written by two stages ({weight_map[name]} and "
                                      f"{m.shard}); give each stage tensor its unsplit model's name")
            weight_map[name] = m.shard
    total = sum(size for m in manifests for size in m.sizes.values())
    index = json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in sums:
            sums[name] = sha256_file(path)
    sums[INDEX] = hashlib.sha256(index).hexdigest()
    atomic_json(dict(sorted(sums.items())), folder / CHECKSUMS)
    atomic_bytes(index, folder / INDEX)
    final = folder.with_name(folder.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(folder, final)
    return final


def _drop_stale(folder: Path, own: set[str]) -> None:
    """Delete every file in `folder` but `own` (the stages' files of this save): another K's shards and stage files
    or *.part files that an interrupted save of the same step left, so a committed checkpoint holds only its own."""
    stale = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in own)
    for path in stale:
        path.unlink()
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        if path != folder / STATE_DIR and not any(path.iterdir()):
            path.rmdir()
    if stale:
        log.info("%s: removed %d file(s) an interrupted earlier save left there (%s)", folder.name, len(stale),
                 ", ".join(p.relative_to(folder).as_posix() for p in stale))


def supersede(root: str | Path, step: int) -> None:
    """Move the checkpoints in run directory `root` after `step` into `root/superseded/`, saying so: a run that
    starts (or has just saved) at `step` did not write them, so they must be neither pruned in its place nor picked
    by a later resume from `root`. Nothing is deleted."""
    later = [path for n, path in step_dirs(Path(root)) if n > step]
    if not later:
        return
    aside = Path(root) / SUPERSEDED
    aside.mkdir(exist_ok=True)
    for path in later:
        dest, n = aside / path.name, 1
        while dest.exists():
            n += 1
            dest = aside / f"{path.name}.{n}"
        os.rename(path, dest)
    log.warning("this run is at step %d: moved the later checkpoint(s) %s of an earlier run to %s (not deleted)",
                step, ", ".join(p.name for p in later), aside)


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Delete all but the `keep` highest step-N checkpoints of `root`; `newest`, the one just committed, never."""
    for _, path in step_dirs(root)[:-keep] if keep > 0 else []:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)
