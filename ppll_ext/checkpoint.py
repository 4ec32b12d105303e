"""safetensors checkpoints in the Hugging Face sharded layout, keyed by the unsplit model's names.

A checkpoint directory `step-000123/` holds one `model-0000k-of-0000K.safetensors` shard per
stage, `model.safetensors.index.json` (written last) and `trainer_state.json` (position, K, cut).
Everything that is not the deployed model lives in `training_state/`: `aux-heads.safetensors`
and per-stage `stage-k.safetensors` (optimizer tensors, RNG) + `stage-k.json` (scalars), with no
pickle anywhere. (Readers such as torch's HuggingFaceStorageReader take every *.safetensors file
at the top level for model weights, so nothing else may lie there.) Stages write into
`step-000123.tmp/`; the first rank writes the aux heads, the trainer state and the index, then
renames the directory, so a checkpoint exists completely or not at all.

`training_state/checksums.json` maps every other file of the checkpoint (by path relative to it) to its sha256:
each stage hashes what it wrote, the first rank adds its own files and writes the list before the index; loading
verifies each file it opens, and `verify` checks a whole folder. The folder of a training run holds
`.ppll.lock` (JSON: pid, host, process start, time) while a run writes into it, and `superseded/` for the
checkpoints of an earlier run that lay after the step a later run started from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ppll_ext import hooks
from ppll_ext.core import LocalBlock
from ppll_ext.data.text import TOKENIZER_FILES, Tokenizer, load_tokenizer
from ppll_ext.errors import CheckpointError, ConfigError, quote
from ppll_ext.folders import member, outside
from ppll_ext.models import LayeredModel
from ppll_ext.models.hf import config_from_values
from ppll_ext.paths import free_bytes, is_no_space, size_text, unwritable

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
STATE_DIR = "training_state"
AUX = f"{STATE_DIR}/aux-heads.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = f"{STATE_DIR}/checksums.json"
"""{path relative to the checkpoint: sha256} of every other file of a checkpoint, written just before the index."""
LOCK = ".ppll.lock"
"""The lock file of a run directory, held by the process that commits its checkpoints for the whole run."""
SUPERSEDED = "superseded"
"""The folder of a run directory where a run moves an earlier run's checkpoints that lie after its starting step."""
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
"""Files besides the weights that make a folder loadable by transformers' from_pretrained (model config, tokenizer);
written into language-model checkpoints and copied by export."""
RESUME_SETTINGS = ("data.name", "data.train_subset", "data.val_fraction", "data.seq_len", "data.text_column",
                   "data.encoding", "train.batch_size", "train.seed", "local.data_parallel")
