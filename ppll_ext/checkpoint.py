"""safetensors checkpoints in the Hugging Face sharded layout, keyed by the unsplit model's names.

A checkpoint directory `step-000123/` holds one `model-0000k-of-0000K.safetensors` shard per
stage, `model.safetensors.index.json` (written last) and `trainer_state.json` (position, K, cut).
Everything that is not the deployed model lives in `training_state/`: `aux-heads.safetensors`
and per-stage `stage-k.safetensors` (optimizer tensors, RNG) + `stage-k.json` (scalars), with no
pickle anywhere. (Readers such as torch's HuggingFaceStorageReader take every *.safetensors file
at the top level for model weights, so nothing else may lie there.) Stages write into
`step-000123.tmp/`; the first rank writes the aux heads, the trainer state and the index, then
renames the directory, so a checkpoint exists completely or not at all.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ppll_ext import hooks
from ppll_ext.core import LocalBlock
from ppll_ext.errors import CheckpointError
from ppll_ext.models import LayeredModel

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
STATE_DIR = "training_state"
AUX = f"{STATE_DIR}/aux-heads.safetensors"
TRAINER_STATE = "trainer_state.json"
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
"""Files besides the weights that make a folder loadable by transformers' from_pretrained (model config, tokenizer);
written into language-model checkpoints and copied by export."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
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
    """What a stage wrote, reported to the first rank: its shard's tensor names and sizes, its aux head."""

    index: int
    shard: str
    sizes: dict[str, int]
    aux: dict[str, torch.Tensor]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, path)


def _atomic_json(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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


def write_stage(folder: Path, block: LocalBlock, num_stages: int, key_map: dict[str, str]) -> StageManifest:
    """Write stage `block.index`'s shard (original names) and training state into `folder`; returns its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    k = block.index
    body = {key_map[n]: t for n, t in block.body.state_dict().items()}
    shard = shard_name(k, num_stages)
    _atomic_save(body, folder / shard)
    hooks.shard_written(folder, k)
    opt_tensors, opt_meta = _flatten_optimizer(block.optimizer.state_dict()) if block.optimizer else ({}, None)
    (folder / STATE_DIR).mkdir(exist_ok=True)
    _atomic_save({**opt_tensors, "rng.cpu": torch.get_rng_state()}, folder / STATE_DIR / f"stage-{k}.safetensors")
    scalars = {"steps": block.steps, "optimizer": opt_meta,
               "lr_scheduler": block.lr_scheduler.state_dict() if block.lr_scheduler else None}
    _atomic_json(scalars, folder / STATE_DIR / f"stage-{k}.json")
    aux = {f"stage{k}.{n}": t.detach().cpu().clone() for n, t in block.aux.state_dict().items()} if block.aux else {}
    return StageManifest(k, shard, {name: t.numel() * t.element_size() for name, t in body.items()}, aux)


def commit(folder: Path, manifests: Iterable[StageManifest], position: Position, boundaries: list[int] | None,
           config: dict, keep: int, extra: Callable[[Path], object] | None = None) -> Path:
    """Complete the checkpoint the stages wrote into `folder` (`step-N.tmp`): aux heads, trainer state, `extra`
    files (a language model's config.json and tokenizer), then the index (last), then the rename to `step-N`; prune
    to the `keep` newest. The one place a checkpoint becomes visible, called once (on the first rank) by every
    engine and by SchedulePPLL.save_checkpoint."""
    manifests = sorted(manifests, key=lambda m: m.index)
    if extra is not None:
        extra(folder)
    _atomic_save({k: v for m in manifests for k, v in m.aux.items()}, folder / AUX)
    _atomic_json({"position": asdict(position), "num_stages": len(manifests), "boundaries": boundaries,
                  "config": config}, folder / TRAINER_STATE)
    weight_map: dict[str, str] = {}
    for m in manifests:
        for name in m.sizes:
            if name in weight_map:
                raise CheckpointError(f"tensor name {name!r} is written by two stages ({weight_map[name]} and "
                                      f"{m.shard}); give each stage tensor its unsplit model's name")
            weight_map[name] = m.shard
    total = sum(size for m in manifests for size in m.sizes.values())
    _atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map}, folder / INDEX)
    final = folder.with_name(folder.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(folder, final)
    _prune(final.parent, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def step_folder(root: str | Path, step: int) -> Path:
    """Where stages write the checkpoint of `step` before it is complete."""
    return Path(root) / f"step-{step:06d}.tmp"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete `step-N` inside a run directory."""
    p = Path(path)
    if (p / INDEX).is_file() or (p / SINGLE).is_file():
        return p
    if p.is_dir():
        steps = sorted((int(m.group(1)), c) for c in p.iterdir() if (m := _STEP_DIR.match(c.name))
                       and (c / INDEX).is_file())
        if steps:
            return steps[-1][1]
        raise CheckpointError(f"{str(p)!r} has no {INDEX} and no complete step-N checkpoint inside; "
                              f"an interrupted save leaves only step-N.tmp, which is never loaded")
    if p.exists():
        raise CheckpointError(f"{str(p)!r} is a file, not a checkpoint; pass the directory that holds {INDEX} "
                              f"(or {SINGLE}), or the run directory with step-N checkpoints")
    raise CheckpointError(f"checkpoint {str(p)!r} does not exist; pass a checkpoint directory or a run directory")


def _open(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {str(path.parent)!r}; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc}); it is corrupt or "
                              f"truncated: restore it or resume from an older step") from None


