"""Helpers shared by the training tests: tiny configs (small folders: ``datakit``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corinfomax.training.config import TrainConfig, resolve


def tiny_config(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    """tiny_resnet on 16 px images, projector 64-32, batch 32, 2 epochs, CPU, no time budget, every step logged."""
    values: dict[str, Any] = dict(data=str(data), out=str(out), projector="64-32", batch_size=32, epochs=2,
                                  image_size=16,
                                  warmup_epochs=0.5, lr=0.05, time_budget_min=0.0, log_every=1, workers=0,
                                  device="cpu")
    return resolve("cpu", {**values, **overrides})
