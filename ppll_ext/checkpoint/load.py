"""Reading a checkpoint: a run directory resolved to its newest step, the trainer state and the settings a resume
must keep, the model weights, each stage's training state, a language model and its tokenizer; every file is
verified against its recorded sha256 before it is read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ppll_ext.core import LocalBlock
from ppll_ext.data.text import TOKENIZER_FILES, Tokenizer, load_tokenizer
from ppll_ext.errors import CheckpointError, quote
from ppll_ext.folders import member
from ppll_ext.models.hf import config_from_values

if TYPE_CHECKING:
    from transformers import PreTrainedModel
from ppll_ext.checkpoint.layout import (
    AUX,
    INDEX,
    SINGLE,
    STATE_DIR,
    TMP_DIR,
    TRAINER_STATE,
    check_against,
    file_in,
    is_count,
    need_field,
    read_json,
    read_tensors,
    recorded_checksums,
    step_dirs,
    verify_file,
    warn_unverified,
)

log = logging.getLogger(__name__)

RESUME_SETTINGS = ("data.name", "data.train_subset", "data.val_fraction", "data.seq_len", "data.text_column",
                   "data.encoding", "train.batch_size", "train.seed", "local.data_parallel")
"""Settings that give a checkpoint's position (epoch, batch, step) its meaning: a resumed run must keep them."""

OPTIMIZER_SETTINGS = ("optim.name", "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay")
"""Settings held in the saved optimizer states: a run resumed with the same stages (which restores them) keeps them."""


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete `step-N` inside a run directory."""
    p = Path(path)
    if TMP_DIR.match(p.name) and p.is_dir():
        final = p.with_name(p.name.removesuffix(".tmp"))
        raise CheckpointError(f"{str(p)!r} is a save that was interrupted before it was renamed to {final.name}: it "
                              f"is never loaded as it is; if `ppll verify {p}` says every file is ok, rename it to "
                              f"{str(final)!r} and resume from that, else resume from an earlier step")
    if (p / INDEX).is_file() or (p / SINGLE).is_file():
        return p
    if p.is_dir():
        steps = [c for _, c in step_dirs(p) if (c / INDEX).is_file()]
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
    return [c for _, c in step_dirs(Path(path)) if (c / INDEX).is_file()]


def read_trainer_state(folder: Path) -> dict:
    """trainer_state.json of checkpoint `folder`, each field checked and the file verified against its sha256."""
    path = file_in(folder, TRAINER_STATE)
    state = read_json(path)
    need_field(isinstance(state, dict), path, "top level", "a JSON object")
    pos = state.get("position")
    need_field(isinstance(pos, dict) and all(is_count(pos.get(f)) for f in ("step", "epoch", "batch")), path,
               "position", "{step, epoch, batch} of integers >= 0")
    k = state.get("num_stages")
    need_field(is_count(k) and k >= 1, path, "num_stages", "an integer >= 1")
    cut = state.get("boundaries")
    need_field(cut is None or (isinstance(cut, list) and len(cut) == k + 1 and all(is_count(b) for b in cut)
                               and cut[0] == 0 and all(a < b for a, b in zip(cut, cut[1:]))),
               path, "boundaries", f"null or {k + 1} increasing layer indices from 0 (num_stages + 1)")
    need_field(isinstance(state.get("config"), dict), path, "config", "a JSON object")
    prints = state.get("fingerprints", {})
    need_field(isinstance(prints, dict) and all(isinstance(v, str) for v in prints.values()), path, "fingerprints",
               "a JSON object of setting names to digests")
    verify_file(folder, TRAINER_STATE, recorded_checksums(folder))
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
    sums = recorded_checksums(folder)
    if warn:
        warn_unverified(folder)
    if not (folder / INDEX).is_file():
        verify_file(folder, SINGLE, sums)
        return read_tensors(folder, SINGLE)
    verify_file(folder, INDEX, sums)
    index = read_json(folder / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CheckpointError(f"{str(folder / INDEX)!r} has no weight_map of tensor names to shard files; it is not "
                              f"a sharded safetensors index (edited or corrupt): restore it from a copy")
    merged: dict[str, torch.Tensor] = {}
    for shard in set(weight_map.values()):
        file_in(folder, shard, f"{str(folder / INDEX)!r} weight_map entry")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        verify_file(folder, shard, sums)
        merged.update(read_tensors(folder, shard))
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
    path = file_in(folder, "config.json")
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json: it is not a language-model checkpoint (a run of "
                              f"model.name=gpt2 or llama, or its ppll export)")
    verify_file(folder, "config.json", recorded_checksums(folder))
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
    sums = recorded_checksums(folder)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file() or (folder / name).is_symlink():
            verify_file(folder, name, sums)
    return load_tokenizer(str(folder), confined=True)


def load_aux(folder: Path) -> dict[str, torch.Tensor]:
    """Every aux head's tensors of a checkpoint, keyed `stage<k>.<name>`."""
    verify_file(folder, AUX, recorded_checksums(folder))
    return read_tensors(folder, AUX)


def _check_stage(folder: Path, k: int, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """CheckpointError naming the file and the entry when stage k's training state lacks or mangles one."""
    tensor_file, json_file = folder / STATE_DIR / f"stage-{k}.safetensors", folder / STATE_DIR / f"stage-{k}.json"
    rng = tensors.get("rng.cpu")
    need_field(rng is not None and rng.dtype == torch.uint8 and rng.dim() == 1, tensor_file, "rng.cpu",
               "a uint8 RNG state")
    need_field(isinstance(scalars, dict), json_file, "top level", "a JSON object")
    need_field(is_count(scalars.get("steps")), json_file, "steps", "an integer >= 0")
    opt, sched = scalars.get("optimizer", 0), scalars.get("lr_scheduler", 0)  # 0: absent
    need_field(opt is None or (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
                               and isinstance(opt.get("scalars"), dict)), json_file, "optimizer",
               "null or {param_groups, scalars}")
    need_field(sched is None or isinstance(sched, dict), json_file, "lr_scheduler", "null or a JSON object")


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
    sums = recorded_checksums(folder)
    verify_file(folder, tensor_name, sums)
    verify_file(folder, json_name, sums)
    tensors = read_tensors(folder, tensor_name)
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
