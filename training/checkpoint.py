"""Checkpoint files: written atomically, read with ``weights_only=True``, checked before use."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corinfomax.core.errors import UserError
from corinfomax.core.files import atomic_write
from corinfomax.training.models import CorInfoMaxModel

CHECKPOINT_FORMAT = "corinfomax-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, of another format, or of another architecture."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically: a crash leaves the old file intact.

    A state holding a non-finite tensor is refused (CheckpointError): a diverged model must never replace
    the last good checkpoint, nor reach export."""
    path = Path(path)
    bad = non_finite(state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"refusing to write {path}: {len(bad)} tensor(s) hold NaN or inf ({shown}); the "
                              "run diverged. Lower --lr or raise --eps; the previous checkpoint, if any, is intact.")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def non_finite(state: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict/list ``state`` that hold NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items for name in non_finite(value, f"{prefix}.{key}" if prefix else str(key))]


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


def load_weights(module: nn.Module, weights: dict[str, Any], what: str, path: str | Path, hint: str) -> None:
    """Load ``weights`` into ``module``; a mismatch is a CheckpointError naming ``what``, the file and ``hint``
    (what the user can do about it)."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1:2] or [str(err)[:200]]
        raise CheckpointError(f"{path} holds a {what} of another architecture ({first[0].strip()}); {hint}") from None


def load_model(state: dict[str, Any], path: str | Path) -> CorInfoMaxModel:
    """Rebuild a checkpoint's model from its own config and load its weights (the one checkpoint -> model path:
    eval, export and anything else reading a finished run)."""
    config = state["config"]
    missing = [k for k in ("backbone", "projector", "cifar_stem", "image_size", "mean", "std") if k not in config]
    if missing:
        raise CheckpointError(f"{path}: the config lacks {', '.join(missing)}; "
                              "it was not written by `corinfomax train`")
    model = CorInfoMaxModel(config["backbone"], config["projector"], bool(config["cifar_stem"]))
    hint = (f"its config says backbone {config['backbone']!r}, projector {config['projector']!r}, "
            f"cifar_stem={config['cifar_stem']}: the checkpoint was altered or not written by `corinfomax train`")
    load_weights(model, state["model"], "model", path, hint)
    return model


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
