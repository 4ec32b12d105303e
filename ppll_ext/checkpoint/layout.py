"""The checkpoint layout: safetensors files in the Hugging Face sharded layout, keyed by the unsplit model's names,
their checksums, and the checks that a file named by a checkpoint lies inside its folder.

A checkpoint directory `step-000123/` holds one `model-0000k-of-0000K.safetensors` shard per
stage, `model.safetensors.index.json` (written last) and `trainer_state.json` (position, K, cut).
Everything that is not the deployed model lives in `training_state/`: `aux-heads.safetensors`
and per-stage `stage-k.safetensors` (optimizer tensors, RNG) + `stage-k.json` (scalars), with no
pickle anywhere. (Readers such as torch's HuggingFaceStorageReader take every *.safetensors file
at the top level for model weights, so nothing else may lie there.) Stages write into
`step-000123.tmp/`; the first rank writes the aux heads, the trainer state and the index, then
renames the directory, so a checkpoint exists completely or not at all (see save.py).

`training_state/checksums.json` maps every other file of the checkpoint (by path relative to it) to its sha256:
each stage hashes what it wrote, the first rank adds its own files and writes the list before the index; loading
verifies each file it opens, and `verify` checks a whole folder. The folder of a training run holds
`.ppll.lock` (see lock.py) while a run writes into it, and `superseded/` for the checkpoints of an earlier run that
lay after the step a later run started from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ppll_ext.errors import CheckpointError
from ppll_ext.folders import member, outside

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"

SINGLE = "model.safetensors"

STATE_DIR = "training_state"

AUX = f"{STATE_DIR}/aux-heads.safetensors"

TRAINER_STATE = "trainer_state.json"

CHECKSUMS = f"{STATE_DIR}/checksums.json"
"""{path relative to the checkpoint: sha256} of every other file of a checkpoint, written just before the index."""

SUPERSEDED = "superseded"
"""The folder of a run directory where a run moves an earlier run's checkpoints that lie after its starting step."""

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
"""Files besides the weights that make a folder loadable by transformers' from_pretrained (model config, tokenizer);
written into language-model checkpoints and copied by export."""

_STEP_DIR = re.compile(r"^step-(\d+)$")

TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")


def shard_name(k: int, num_stages: int) -> str:
    """Hugging Face shard name of stage k (1-based in the file name)."""
    return f"model-{k + 1:05d}-of-{num_stages:05d}.safetensors"


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next batch to train (epoch, index in epoch)."""

    step: int
    epoch: int
    batch: int


@dataclass
class StageManifest:
    """What a stage wrote, reported to the first rank: its shard's tensor names and sizes, its aux head, and the
    sha256 of each file it wrote (by path relative to the checkpoint), so the first rank rereads nothing."""

    index: int
    shard: str
    sizes: dict[str, int]
    aux: dict[str, torch.Tensor]
    checksums: dict[str, str]


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (a shard may be larger than the memory to spare)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(obj: object) -> bytes:
    """The bytes a checkpoint's JSON file holds (so its sha256 is known before it is written)."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(path.part)`, then rename it onto `path` (a file of a folder this module created); the .part file never
    outlives a failure (on a full disk it holds the space a message asks to free)."""
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_bytes(data: bytes, path: Path) -> None:
    """Write `data` to `path` through atomic_write."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` (copied to the CPU) as the safetensors file `path`, through atomic_write."""
    cpu = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt"}))


def atomic_json(obj: object, path: Path) -> None:
    """Write `obj` as the JSON file `path` (json_bytes), through atomic_write."""
    atomic_bytes(json_bytes(obj), path)


