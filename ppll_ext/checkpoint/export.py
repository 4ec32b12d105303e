"""Export: a model's tensors as one `model.safetensors` or Hugging Face shards + index (with a language model's
config and tokenizer), written beside the output folder, their checksums recorded, then put in its place."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from ppll_ext.checkpoint.layout import (
    CHECKSUMS,
    HEADER_BYTES,
    HF_FILES,
    INDEX,
    SINGLE,
    STATE_DIR,
    atomic_json,
    atomic_save,
    recorded_checksums,
    sha256_file,
    shard_name,
    verify_file,
)
from ppll_ext.errors import CheckpointError, ConfigError
from ppll_ext.paths import free_bytes, is_no_space, size_text, unwritable

log = logging.getLogger(__name__)


def export(state: dict[str, torch.Tensor], out: str | Path, max_shard_bytes: int, source: Path | None = None,
           overwrite: bool = False) -> list[Path]:
    """Write `state` as one `model.safetensors`, or as HF shards + index when it exceeds `max_shard_bytes`; with a
    `source` checkpoint folder, its HF_FILES (config.json, tokenizer) too (verified), so from_pretrained(out) loads
    it. A non-empty `out` is refused unless `overwrite`; the files are written beside it and then replace it."""
    extra = sum((source / name).stat().st_size for name in HF_FILES if (source / name).is_file()) if source else 0
    return replace_folder(out, overwrite, lambda folder: write_model(state, folder, max_shard_bytes, source),
                          export_bytes(state) + extra)


def export_bytes(state: dict[str, torch.Tensor]) -> int:
    """About the bytes `state` takes as safetensors files (tensors and HEADER_BYTES each)."""
    return sum(t.numel() * t.element_size() + HEADER_BYTES for t in state.values())


def write_model(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int,
                source: Path | None = None) -> list[str]:
    """export's files, written into the empty `folder`; their names."""
    copied = []
    sums = recorded_checksums(source) if source is not None else None
    for name in HF_FILES if source is not None else ():
        if (source / name).is_file() or (source / name).is_symlink():
            verify_file(source, name, sums)
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        atomic_save(shards[0], folder / SINGLE)
        return [SINGLE, *copied]
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_save(shard, folder / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_json({"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}, folder / INDEX)
    return [*names, INDEX, *copied]


def check_output_folder(out: str | Path, overwrite: bool) -> None:
    """ConfigError unless `out` can take an export: absent, an empty folder, or (with `overwrite`) any folder, where
    it can be written (never a file, device, FIFO or socket; a symlink counts as what it points to)."""
    folder = Path(out).expanduser().resolve()
    reason = unwritable(folder)
    if reason is not None:
        raise ConfigError(f"output {str(out)!r} cannot be used: {reason}; give a folder to write into")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise ConfigError(f"output folder {str(out)!r} is not empty (it holds {entries[0]!r}{more}); choose an empty "
                          f"folder, or replace it with overwrite=True (ppll export/import-deepspeed --overwrite)")


def replace_folder(out: str | Path, overwrite: bool, write: Callable[[Path], list[str]], nbytes: int) -> list[Path]:
    """Run `write` on a new folder beside `out`, record the sha256 of each file it wrote in CHECKSUMS (so `ppll
    verify` and every reader check an export too), then put it in `out`'s place (a non-empty `out` only with
    `overwrite`; a symlink to a folder stays, its target is replaced): `out` never mixes the files of two writes, and
    a failed write leaves it as it was. Refused up front when its file system has less than `nbytes` (about what
    `write` writes) free; a full disk while writing is one CheckpointError line."""
    check_output_folder(out, overwrite)
    final = Path(out).expanduser().resolve()
    free = free_bytes(final.parent)
    if free < nbytes:
        raise ConfigError(f"output {str(out)!r}: its file system has {size_text(free)} free but the files take about "
                          f"{size_text(nbytes)}; free space there or choose another output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        names = write(tmp)
        sums = {name: sha256_file(tmp / name) for name in names}
        (tmp / STATE_DIR).mkdir(exist_ok=True)
        atomic_json(dict(sorted(sums.items())), tmp / CHECKSUMS)
        names.append(CHECKSUMS)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and is_no_space(exc):
            raise CheckpointError(f"no space left on the device of {str(final.parent)!r} while writing {str(out)!r} "
                                  f"(about {size_text(nbytes)} needed, {size_text(free_bytes(final.parent))} free "
                                  f"without the partial files, which are removed); free space there or choose "
                                  f"another output folder") from None
        raise
    try:
        if final.is_dir():
            old = tmp.with_suffix(".old")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [Path(out) / name for name in names]
