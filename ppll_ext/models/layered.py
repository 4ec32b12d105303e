"""A model together with its ordered list of layers, the unit that partitioning cuts into pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ppll_ext.core.payload import Chain
from ppll_ext.errors import ConfigError


def original_names(model: nn.Module, part: nn.Module) -> dict[str, str]:
    """Map each key of `part.state_dict()` to the key of the same tensor object in `model.state_dict()`.

    Matching is by identity, so checkpoints of a stage can be written under the unsplit model's names.
    """
    names: dict[int, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), key)
    mapping: dict[str, str] = {}
    missing: list[str] = []
    for key, tensor in part.state_dict(keep_vars=True).items():
        if id(tensor) in names:
            mapping[key] = names[id(tensor)]
        else:
            missing.append(key)
    if missing:
        raise ConfigError(
            f"tensors {', '.join(missing)} of {type(part).__name__} are not in {type(model).__name__}; "
            "layers must share the model's parameters and buffers, not copies"
        )
    return mapping


@dataclass(eq=False)
class LayeredModel:
    """An unsplit model and the ordered layers it is made of; the layers share the model's tensors."""

    model: nn.Module
    """The original model; `nn.Sequential(*layers)(x)` equals `model(x)` bit for bit."""
    layers: list[nn.Module]
    """Ordered layers holding references to the model's submodules and parameters."""
    name: str
    """Model name, e.g. resnet32 or vit."""

    def sequential(self, start: int = 0, stop: int | None = None) -> Chain:
        """The layers `start:stop` as one module (a stage's body), passing several tensors on as the model does."""
        return Chain(*self.layers[start:stop])

    def key_map(self, part: nn.Module) -> dict[str, str]:
        """Names of `part`'s tensors in the unsplit model's state dict."""
        return original_names(self.model, part)

    def __len__(self) -> int:
        return len(self.layers)
