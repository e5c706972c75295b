"""Helpers shared by the training tests: tiny configs (small folders: ``datakit``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corinfomax.training.config import TrainConfig, resolve


def tiny_config(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    """tiny_resnet on 16 px images, projector 64-32, batch 32, 2 epochs, CPU in float32 (whether bf16 autocast is
    on would depend on the CPU: ``test_bf16_autocast_trains_on_any_cpu`` forces it), no time budget, every step
    logged."""
    values: dict[str, Any] = dict(data=str(data), out=str(out), projector="64-32", batch_size=32, epochs=2,
                                  image_size=16,
                                  warmup_epochs=0.5, lr=0.05, time_budget_min=0.0, log_every=1, workers=0,
                                  device="cpu", amp=False)
    return resolve("cpu", {**values, **overrides})
