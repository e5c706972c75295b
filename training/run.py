"""What a training run works with (`Run`) and where its loop is (`LoopState`): the two objects the loop, the
step, the time budget and the run folder pass around."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corinfomax.training.batches import BatchSource
from corinfomax.training.checkpoint import CHECKPOINT_FILE
from corinfomax.training.config import TrainConfig
from corinfomax.training.data import DecodedImages
from corinfomax.training.distributed import Dist
from corinfomax.training.guard import StepGuard
from corinfomax.training.loss import CorInfoMaxLoss
from corinfomax.training.metrics_log import MetricsLog
from corinfomax.training.models import CorInfoMaxModel
from corinfomax.training.stream import ImageFiles


@dataclass(kw_only=True)
class Run:
    """What one training run works with; fixed once the loop starts. Built with keywords only: many of its
    fields share a type (two models, two probes, two optimizers)."""

    config: TrainConfig
    ddp: Dist
    device: torch.device
    out: Path
    source: BatchSource
    data: DecodedImages | ImageFiles
    train_model: nn.Module  # `model` wrapped for DDP and/or compiled
    model: CorInfoMaxModel
    loss_fn: CorInfoMaxLoss
    optimizer: torch.optim.Optimizer
    train_probe: nn.Module | None
    probe: nn.Module | None
    probe_opt: torch.optim.Optimizer | None
    guard: StepGuard
    changes: dict[str, list[Any]]  # recipe fields a resume changed, {field: [before, now]}: provenance reads them
    metrics: MetricsLog | None = None  # metrics.jsonl (and TensorBoard), open on rank 0

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT_FILE


@dataclass
class LoopState:
    """Where the loop is, and what the current epoch has summed so far."""

    epoch: int
    step: int
    batch: int = 0  # batches of the current epoch done (non-zero at the start of a run resumed mid-epoch)
    started: float = field(default_factory=time.monotonic)
    bad_steps: int = 0  # consecutive steps skipped by the NaN guard
    # Epoch sums: loss, attraction, big_bang, online-probe correct, online-probe seen.
    sums: Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))
    good_steps: int = 0
    window_start: float = field(default_factory=time.monotonic)
    window_images: int = 0

    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch``, unless it is the one a mid-epoch resume continues (its sums are restored)."""
        if self.batch and epoch == self.epoch:
            return
        self.epoch, self.batch, self.sums, self.good_steps = epoch, 0, torch.zeros(5, dtype=torch.float64), 0
        self.window_start, self.window_images = time.monotonic(), 0
