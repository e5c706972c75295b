"""Training configuration: one dataclass, the paper's recipes as presets, every field overridable, and
`validate`, which refuses a config that cannot train."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from corinfomax.core.errors import UserError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UserError):
    """An unknown preset, an unknown field, or a value of the wrong kind."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` beside its checkpoint."""

    data: str = ""
    out: str = "runs/default"
    preset: str = "cpu"
    dataset_name: str = ""
    # model
    backbone: str = "tiny_resnet"
    cifar_stem: bool = True
    image_size: int = 32
    projector: str = "1024-1024-64"
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    # views: the paper's two global views, or more global ones (many patches) and/or local crops (multi-crop)
    global_views: int = 2
    local_views: int = 0
    local_size: int = 0  # side of a local crop (0: half of image_size)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area range of a global view's random-resized crop
    local_scale: tuple[float, float] = (0.05, 0.4)  # area range of a local crop (DINO's)
    # loss
    alpha: float = 250.0
    la_R: float = 0.01
    la_mu: float = 0.01
    eps: float = 1e-8
    R_init: float = 1.0
    # optimisation
    optimizer: str = "sgd"  # sgd | lars
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0
    min_lr: float = 0.0
    epochs: int = 1000
    batch_size: int = 512
    # Minutes of training per invocation (0: no budget): a fresh run fits its epochs to it, and any run stops at
    # the step that spends it, with a resumable checkpoint (mid-epoch if need be).
    time_budget_min: float = 0.0
    checkpoint_every: int = 0  # also checkpoint every this many steps within an epoch (0: at epoch ends only)
    # data pipeline
    # tensor: batched on the training device (streamed files: crops in loader workers, colour ops batched)
    # | pil: the per-image PIL reference in loader workers
    augment: str = "tensor"
    workers: int = 4
    # runtime
    device: str = "auto"
    amp: bool = True  # bf16 autocast where it is faster: CUDA, and CPUs with native bf16 (AMX, AVX512-BF16)
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    max_bad_steps: int = 20
    online_probe: bool = True
    log_every: int = 20
    knn_every: int = 0  # epochs between kNN evaluations on --val-data (0: only at the end)
    val_data: str = ""
    tensorboard: bool = False  # also log the metrics as TensorBoard scalars under OUT/tensorboard

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        values = dict(values)
        for key in ("mean", "std", "crop_scale", "local_scale"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


_CIFAR = dict(cifar_stem=True, image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)

# The paper's recipes (arXiv:2209.07999, and its public code), plus a CPU budget.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        _CIFAR, dataset_name="cifar10", backbone="resnet18", projector="2048-2048-64", alpha=250.0,
        lr=0.5, weight_decay=1e-4, batch_size=512, epochs=1000, warmup_epochs=10,
    ),
    "cifar100": dict(
        _CIFAR, dataset_name="cifar100", backbone="resnet18", projector="4096-4096-128", alpha=1000.0,
        lr=0.5, weight_decay=1e-4, batch_size=512, epochs=1000, warmup_epochs=10,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    ),
    # The authors' README command for Tiny ImageNet: forgetting factors 0.1 where CIFAR uses 0.01.
    "tiny-imagenet": dict(
        _IMAGENET, dataset_name="tiny-imagenet", backbone="resnet50", cifar_stem=True, image_size=64,
        projector="4096-4096-128", alpha=500.0, la_R=0.1, la_mu=0.1, lr=0.5, weight_decay=1e-4, batch_size=1024,
        epochs=800, warmup_epochs=10,
    ),
    # The authors' ImageNet-100 ResNet-18 run (their README command and imagenet100_resnet18/ code): torchvision
    # ResNet-18 with its ImageNet stem at 224 px, plain SGD (no LARS), lr 1.0 over a global batch of 1024 (8 GPUs),
    # alpha 500, 400 epochs with 10 of linear warm-up, cosine to 5e-3. Streams the files (image_size > 64).
    "imagenet100": dict(
        _IMAGENET, dataset_name="imagenet100", backbone="resnet18", cifar_stem=False, image_size=224,
        projector="4096-4096-128", alpha=500.0, optimizer="sgd", lr=1.0, min_lr=5e-3, weight_decay=1e-4,
        batch_size=1024, epochs=400, warmup_epochs=10, workers=8, checkpoint_every=20,
    ),
    # A folder of photos on a CPU in about an hour: tiny_resnet with the ImageNet stem (7x7 stride-2 conv and a
    # max-pool, /4), so a 128-px crop reaches the blocks at 32x32, the grid the cpu preset trains at: about the
    # same cost per image as CIFAR on the CPU, at four times the resolution. Files stream through 2 workers; batch
    # 128 rather than 256 because a CPU hour affords few steps.
    "photo": dict(
        _IMAGENET, dataset_name="photos", backbone="tiny_resnet", cifar_stem=False, image_size=128,
        projector="1024-1024-64", alpha=250.0, lr=0.3, weight_decay=1e-4, batch_size=128, epochs=100,
        warmup_epochs=1, time_budget_min=60.0, workers=2, checkpoint_every=20,
    ),
    # A CPU budget: a small ResNet on 32x32 images, a narrower projector, a time limit instead of epochs.
    "cpu": dict(
        _CIFAR, dataset_name="cifar10", backbone="tiny_resnet", projector="1024-1024-64", alpha=250.0,
        lr=0.3, weight_decay=1e-4, batch_size=256, epochs=30, warmup_epochs=1, time_budget_min=50.0,
        workers=0,
    ),
}


def resolve(preset: str, overrides: dict[str, Any]) -> TrainConfig:
    """Start from a preset, apply command-line overrides (only those given)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig.from_dict(values)


def validate(config: TrainConfig) -> None:
    """Refuse a config that cannot train, before anything is read or written."""
    if config.augment not in ("tensor", "pil"):
        raise ConfigError(f"unknown augmentation pipeline {config.augment!r}; use 'tensor' or 'pil'")
    if config.optimizer not in ("sgd", "lars"):
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; use 'sgd' or 'lars'")
    if config.image_size < 8:
        raise ConfigError(f"image_size {config.image_size} is too small; use at least 8")
    if config.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be 0 (epoch ends only) or more, got {config.checkpoint_every}")
    for name in ("epochs", "batch_size", "max_bad_steps", "log_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.global_views < 1 or config.local_views < 0 or config.global_views + config.local_views < 2:
        raise ConfigError(f"need at least two views per image, got --global-views {config.global_views} and "
                          f"--local-views {config.local_views}")
    if config.augment == "pil" and (config.global_views, config.local_views) != (2, 0):
        raise ConfigError("the PIL reference pipeline makes the paper's two views only; use --augment tensor for "
                          "more views")
    if config.local_views and not 8 <= (config.local_size or config.image_size // 2) <= config.image_size:
        raise ConfigError(f"--local-size must be between 8 and the image size {config.image_size}, got "
                          f"{config.local_size or config.image_size // 2}")
    if config.lr <= 0 or not math.isfinite(config.lr):
        raise ConfigError(f"--lr must be a positive number, got {config.lr}")
    if config.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {config.workers}")
