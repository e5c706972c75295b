"""Helpers shared by the training tests: small CIFAR-10 folders (symlinks, never copies) and tiny configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corinfomax.training.config import TrainConfig, resolve


def small_folder(cifar10: Path, dest: Path, per_class: int, split: str = "train") -> Path:
    """An ImageFolder tree of symlinks to the first ``per_class`` images of each CIFAR-10 class."""
    for class_dir in sorted((cifar10 / split).iterdir()):
        target = dest / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            (target / image.name).symlink_to(image.resolve())
    return dest


def tiny_config(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    """tiny_resnet on 16 px images, projector 64-32, batch 32, 2 epochs, CPU, no time budget, every step logged."""
    values: dict[str, Any] = dict(data=str(data), out=str(out), projector="64-32", batch_size=32, epochs=2,
                                  image_size=16,
                                  warmup_epochs=0.5, lr=0.05, time_budget_min=0.0, log_every=1, workers=0,
                                  device="cpu")
    return resolve("cpu", {**values, **overrides})
