"""Backbones by name, the CIFAR stem, the projector string, and the model that joins them (issue 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from corinfomax.training.models import (
    TINY_RESNET,
    CorInfoMaxModel,
    ModelConfigError,
    available_backbones,
    build_backbone,
    build_projector,
    parse_projector,
)


def features_of(backbone: nn.Module, size: int) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(torch.rand(2, 3, size, size))


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048), (TINY_RESNET, 256)])
@pytest.mark.parametrize("cifar_stem", [True, False])
def test_resnet_feature_dims(name: str, dim: int, cifar_stem: bool) -> None:
    backbone, feature_dim = build_backbone(name, cifar_stem=cifar_stem)
    assert feature_dim == dim
    assert features_of(backbone, 32).shape == (2, dim)


def test_cifar_stem_is_3x3_stride_1_without_maxpool() -> None:
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    assert isinstance(backbone.conv1, nn.Conv2d) and isinstance(backbone.maxpool, nn.Identity)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    plain, _ = build_backbone("resnet18", cifar_stem=False)
    assert isinstance(plain.conv1, nn.Conv2d) and isinstance(plain.maxpool, nn.MaxPool2d)
    assert plain.conv1.kernel_size == (7, 7)


@pytest.mark.parametrize(
    "name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5", "densenet121"]
)
def test_other_torchvision_families_build(name: str) -> None:
    backbone, feature_dim = build_backbone(name)
    assert features_of(backbone, 64).shape == (2, feature_dim)


def test_available_backbones_lists_torchvision_and_tiny() -> None:
    names = available_backbones()
    assert {"resnet18", "resnet50", "convnext_tiny", TINY_RESNET} <= set(names)


def test_unknown_backbone_is_a_helpful_error() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown backbone 'resnet19'.*resnet18"):
        build_backbone("resnet19")


def test_cifar_stem_on_a_non_resnet_is_an_error() -> None:
    with pytest.raises(ModelConfigError, match="no-cifar-stem"):
        build_backbone("mobilenet_v3_small", cifar_stem=True)


@pytest.mark.parametrize("spec", ["", "abc", "2048-0-64", "64-", "-64", "2048--64", "64.5", "-3"])
def test_impossible_projector_strings(spec: str) -> None:
    with pytest.raises(ModelConfigError, match="impossible projector"):
        parse_projector(spec)


def test_projector_layers_and_last_linear_without_bias() -> None:
    assert parse_projector("2048-2048-64") == [2048, 2048, 64]
    projector = build_projector(512, "128-96-16")
    linears = [m for m in projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 128), (128, 96), (96, 16)]
    assert linears[-1].bias is None
    assert sum(isinstance(m, nn.BatchNorm1d) for m in projector) == 2
    assert isinstance(projector[-1], nn.Linear)


def test_model_returns_features_and_projections() -> None:
    model = CorInfoMaxModel(TINY_RESNET, "64-32", cifar_stem=True)
    assert (model.feature_dim, model.embedding_dim) == (256, 32)
    features, projections = model(torch.rand(4, 3, 32, 32))
    assert features.shape == (4, 256) and projections.shape == (4, 32)