"""Settings that give a checkpoint's position (epoch, batch, step) its meaning: a resumed run must keep them."""
OPTIMIZER_SETTINGS = ("optim.name", "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay")
"""Settings held in the saved optimizer states: a run resumed with the same stages (which restores them) keeps them."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
_DS_LAYER = re.compile(r"^layer_(\d+)(-model_\d+)?-model_states\.pt$")
_DS_AUX = re.compile(r"^aux_head_(\d+)(-model_\d+)?-model_states\.pt$")


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


def _sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (a shard may be larger than the memory to spare)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_bytes(obj: object) -> bytes:
    """The bytes a checkpoint's JSON file holds (so its sha256 is known before it is written)."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(path.part)`, then rename it onto `path` (a file of a folder this module created); the .part file never
    outlives a failure (on a full disk it holds the space a message asks to free)."""
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_bytes(data: bytes, path: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    cpu = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt"}))


def _atomic_json(obj: object, path: Path) -> None:
    _atomic_bytes(_json_bytes(obj), path)


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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


HEADER_BYTES = 128
"""Allowance per tensor for its entry in a safetensors header (name, dtype, shape, offsets), in stage_bytes."""


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
    latest = [c.name for _, c in _steps(root) if (c / INDEX).is_file()]
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
    _atomic_save(body, folder / shard)
    hooks.shard_written(folder, k)
    if optimizer_state is None and block.optimizer is not None:
        optimizer_state = block.optimizer.state_dict()
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state) if optimizer_state is not None else ({}, None)
    (folder / STATE_DIR).mkdir(exist_ok=True)
    _atomic_save({**opt_tensors, "rng.cpu": torch.get_rng_state()}, folder / STATE_DIR / f"stage-{k}.safetensors")
    scalars = {"steps": block.steps, "optimizer": opt_meta,
               "lr_scheduler": block.lr_scheduler.state_dict() if block.lr_scheduler else None}
    _atomic_json(scalars, folder / STATE_DIR / f"stage-{k}.json")
    aux = {f"stage{k}.{n}": t.detach().cpu().clone() for n, t in block.aux.state_dict().items()} if block.aux else {}
    files = (shard, f"{STATE_DIR}/stage-{k}.safetensors", f"{STATE_DIR}/stage-{k}.json")
    return StageManifest(k, shard, {name: t.numel() * t.element_size() for name, t in body.items()}, aux,
                         {name: _sha256(folder / name) for name in files})


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
    _atomic_save({k: v for m in manifests for k, v in m.aux.items()}, folder / AUX)
    _atomic_json({"position": asdict(position), "num_stages": len(manifests), "boundaries": boundaries,
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
    index = _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in sums:
            sums[name] = _sha256(path)
    sums[INDEX] = hashlib.sha256(index).hexdigest()
    _atomic_json(dict(sorted(sums.items())), folder / CHECKSUMS)
    _atomic_bytes(index, folder / INDEX)
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


def _steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder in run directory `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), c) for c in root.iterdir() if (m := _STEP_DIR.match(c.name)))


def supersede(root: str | Path, step: int) -> None:
    """Move the checkpoints in run directory `root` after `step` into `root/superseded/`, saying so: a run that
    starts (or has just saved) at `step` did not write them, so they must be neither pruned in its place nor picked
    by a later resume from `root`. Nothing is deleted."""
    later = [path for n, path in _steps(Path(root)) if n > step]
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
    for _, path in _steps(root)[:-keep] if keep > 0 else []:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)


def step_folder(root: str | Path, step: int) -> Path:
    """Where stages write the checkpoint of `step` before it is complete."""
    return Path(root) / f"step-{step:06d}.tmp"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete `step-N` inside a run directory."""
    p = Path(path)
    if _TMP_DIR.match(p.name) and p.is_dir():
        final = p.with_name(p.name.removesuffix(".tmp"))
        raise CheckpointError(f"{str(p)!r} is a save that was interrupted before it was renamed to {final.name}: it "
                              f"is never loaded as it is; if `ppll verify {p}` says every file is ok, rename it to "
                              f"{str(final)!r} and resume from that, else resume from an earlier step")
    if (p / INDEX).is_file() or (p / SINGLE).is_file():
        return p
    if p.is_dir():
        steps = [c for _, c in _steps(p) if (c / INDEX).is_file()]
        if steps:
            return member(p, steps[-1].name, f"run directory {str(p)!r}", CheckpointError)
        raise CheckpointError(f"{str(p)!r} has no {INDEX} and no complete step-N checkpoint inside; "
                              f"an interrupted save leaves only step-N.tmp, which is never loaded")
    if p.exists():
        raise CheckpointError(f"{str(p)!r} is a file, not a checkpoint; pass the directory that holds {INDEX} "
                              f"(or {SINGLE}), or the run directory with step-N checkpoints")
    raise CheckpointError(f"checkpoint {str(p)!r} does not exist; pass a checkpoint directory or a run directory")


def checkpoints(path: str | Path) -> list[Path]:
    """The checkpoint `path` is, or every complete step-N checkpoint of run directory `path`, oldest first."""
    newest = resolve(path)
    if newest == Path(path):
        return [newest]
    return [c for _, c in _steps(Path(path)) if (c / INDEX).is_file()]