def read_json(path: Path) -> dict:
    """A JSON file of the checkpoint, with a CheckpointError naming it when missing or corrupt."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing from {str(path.parent)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{str(path)!r} is not valid JSON; the checkpoint is corrupt") from None


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the unsplit model from all shards, checked against the index."""
    folder = resolve(path)
    if not (folder / INDEX).is_file():
        return _open(folder / SINGLE)
    index = read_json(folder / INDEX)
    if not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{str(folder / INDEX)!r} has no weight_map; it is not a sharded safetensors index")
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(_open(folder / shard))
    missing = sorted(set(index["weight_map"]) - set(merged))
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} listed in the index is in no shard ({len(missing)} missing)")
    return merged


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
    return _open(folder / AUX)


def load_stage(folder: Path, block: LocalBlock, same_cut: bool) -> None:
    """Restore a block's aux head, optimizer, schedule and step count (only when the cut is unchanged)."""
    if not same_cut:
        return
    k = block.index
    if block.aux is not None:
        prefix = f"stage{k}."
        aux = {n[len(prefix):]: t for n, t in load_aux(folder).items() if n.startswith(prefix)}
        check_against(aux, block.aux.state_dict(), f"{AUX} (stage {k})")
        block.aux.load_state_dict(aux)
    tensors = _open(folder / STATE_DIR / f"stage-{k}.safetensors")
    scalars = read_json(folder / STATE_DIR / f"stage-{k}.json")
    torch.set_rng_state(tensors.pop("rng.cpu"))
    if block.optimizer is not None and scalars["optimizer"] is not None:
        block.optimizer.load_state_dict(_unflatten_optimizer(tensors, scalars["optimizer"]))
    if block.lr_scheduler is not None and scalars["lr_scheduler"] is not None:
        block.lr_scheduler.load_state_dict(scalars["lr_scheduler"])
    block.steps = scalars["steps"]


def export(state: dict[str, torch.Tensor], out: str | Path, max_shard_bytes: int,
           source: Path | None = None) -> list[Path]:
    """Write `state` as one `model.safetensors`, or as HF shards + index when it exceeds `max_shard_bytes`; with a
    `source` checkpoint folder, its HF_FILES (config.json, tokenizer) too, so from_pretrained(out) loads it."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(folder / name)
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
        return [folder / SINGLE, *copied]
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _atomic_save(shard, folder / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _atomic_json({"metadata": {"total_size": total},
                  "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}, folder / INDEX)
    return [folder / n for n in names] + [folder / INDEX, *copied]


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
        p = p / (p / "latest").read_text().strip()
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
                   max_shard_bytes: int) -> list[Path]:
    """`export` the model tensors, plus the aux heads (if any) in training_state/aux-heads.safetensors."""
    files = export(state, out, max_shard_bytes)
    if aux:
        (Path(out) / STATE_DIR).mkdir(exist_ok=True)
        _atomic_save(aux, Path(out) / AUX)
        files.append(Path(out) / AUX)
    return files
