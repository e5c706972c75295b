"""Backbones by name, the projector, and the model that joins them.

Any torchvision classification model can be a backbone: its last linear layer (the classifier) is
replaced by an identity, so the backbone outputs pooled features. ResNet-style models can take the
CIFAR stem (3x3 stride-1 first convolution, no max-pool) for 32x32 images. ``tiny_resnet`` is a small,
fast ResNet for CPU budgets.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from corinfomax.core.errors import UserError

TINY_RESNET = "tiny_resnet"


class ModelConfigError(UserError):
    """An unknown backbone, an impossible projector string, or a stem the backbone cannot take."""


def available_backbones() -> list[str]:
    """Every name `build_backbone` accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models)) + [TINY_RESNET]


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet with one basic block per stage and widths 32-64-128-256 (~1.2M parameters).

    About 10x fewer multiply-adds than ResNet-18 on 32x32 inputs: the backbone for CPU budgets.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), cifar_stem: bool = True) -> None:
        super().__init__()
        if cifar_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU())
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(_BasicBlock(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the model's last nn.Linear with an identity; return its input width (the feature dim)."""
    last_name, last = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = module_name, module
    if last is None or last_name is None:
        raise ModelConfigError(f"backbone {name!r} has no linear classifier to remove; pick another backbone")
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    setattr(parent, last_name.rpartition(".")[2], nn.Identity())
    return last.in_features


def _apply_cifar_stem(model: nn.Module, name: str) -> None:
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ModelConfigError(
            f"the CIFAR stem applies to ResNet-style backbones (conv1 + maxpool); {name!r} has none. "
            "Use --no-cifar-stem or a resnet*/resnext*/wide_resnet* backbone."
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


def build_backbone(name: str, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """Build a randomly initialised backbone by name; return it and its feature dimension."""
    if name == TINY_RESNET:
        model = TinyResNet(cifar_stem=cifar_stem)
        return model, model.out_dim
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelConfigError(
            f"unknown backbone {name!r}. Choose {TINY_RESNET!r} or a torchvision classification model "
            "such as resnet18, resnet50, convnext_tiny, efficientnet_b0 (see `corinfomax train --list-backbones`)."
        )
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if cifar_stem:
        _apply_cifar_stem(model, name)
    return model, _strip_classifier(model, name)


def parse_projector(spec: str) -> list[int]:
    """Parse a projector string like '2048-2048-64' into layer widths."""
    try:
        sizes = [int(part) for part in spec.split("-")]
    except ValueError:
        sizes = []
    if not sizes or any(s <= 0 for s in sizes):
        raise ModelConfigError(
            f"impossible projector {spec!r}: expected positive layer widths joined by '-', e.g. '2048-2048-64'"
        )
    return sizes


def build_projector(in_dim: int, spec: str) -> nn.Sequential:
    """Linear-BN-ReLU for each hidden layer, then a final linear layer without bias."""
    sizes = [in_dim] + parse_projector(spec)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class CorInfoMaxModel(nn.Module):
    """Backbone plus projector. ``forward`` returns (features, projections)."""

    def __init__(self, backbone: str, projector: str, cifar_stem: bool = False) -> None:
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(backbone, cifar_stem)
        self.projector = build_projector(self.feature_dim, projector)
        self.embedding_dim = parse_projector(projector)[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        return features, self.projector(features)
