"""The run's record: ``metrics.jsonl`` (one JSON object a line, docs/FORMATS.md) and, with ``--tensorboard``, the
same numbers for TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

import torch


class MetricsLog:
    """metrics.jsonl, the run's record (docs/FORMATS.md), and optionally the same numbers for TensorBoard."""

    def __init__(self, path: Path, fresh: bool, tensorboard: Path | None) -> None:
        self.file: IO[str] = open(path, "w" if fresh else "a")
        self.writer = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package (train extra)

            self.writer = SummaryWriter(str(tensorboard))

    def write(self, record: dict[str, Any], group: str | None) -> None:
        """Append one record; a ``group`` ("step" or "epoch") also sends its numbers to TensorBoard."""
        self.file.write(json.dumps({"time": time.time(), **record}) + "\n")
        self.file.flush()
        if self.writer is not None and group is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{group}/{key}", value, step)
            if "eigenvalues" in record:
                self.writer.add_histogram("epoch/eigenvalues", torch.tensor(record["eigenvalues"]), step)
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def log_record(metrics: MetricsLog | None, record: dict[str, Any], group: str | None = None) -> None:
    """Append ``record`` where this process keeps the log (rank 0); other ranks pass None."""
    if metrics is not None:
        metrics.write(record, group)
