"""Checkpoint files: written atomically, read with ``weights_only=True``, checked before use."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from corinfomax.core.errors import UserError
from corinfomax.core.files import atomic_write

CHECKPOINT_FORMAT = "corinfomax-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, of another format, or of another architecture."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint written by `save_checkpoint` (safe: ``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle of another kind, random bytes...
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a CorInfoMax checkpoint (no {CHECKPOINT_FORMAT!r} format tag)")
    for key in ("config", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry; it cannot be used")
    return state


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
