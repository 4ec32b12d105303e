"""Layered models: the layers compose to the model bit for bit, share its tensors and name them back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ppll_ext.errors import ConfigError
from ppll_ext.models import (
    MODEL_NAMES,
    LayeredModel,
    ModelConfig,
    build_model,
    original_names,
    resnet_layered,
    vit_layered,
)

CASES = [
    pytest.param("resnet8", 1, 8, id="resnet8-1x8"),
    pytest.param("resnet8", 3, 32, id="resnet8-3x32"),
    pytest.param("resnet8", 3, 96, id="resnet8-3x96"),
    pytest.param("resnet32", 1, 8, id="resnet32-1x8"),
    pytest.param("resnet32", 3, 32, id="resnet32-3x32"),
    pytest.param("resnet110", 1, 8, id="resnet110-1x8"),
    pytest.param("resnet110", 3, 32, id="resnet110-3x32"),
    pytest.param("vit", 3, 32, id="vit-3x32"),
    pytest.param("vit", 1, 8, id="vit-1x8"),
]


def _build(name: str, channels: int, size: int, dropout: float = 0.0) -> LayeredModel:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, width=8, patch_size=2, depth=2, hidden_dim=32, heads=2, mlp_dim=64, dropout=dropout)
    return build_model(cfg, in_channels=channels, image_size=size, num_classes=10)


def _input(channels: int, size: int) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("name", "channels", "size"), CASES)
def test_layers_compose_to_model_in_eval_and_train(name: str, channels: int, size: int) -> None:
    lm = _build(name, channels, size)
    x = _input(channels, size)
    lm.model.eval()
    with torch.no_grad():
        expected = lm.model(x)
        assert expected.shape == (2, 10)
        assert torch.equal(lm.sequential()(x), expected)
    # Train-mode BatchNorm updates running stats, so each side runs once on its own copy (deepcopy keeps the sharing).
    twin = copy.deepcopy(lm)
    lm.model.train()
    twin.model.train()
    with torch.no_grad():
        assert torch.equal(twin.sequential()(x), lm.model(x))
    stats = twin.model.state_dict()
    for key, tensor in lm.model.state_dict().items():
        assert torch.equal(stats[key], tensor), key


def test_vit_dropout_draws_random_numbers_in_the_same_order() -> None:
    lm = _build("vit", 3, 32, dropout=0.1)
    lm.model.train()
    x = _input(3, 32)
    torch.manual_seed(5)
    expected = lm.model(x)
    torch.manual_seed(5)
    assert torch.equal(lm.sequential()(x), expected)


@pytest.mark.parametrize(("name", "channels", "size"), CASES)
def test_key_maps_partition_the_state_dict(name: str, channels: int, size: int) -> None:
    lm = _build(name, channels, size)
    full = lm.model.state_dict(keep_vars=True)
    seen: set[str] = set()
    for layer in lm.layers:
        mapping = lm.key_map(layer)
        assert seen.isdisjoint(mapping.values())
        seen.update(mapping.values())
        own = layer.state_dict(keep_vars=True)
        for key, original in mapping.items():
            assert own[key] is full[original]
    assert seen == set(full)


@pytest.mark.parametrize(("name", "channels", "size"), CASES)
def test_layers_share_storage_with_model(name: str, channels: int, size: int) -> None:
    lm = _build(name, channels, size)
    full = lm.model.state_dict()
    for layer in lm.layers:
        mapping = lm.key_map(layer)
        for key, param in layer.named_parameters():
            before = full[mapping[key]].clone()
            with torch.no_grad():
                param.add_(1.0)
            assert torch.equal(full[mapping[key]], before + 1.0)


def test_layer_counts_and_names() -> None:
    lengths = {n: len(_build(n, 3, 32)) for n in ("resnet8", "resnet20", "resnet32", "resnet110", "vit")}
    assert lengths == {"resnet8": 5, "resnet20": 11, "resnet32": 17, "resnet110": 56, "vit": 4}
    assert _build("resnet56", 3, 32).name == "resnet56"
    assert MODEL_NAMES == ("resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "vit", "gpt2", "llama")


def test_resnet_structure() -> None:
    model = resnet_layered(20, 10, in_channels=3, width=16).model
    assert model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert [len(g) for g in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut, nn.Sequential) and model.layer2[0].conv1.stride == (2, 2)
    assert model.layer3[-1].conv2.out_channels == 64 and model.fc.in_features == 64
    assert torch.equal(model.bn1.weight, torch.ones(16)) and torch.equal(model.bn1.bias, torch.zeros(16))


def test_slices_compose() -> None:
    lm = _build("resnet32", 3, 32)
    lm.model.eval()
    x = _input(3, 32)
    with torch.no_grad():
        assert torch.equal(lm.sequential(6)(lm.sequential(0, 6)(x)), lm.model(x))
    assert lm.key_map(lm.sequential(3, 4)) == {f"0.{k}": f"layer1.2.{k}" for k in lm.layers[3].state_dict()}


def test_vit_keeps_torchvision_parameters() -> None:
    lm = vit_layered(8, 2, 2, 32, 2, 64, 0.0, 10, in_channels=1)
    embed = lm.layers[0]
    assert embed.class_token is lm.model.class_token
    assert embed.pos_embedding is lm.model.encoder.pos_embedding
    assert lm.model.conv_proj.in_channels == 1
    assert original_names(lm.model, embed)["conv_proj.weight"] == "conv_proj.weight"


def test_original_names_rejects_foreign_tensors() -> None:
    lm = _build("resnet8", 3, 8)
    with pytest.raises(ConfigError, match="not in CifarResNet"):
        original_names(lm.model, nn.Sequential(lm.layers[0], nn.Linear(2, 2)))


def test_bad_configs_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"depth=21 .*20, 32, 56 or 110"):
        resnet_layered(21, 10)
    with pytest.raises(ConfigError, match=r"model.name='foo' is not one of resnet8, resnet20, .*, vit"):
        build_model(ModelConfig(name="foo"), in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(ConfigError, match="patch_size=3 does not divide image_size=32"):
        build_model(ModelConfig(name="vit", patch_size=3), in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(ConfigError, match="hidden_dim=32 is not divisible by heads=3"):
        vit_layered(32, 4, 1, 32, 3, 64, 0.0, 10)
    with pytest.raises(ConfigError, match="expects 8x8 images, got 16x16"):
        vit_layered(8, 2, 1, 32, 2, 64, 0.0, 10).layers[0](torch.zeros(1, 3, 16, 16))