HEADER_BYTES = 128
"""Allowance per tensor for its entry in a safetensors header (name, dtype, shape, offsets), in stage_bytes."""


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder in run directory `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), c) for c in root.iterdir() if (m := _STEP_DIR.match(c.name)))


def step_folder(root: str | Path, step: int) -> Path:
    """Where stages write the checkpoint of `step` before it is complete."""
    return Path(root) / f"step-{step:06d}.tmp"


def file_in(folder: Path, name: object, entry: str | None = None) -> Path:
    """The file `name` of checkpoint `folder`, refused (CheckpointError naming `entry`, where the name was read) unless
    it lies inside the folder, symlinks included: nothing read from a checkpoint may point outside it."""
    return member(folder, name, entry or f"checkpoint file {name!r}", CheckpointError)


def read_tensors(folder: Path, name: object, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of safetensors file `name` of checkpoint `folder` (inside it, see file_in)."""
    path = file_in(folder, name, entry)
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {str(path.parent)!r}; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc}); it is corrupt or "
                              f"truncated: restore it or resume from an older step") from None


def read_json(path: Path) -> dict:
    """A JSON file of the checkpoint (inside its folder, see file_in), with a CheckpointError naming it when missing or
    corrupt."""
    file_in(path.parent, path.name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing from {str(path.parent)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{str(path)!r} is not valid JSON; the checkpoint is corrupt") from None


def recorded_checksums(folder: Path) -> dict[str, str] | None:
    """The recorded sha256 of each file of checkpoint `folder`; None for a folder saved without them (an export,
    or a checkpoint of an older ppll_ext)."""
    path = folder / CHECKSUMS
    if not (path.is_file() or path.is_symlink()):
        return None
    sums = read_json(file_in(folder, CHECKSUMS))
    need_field(isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values()), path, "top level",
               "a JSON object of file paths to sha256 digests")
    for name in sums:
        member(folder, name, f"{str(path)!r} entry", CheckpointError, follow_symlinks=False)
    return sums


def warn_unverified(folder: Path) -> None:
    """The warning every reader of a checkpoint gives when it has no checksums to verify its files against."""
    if not (folder / CHECKSUMS).is_file():
        log.warning("checkpoint %s has no %s (saved by an older ppll_ext): its files cannot be verified", folder,
                    CHECKSUMS)


def verify_file(folder: Path, name: str, sums: dict[str, str] | None) -> None:
    """CheckpointError unless file `name` of checkpoint `folder` has the sha256 recorded for it (when recorded)."""
    path = file_in(folder, name)
    if sums is None:
        return
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {str(path.parent)!r}; the checkpoint is incomplete")
    if name not in sums:
        raise CheckpointError(f"{str(folder / name)!r} is not listed in {CHECKSUMS}: it was put there after the "
                              f"checkpoint was saved; remove it or resume from another checkpoint")
    if sha256_file(path) != sums[name]:
        raise CheckpointError(f"{str(folder / name)!r} does not match its sha256 in {CHECKSUMS}: it changed after "
                              f"it was saved (corrupt or edited); restore it or resume from another checkpoint "
                              f"(`ppll verify {folder}` lists every bad file)")


def verify(folder: str | Path) -> dict[str, str] | None:
    """Every file of checkpoint `folder` against its recorded sha256, by path relative to it: "ok", "bad" (other
    content), "missing", "unlisted" (not written by the save) or "outside" (a link leading out of the checkpoint,
    never read); None when it records no checksums (saved by an older ppll_ext)."""
    folder = Path(folder)
    sums = recorded_checksums(folder)
    if sums is None:
        return None
    files = [p for p in folder.rglob("*") if p.is_file() or p.is_symlink()]
    away = {p.relative_to(folder).as_posix() for p in files if outside(folder, p)}
    present = {p.relative_to(folder).as_posix() for p in files if p.is_file()} - {CHECKSUMS}
    status = {name: "outside" if name in away else "missing" if name not in present
              else "ok" if sha256_file(folder / name) == digest else "bad" for name, digest in sums.items()}
    status.update({name: "outside" if name in away else "unlisted" for name in (present | away) - set(sums)})
    return dict(sorted(status.items()))


def need_field(ok: bool, path: Path, entry: str, expected: str) -> None:
    """CheckpointError naming the file and the entry when a checkpoint's field or tensor is missing or malformed."""
    if not ok:
        raise CheckpointError(f"{str(path)!r}: {entry!r} is missing or not {expected}; the file was edited or is "
                              f"corrupt: restore it or resume from another checkpoint")


def is_count(value: object) -> bool:
    """An integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_against(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], where: str) -> None:
    """CheckpointError naming the first missing, unexpected or wrongly shaped tensor."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(f"{where} does not match this model: {detail} ({len(missing)} missing, "
                              f"{len(extra)} unexpected); is it a checkpoint of another model or config?")
    for name, t in reference.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(state[name].shape)}, the model has "
                                  f"{tuple(t.shape)}; it is a checkpoint of another model or config")
