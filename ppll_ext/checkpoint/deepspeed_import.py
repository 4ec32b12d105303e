"""Import of a DeepSpeed pipeline checkpoint (`layer_XX-model_states.pt`, loaded with weights_only) under the
unsplit model's names, with the aux heads ppll_ext's DeepSpeed adapter saved beside it."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from ppll_ext.checkpoint.export import export_bytes, replace_folder, write_model
from ppll_ext.checkpoint.layout import AUX, STATE_DIR, atomic_save, check_against
from ppll_ext.errors import CheckpointError
from ppll_ext.folders import member
from ppll_ext.models import LayeredModel

log = logging.getLogger(__name__)

_DS_LAYER = re.compile(r"^layer_(\d+)(-model_\d+)?-model_states\.pt$")

_DS_AUX = re.compile(r"^aux_head_(\d+)(-model_\d+)?-model_states\.pt$")


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
        names = write_model(state, folder, max_shard_bytes)
        if aux:
            (folder / STATE_DIR).mkdir()
            atomic_save(aux, folder / AUX)
            names.append(AUX)
        return names

    return replace_folder(out, overwrite, write, export_bytes(state) + export_bytes(aux))