def _file(folder: Path, name: object, entry: str | None = None) -> Path:
    """The file `name` of checkpoint `folder`, refused (CheckpointError naming `entry`, where the name was read) unless
    it lies inside the folder, symlinks included: nothing read from a checkpoint may point outside it."""
    return member(folder, name, entry or f"checkpoint file {name!r}", CheckpointError)


def _open(folder: Path, name: object, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of safetensors file `name` of checkpoint `folder` (inside it, see _file)."""
    path = _file(folder, name, entry)
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {str(path.parent)!r}; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc}); it is corrupt or "
                              f"truncated: restore it or resume from an older step") from None


def read_json(path: Path) -> dict:
    """A JSON file of the checkpoint (inside its folder, see _file), with a CheckpointError naming it when missing or
    corrupt."""
    _file(path.parent, path.name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing from {str(path.parent)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{str(path)!r} is not valid JSON; the checkpoint is corrupt") from None


def _checksums(folder: Path) -> dict[str, str] | None:
    """The recorded sha256 of each file of checkpoint `folder`; None for a folder saved without them (an export,
    or a checkpoint of an older ppll_ext)."""
    path = folder / CHECKSUMS
    if not (path.is_file() or path.is_symlink()):
        return None
    sums = read_json(_file(folder, CHECKSUMS))
    _need(isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values()), path, "top level",
          "a JSON object of file paths to sha256 digests")
    for name in sums:
        member(folder, name, f"{str(path)!r} entry", CheckpointError, follow_symlinks=False)
    return sums


def warn_unverified(folder: Path) -> None:
    """The warning every reader of a checkpoint gives when it has no checksums to verify its files against."""
    if not (folder / CHECKSUMS).is_file():
        log.warning("checkpoint %s has no %s (saved by an older ppll_ext): its files cannot be verified", folder,
                    CHECKSUMS)


def _verify_file(folder: Path, name: str, sums: dict[str, str] | None) -> None:
    """CheckpointError unless file `name` of checkpoint `folder` has the sha256 recorded for it (when recorded)."""
    path = _file(folder, name)
    if sums is None:
        return
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {str(path.parent)!r}; the checkpoint is incomplete")
    if name not in sums:
        raise CheckpointError(f"{str(folder / name)!r} is not listed in {CHECKSUMS}: it was put there after the "
                              f"checkpoint was saved; remove it or resume from another checkpoint")
    if _sha256(path) != sums[name]:
        raise CheckpointError(f"{str(folder / name)!r} does not match its sha256 in {CHECKSUMS}: it changed after "
                              f"it was saved (corrupt or edited); restore it or resume from another checkpoint "
                              f"(`ppll verify {folder}` lists every bad file)")


def verify(folder: str | Path) -> dict[str, str] | None:
    """Every file of checkpoint `folder` against its recorded sha256, by path relative to it: "ok", "bad" (other
    content), "missing", "unlisted" (not written by the save) or "outside" (a link leading out of the checkpoint,
    never read); None when it records no checksums (saved by an older ppll_ext)."""
    folder = Path(folder)
    sums = _checksums(folder)
    if sums is None:
        return None
    files = [p for p in folder.rglob("*") if p.is_file() or p.is_symlink()]
    away = {p.relative_to(folder).as_posix() for p in files if outside(folder, p)}
    present = {p.relative_to(folder).as_posix() for p in files if p.is_file()} - {CHECKSUMS}
    status = {name: "outside" if name in away else "missing" if name not in present
              else "ok" if _sha256(folder / name) == digest else "bad" for name, digest in sums.items()}
    status.update({name: "outside" if name in away else "unlisted" for name in (present | away) - set(sums)})
    return dict(sorted(status.items()))


def _need(ok: bool, path: Path, entry: str, expected: str) -> None:
    """CheckpointError naming the file and the entry when a checkpoint's field or tensor is missing or malformed."""
    if not ok:
        raise CheckpointError(f"{str(path)!r}: {entry!r} is missing or not {expected}; the file was edited or is "
                              f"corrupt: restore it or resume from another checkpoint")


def _count(value: object) -> bool:
    """An integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_trainer_state(folder: Path) -> dict:
    """trainer_state.json of checkpoint `folder`, each field checked and the file verified against its sha256."""
    path = _file(folder, TRAINER_STATE)
    state = read_json(path)
    _need(isinstance(state, dict), path, "top level", "a JSON object")
    pos = state.get("position")
    _need(isinstance(pos, dict) and all(_count(pos.get(f)) for f in ("step", "epoch", "batch")), path, "position",
          "{step, epoch, batch} of integers >= 0")
    k = state.get("num_stages")
    _need(_count(k) and k >= 1, path, "num_stages", "an integer >= 1")
    cut = state.get("boundaries")
    _need(cut is None or (isinstance(cut, list) and len(cut) == k + 1 and all(_count(b) for b in cut)
                          and cut[0] == 0 and all(a < b for a, b in zip(cut, cut[1:]))),
          path, "boundaries", f"null or {k + 1} increasing layer indices from 0 (num_stages + 1)")
    _need(isinstance(state.get("config"), dict), path, "config", "a JSON object")
    prints = state.get("fingerprints", {})
    _need(isinstance(prints, dict) and all(isinstance(v, str) for v in prints.values()), path, "fingerprints",
          "a JSON object of setting names to digests")
    _verify_file(folder, TRAINER_STATE, _checksums(folder))
    return state


def check_cut(folder: Path, state: dict, layers: int) -> None:
    """CheckpointError unless the checkpoint's stage boundaries end at this model's last layer."""
    cut = state["boundaries"]
    if cut is not None and cut[-1] != layers:
        raise CheckpointError(f"{str(folder / TRAINER_STATE)!r}: 'boundaries' {cut} end at layer {cut[-1]} but this "
                              f"model has {layers} layers; the file was edited or belongs to another model: resume "
                              f"from a checkpoint of this model")


def check_resume_settings(folder: Path, state: dict, config: dict, same_stages: bool,
                          fingerprints: dict[str, str] | None = None) -> None:
    """CheckpointError when a resumed run changes a setting its checkpoint depends on: RESUME_SETTINGS always,
    OPTIMIZER_SETTINGS when the optimizer states are restored (same number of stages), and the content of what a
    fingerprinted setting names (`fingerprints`, e.g. data.tokenizer: another tokenizer at the same path, or of the
    same vocabulary size, would feed the embeddings other ids). Settings the checkpoint does not record
    (SchedulePPLL's checkpoints record none) are not compared."""
    saved = state["config"]
    for key, digest in (fingerprints or {}).items():
        old = state.get("fingerprints", {}).get(key)
        if old is not None and old != digest:
            section, name = key.split(".")
            then = saved.get(section, {}).get(name) if isinstance(saved.get(section), dict) else None
            raise CheckpointError(f"{str(folder / TRAINER_STATE)!r}: this run's {key}={quote(config[section][name])} "
                                  f"is not the {key} the checkpoint was trained with ({quote(then)} then; the content "
                                  f"differs): its ids would mean other tokens; resume with that {key}, or start a "
                                  f"new run without train.resume", key=key)
    for key in RESUME_SETTINGS + (OPTIMIZER_SETTINGS if same_stages else ()):
        section, name = key.split(".")
        if not isinstance(saved.get(section), dict) or name not in saved[section]:
            continue
        old, new = saved[section][name], config[section][name]
        if old != new:
            why = ("the saved position (epoch, batch, step) counts batches of the saved data stream"
                   if key in RESUME_SETTINGS else "the saved optimizer states were made with it")
            raise CheckpointError(f"{str(folder / TRAINER_STATE)!r}: 'config.{key}' is {quote(old)} but this run "
                                  f"has {key}={quote(new)}; {why}: resume with {key}={quote(old)}, or start a new run "
                                  f"without train.resume", key=key)


def load_model_state(path: str | Path, warn: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the unsplit model from all shards, checked against the index and the recorded checksums
    (each file verified before it is read; `warn`: say so when there are none). Every reader of a checkpoint's
    weights (resume, export, generate, SchedulePPLL.load_checkpoint) goes through here."""
    folder = resolve(path)
    sums = _checksums(folder)
    if warn:
        warn_unverified(folder)
    if not (folder / INDEX).is_file():
        _verify_file(folder, SINGLE, sums)
        return _open(folder, SINGLE)
    _verify_file(folder, INDEX, sums)
    index = read_json(folder / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CheckpointError(f"{str(folder / INDEX)!r} has no weight_map of tensor names to shard files; it is not "
                              f"a sharded safetensors index (edited or corrupt): restore it from a copy")
    merged: dict[str, torch.Tensor] = {}
    for shard in set(weight_map.values()):
        _file(folder, shard, f"{str(folder / INDEX)!r} weight_map entry")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        _verify_file(folder, shard, sums)
        merged.update(_open(folder, shard))
    missing = sorted(set(weight_map) - set(merged))
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} listed in the index is in no shard ({len(missing)} missing)")
    return merged


def load_language_model(folder: Path, warn: bool = True) -> PreTrainedModel:
    """The GPT-2 / Llama model of checkpoint (or export) `folder`, in eval mode: its config.json verified and checked
    (no auto_map, a gpt2 or llama model_type), the model built from it by transformers without reading any file or
    running any code, and the weights of load_model_state checked tensor by tensor against it (`warn`: say so when
    there are no checksums)."""
    from transformers import AutoModelForCausalLM

    if warn:
        warn_unverified(folder)
    path = _file(folder, "config.json")
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json: it is not a language-model checkpoint (a run of "
                              f"model.name=gpt2 or llama, or its ppll export)")
    _verify_file(folder, "config.json", _checksums(folder))
    config = config_from_values(read_json(path), f"checkpoint {str(folder)!r}", None, CheckpointError)
    weights = load_model_state(folder, warn=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    check_against(weights, model.state_dict(), f"checkpoint {str(folder)!r}")
    model.load_state_dict(weights)
    return model.eval()


def load_saved_tokenizer(folder: Path) -> Tokenizer | None:
    """The tokenizer a language-model checkpoint holds (its files verified and confined to the folder), None when it
    holds none (byte-level runs need no file)."""
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.json").is_symlink()):
        return None
    sums = _checksums(folder)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file() or (folder / name).is_symlink():
            _verify_file(folder, name, sums)
    return load_tokenizer(str(folder), confined=True)


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


def load_aux(folder: Path) -> dict[str, torch.Tensor]:
    """Every aux head's tensors of a checkpoint, keyed `stage<k>.<name>`."""
    _verify_file(folder, AUX, _checksums(folder))
    return _open(folder, AUX)


def _check_stage(folder: Path, k: int, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """CheckpointError naming the file and the entry when stage k's training state lacks or mangles one."""
    tensor_file, json_file = folder / STATE_DIR / f"stage-{k}.safetensors", folder / STATE_DIR / f"stage-{k}.json"
    rng = tensors.get("rng.cpu")
    _need(rng is not None and rng.dtype == torch.uint8 and rng.dim() == 1, tensor_file, "rng.cpu",
          "a uint8 RNG state")
    _need(isinstance(scalars, dict), json_file, "top level", "a JSON object")
    _need(_count(scalars.get("steps")), json_file, "steps", "an integer >= 0")
    opt, sched = scalars.get("optimizer", 0), scalars.get("lr_scheduler", 0)  # 0: absent
    _need(opt is None or (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
                          and isinstance(opt.get("scalars"), dict)), json_file, "optimizer",
          "null or {param_groups, scalars}")
    _need(sched is None or isinstance(sched, dict), json_file, "lr_scheduler", "null or a JSON object")


def load_stage(folder: Path, block: LocalBlock, same_cut: bool) -> None:
    """Restore a block's aux head, optimizer, schedule and step count (only when the cut is unchanged)."""
    if not same_cut:
        return
    k = block.index
    if block.aux is not None:
        prefix = f"stage{k}."
        aux = {n[len(prefix):]: t for n, t in load_aux(folder).items() if n.startswith(prefix)}
        check_against(aux, block.aux.state_dict(), f"checkpoint {str(folder)!r}: {AUX} (stage {k})")
        block.aux.load_state_dict(aux)
    tensor_name, json_name = f"{STATE_DIR}/stage-{k}.safetensors", f"{STATE_DIR}/stage-{k}.json"
    sums = _checksums(folder)
    _verify_file(folder, tensor_name, sums)
    _verify_file(folder, json_name, sums)
    tensors = _open(folder, tensor_name)
    scalars = read_json(folder / json_name)
    _check_stage(folder, k, tensors, scalars)
    torch.set_rng_state(tensors.pop("rng.cpu"))
    if block.optimizer is not None and scalars["optimizer"] is not None:
        try:
            block.optimizer.load_state_dict(_unflatten_optimizer(tensors, scalars["optimizer"]))
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {str(folder)!r}: the optimizer state in {tensor_name} does not fit "
                                  f"stage {k}'s {type(block.optimizer).__name__} ({type(exc).__name__}: {exc}); "
                                  f"resume with the optim settings of its {TRAINER_STATE}") from None
    if block.lr_scheduler is not None and scalars["lr_scheduler"] is not None:
        block.lr_scheduler.load_state_dict(scalars["lr_scheduler"])
    block.steps = scalars["steps"]


def export(state: dict[str, torch.Tensor], out: str | Path, max_shard_bytes: int, source: Path | None = None,
           overwrite: bool = False) -> list[Path]:
    """Write `state` as one `model.safetensors`, or as HF shards + index when it exceeds `max_shard_bytes`; with a
    `source` checkpoint folder, its HF_FILES (config.json, tokenizer) too (verified), so from_pretrained(out) loads
    it. A non-empty `out` is refused unless `overwrite`; the files are written beside it and then replace it."""
    extra = sum((source / name).stat().st_size for name in HF_FILES if (source / name).is_file()) if source else 0
    return _replace_folder(out, overwrite, lambda folder: _write_model(state, folder, max_shard_bytes, source),
                           _export_bytes(state) + extra)


def _export_bytes(state: dict[str, torch.Tensor]) -> int:
    """About the bytes `state` takes as safetensors files (tensors and HEADER_BYTES each)."""
    return sum(t.numel() * t.element_size() + HEADER_BYTES for t in state.values())


def _write_model(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int,
                 source: Path | None = None) -> list[str]:
    """export's files, written into the empty `folder`; their names."""
    copied = []
    sums = _checksums(source) if source is not None else None
    for name in HF_FILES if source is not None else ():
        if (source / name).is_file() or (source / name).is_symlink():
            _verify_file(source, name, sums)
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
        _atomic_save(shards[0], folder / SINGLE)
        return [SINGLE, *copied]
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _atomic_save(shard, folder / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _atomic_json({"metadata": {"total_size": total},
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


def _replace_folder(out: str | Path, overwrite: bool, write: Callable[[Path], list[str]], nbytes: int) -> list[Path]:
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
        sums = {name: _sha256(tmp / name) for name in names}
        (tmp / STATE_DIR).mkdir(exist_ok=True)
        _atomic_json(dict(sorted(sums.items())), tmp / CHECKSUMS)
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


def _process(pid: int) -> tuple[bool, str | None]:
    """(whether process `pid` runs, its start time in clock ticks since boot; None where /proc cannot tell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass  # it exists, under another user
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True, None
    return fields[0] != "Z", fields[19]


def _read_lock(path: Path) -> dict | None:
    """The lock file's holder {pid, host, started, since}, None without one; a lock being written is waited for."""
    for _ in range(10):
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            time.sleep(0.05)  # created by another run that has not written it yet
            continue
        if (isinstance(holder, dict) and _count(holder.get("pid")) and holder["pid"] > 0
                and isinstance(holder.get("host"), str) and isinstance(holder.get("since"), str)
                and "started" in holder and isinstance(holder["started"], (str, type(None)))):
            return holder
        break
    raise CheckpointError(f"{str(path)!r} is not a ppll lock (JSON with pid, host, started, since); if no run uses "
                          f"{str(path.parent)!r}, delete it", key="train.save_dir")


def _stale_lock(path: Path) -> dict | None:
    """The holder of the lock at `path` if its run is dead; None without a lock; CheckpointError while a live run
    (or a run on another host, which cannot be checked from here) holds it."""
    holder = _read_lock(path)
    if holder is None:
        return None
    who = f"pid {holder['pid']} on host {holder['host']}, started {holder['since']}"
    if holder["host"] != socket.gethostname():
        raise CheckpointError(f"{str(path.parent)!r} is locked by a run on another host ({who}); if that run has "
                              f"ended, delete {str(path)!r}, else choose another train.save_dir", key="train.save_dir")
    running, started = _process(holder["pid"])
    if running and (holder["started"] is None or started is None or started == holder["started"]):
        raise CheckpointError(f"{str(path.parent)!r} is in use by another run ({who}); wait for it to end or choose "
                              f"another train.save_dir", key="train.save_dir")
    return holder


def check_run_dir(save_dir: str | Path) -> None:
    """ConfigError unless `save_dir` is, or can be created as, a writable folder; CheckpointError while a live run
    holds its lock. Checked before any training, so a bad run directory never fails a run after its epochs."""
    root = Path(save_dir).absolute()
    reason = unwritable(root)
    if reason is not None:
        raise ConfigError(f"train.save_dir={str(save_dir)!r} cannot be used: {reason}; choose another "
                          f"train.save_dir", key="train.save_dir")
    _stale_lock(root / LOCK)


@dataclass
class RunLock:
    """The lock on a run directory, held by the process that commits its checkpoints (see lock_run)."""

    path: Path
    holder: dict
    created_dir: bool

    def release(self) -> None:
        """Remove the lock while it is still this process's, and the run directory if this run created it and left
        it empty (idempotent)."""
        with suppress(FileNotFoundError, CheckpointError):
            if _read_lock(self.path) == self.holder:
                self.path.unlink()
        if self.created_dir:
            with suppress(OSError):
                self.path.parent.rmdir()


def lock_run(save_dir: str | Path) -> RunLock:
    """Lock run directory `save_dir` (created if need be) for this process, the one that commits its checkpoints:
    refused while another live run holds it, a dead run's lock taken over with a message. Then the step-N.tmp
    folders of interrupted saves are removed (no live run can be writing them)."""
    check_run_dir(save_dir)
    root = Path(save_dir)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process(os.getpid())[1],
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            stale = _stale_lock(path)
            if stale is not None:
                _take_over(path, stale)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine) + "\n")
        break
    else:
        raise CheckpointError(f"{str(path)!r} was taken by other runs starting at the same time; choose another "
                              f"train.save_dir", key="train.save_dir")
    _finish_interrupted(root)
    return RunLock(path, mine, created)


def _finish_interrupted(root: Path) -> None:
    """Settle the step-N.tmp folders of interrupted saves in run directory `root` (no live run writes them): one
    that is complete (its index written, every file verified) and has no step-N beside it was killed between the
    index and the rename, so the rename is done now and nothing saved is lost; the others are removed."""
    removed = []
    for tmp in sorted(p for p in root.iterdir() if _TMP_DIR.match(p.name) and p.is_dir() and not p.is_symlink()):
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        try:
            status = verify(tmp) if (tmp / INDEX).is_file() and not final.exists() else None
        except CheckpointError:
            status = None
        if status and set(status.values()) == {"ok"}:
            os.replace(tmp, final)
            log.warning("%s: completed the save of %s that was interrupted before its rename (every file verified)",
                        root, final.name)
            continue
        shutil.rmtree(tmp)
        removed.append(tmp.name)
    if removed:
        log.info("removed %s from %s: folders of interrupted saves, never loaded", ", ".join(removed), root)


def _take_over(path: Path, holder: dict) -> None:
    """Remove the stale lock of `holder` at `path`, saying so; a lock another run has put there meanwhile stays."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run took it over first
    if _read_lock(aside) != holder:  # that other run's fresh lock: put it back
        os.rename(aside, path)
        return
    aside.unlink()
    log.warning("taking over the lock of %s: its run (pid %d on host %s, started %s) is no longer running",
                path.parent, holder["pid"], holder["host"], holder["since"])


def _weights_only(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, loaded with weights_only=True: a file holding anything else is refused, never
    unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{str(path)!r} cannot be loaded as plain tensors with weights_only=True ({reason}); "
                              f"it is corrupt or holds objects that would need unpickling, which is refused") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} is not a state dict of tensors")
    return state


def deepspeed_folder(path: str | Path) -> Path:
    """The folder of a DeepSpeed checkpoint: `path` itself, or `path/<tag>` with the tag its `latest` file names."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"DeepSpeed checkpoint {str(p)!r} does not exist; pass the save_checkpoint directory")
    if (p / "latest").is_file():
        p = member(p, (p / "latest").read_text(encoding="utf-8", errors="replace").strip(),
                   f"{str(p / 'latest')!r}", CheckpointError)
    if not p.is_dir() or not any(_DS_LAYER.match(f.name) for f in p.iterdir()):
        raise CheckpointError(f"{str(p)!r} has no layer_XX-model_states.pt files: it is not a DeepSpeed pipeline "
                              f"checkpoint (pass the directory given to engine.save_checkpoint, or its tag folder)")
    return p


def import_deepspeed(path: str | Path, layered: LayeredModel) -> tuple[dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor]]:
    """Tensors of a DeepSpeed pipeline checkpoint of `layered`'s layers under the unsplit model's names, and the
    aux heads ppll_ext's adapter saved beside them (keyed `stage<k>.<name>`, empty for stock checkpoints)."""
    folder = deepspeed_folder(path)
    layers: dict[int, Path] = {}
    aux: dict[str, torch.Tensor] = {}
    for f in sorted(folder.iterdir()):
        if (m := _DS_LAYER.match(f.name) or _DS_AUX.match(f.name)) and m.group(2):
            raise CheckpointError(f"{f.name} is one tensor-parallel slice of a layer; only pipeline (and data) "
                                  f"parallel checkpoints can be imported")
        if _DS_LAYER.match(f.name) or _DS_AUX.match(f.name):
            member(folder, f.name, f"DeepSpeed checkpoint file {f.name!r}", CheckpointError)
        if m := _DS_LAYER.match(f.name):
            layers[int(m.group(1))] = f
        elif m := _DS_AUX.match(f.name):
            aux.update({f"stage{int(m.group(1))}.{k}": v for k, v in _weights_only(f).items()})
    beyond = [i for i in layers if i >= len(layered.layers)]
    if beyond:
        raise CheckpointError(f"{layers[max(beyond)].name} is beyond the {len(layered.layers)} layers of "
                              f"{layered.name}: it is a checkpoint of another model or config")
    merged: dict[str, torch.Tensor] = {}
    for idx, f in sorted(layers.items()):
        state = _weights_only(f)
        layer = layered.layers[idx]
        check_against(state, layer.state_dict(), f"{f.name} (layer {idx} of {layered.name})")
        names = layered.key_map(layer)
        merged.update({names[k]: v for k, v in state.items()})
    check_against(merged, layered.model.state_dict(), f"DeepSpeed checkpoint {str(folder)!r}")
    return merged, aux


def write_imported(state: dict[str, torch.Tensor], aux: dict[str, torch.Tensor], out: str | Path,
                   max_shard_bytes: int, overwrite: bool = False) -> list[Path]:
    """`export` the model tensors, plus the aux heads (if any) in training_state/aux-heads.safetensors."""

    def write(folder: Path) -> list[str]:
        names = _write_model(state, folder, max_shard_bytes)
        if aux:
            (folder / STATE_DIR).mkdir()
            _atomic_save(aux, folder / AUX)
            names.append(AUX)
        return names

    return _replace_folder(out, overwrite, write, _export_bytes(state) + _export_bytes(aux))
