"""The run folder (``--out``): what it holds and how a run resumes from it (docs/FORMATS.md).

A run reads the folder's checkpoint, if any (`saved_run`: the configs must agree up to `RUNTIME_FIELDS`, see
`check_resume`), loads it into the model it built (`restore_run`) and continues where it stopped
(`resume_position`). Rank 0 then opens the folder (`open_run_folder`: ``config.json``, ``metrics.jsonl``
trimmed back to the checkpoint's step) and writes ``checkpoint.pt`` at epoch ends and, with
``--checkpoint-every``, within epochs (`write_checkpoint`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corinfomax.core.errors import UserError
from corinfomax.core.files import atomic_write_text
from corinfomax.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_weights, save_checkpoint
from corinfomax.training.config import TrainConfig
from corinfomax.training.loss import CorInfoMaxLoss
from corinfomax.training.metrics_log import MetricsLog, log_record
from corinfomax.training.run import LoopState, Run

log = logging.getLogger(__name__)

# Fields that may change between a run and its resumption without changing what is trained.
RUNTIME_FIELDS = {"out", "workers", "device", "log_every", "time_budget_min", "compile", "knn_every", "val_data",
                  "data", "checkpoint_every", "tensorboard"}

# What to do when the run folder's checkpoint does not fit the model this config builds.
RESUME_HINT = "it cannot be resumed with this config. Use another --out for the new architecture."


class ResumeConflict(UserError):
    """The run folder holds a checkpoint trained with a different config."""


def saved_run(config: TrainConfig, allow_change: bool) -> tuple[dict[str, Any] | None, dict[str, list[Any]]]:
    """The checkpoint in ``config.out`` to resume (None: a new run) and the recipe fields this invocation changes
    (`check_resume`). Unless changes are allowed, the saved epochs stay: a budget-fitted schedule is fixed."""
    path = Path(config.out) / CHECKPOINT_FILE
    if not path.is_file():
        return None, {}
    saved = load_checkpoint(path)
    changes = check_resume(config, saved["config"], allow_change)
    if not allow_change:
        config.epochs = int(saved["config"]["epochs"])
    return saved, changes


def check_resume(config: TrainConfig, saved: dict[str, Any], allow_change: bool) -> dict[str, list[Any]]:
    """The recipe fields this invocation changes, as {field: [saved, new]}; refused unless ``allow_change``."""
    # A field the saved config lacks (added since that run) had its default value then.
    defaults = TrainConfig().to_dict()
    changed = {k for k, v in config.to_dict().items()
               if k not in RUNTIME_FIELDS and _plain(saved.get(k, defaults[k])) != _plain(v)}
    # A run with a time budget saved the epochs fitted to it; the same command asks for the preset's epochs again.
    refused = changed - ({"epochs"} if saved.get("time_budget_min") else set())
    if refused and not allow_change:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in sorted(refused))
        raise ResumeConflict(
            f"{config.out} holds a run with a different config ({details}). Use another --out, or pass "
            "--allow-config-change to resume with the new values."
        )
    if not allow_change:
        return {}  # the caller keeps the saved epochs
    return {k: [saved.get(k), _plain(getattr(config, k))] for k in sorted(changed)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def restore_run(saved: dict[str, Any], path: Path, *, model: nn.Module, loss_fn: CorInfoMaxLoss,
                optimizer: torch.optim.Optimizer, probe: nn.Module | None,
                probe_opt: torch.optim.Optimizer | None) -> None:
    """Load the saved run (read from ``path``) into the freshly built model, loss state, optimizers and probe, and
    put torch's random generators back where they were."""
    load_weights(model, saved["model"], "model", path, RESUME_HINT)
    load_weights(loss_fn, saved["loss"], "loss state", path, RESUME_HINT)
    optimizer.load_state_dict(saved["optimizer"])
    if probe is not None and "probe" in saved:
        load_weights(probe, saved["probe"], "online probe", path, RESUME_HINT)
        probe_opt.load_state_dict(saved["probe_optimizer"])  # type: ignore[union-attr]
    _restore_rng(saved["rng"])
    log.info("resuming %s at epoch %d batch %d (step %d)", path.parent, int(saved["epoch"]),
             int(saved.get("epoch_batch", 0)), int(saved["step"]))


def _restore_rng(state: dict[str, Any]) -> None:
    """Put back the generators `_rng_state` saved (the GPUs' only where this machine has them)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_position(saved: dict[str, Any] | None) -> LoopState:
    """Where the loop starts: at the beginning, or where the saved run stopped (within an epoch: with that
    epoch's sums so far)."""
    if saved is None:
        return LoopState(epoch=0, step=0)
    state = LoopState(epoch=int(saved["epoch"]), step=int(saved["step"]), batch=int(saved.get("epoch_batch", 0)))
    if state.batch:
        state.sums, state.good_steps = saved["epoch_sums"], int(saved["epoch_good_steps"])
    return state


def open_run_folder(run: Run, step: int, fresh: bool) -> MetricsLog:
    """Rank 0, as the loop starts: create the folder, write ``config.json``, trim ``metrics.jsonl`` back to the
    checkpoint's ``step`` (a resumed run), open it and record what the run trains on."""
    out, config, data = run.out, run.config, run.data
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.to_dict())
    if not fresh:
        _trim_metrics(out / "metrics.jsonl", step)
    metrics = MetricsLog(out / "metrics.jsonl", fresh, out / "tensorboard" if config.tensorboard else None)
    log_record(metrics, {"event": "data", "step": step, "images": len(data), "skipped": data.skipped,
                         "classes": len(data.classes), "world_size": run.ddp.world, "device": str(run.device),
                         **({"config_changes": run.changes} if run.changes else {})})
    return metrics


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop the records logged after the checkpoint we resume from, so the file has no repeated steps."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(kept))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (``config.json``)."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def write_checkpoint(run: Run, state: LoopState, metrics: dict[str, Any] | None = None,
                     mid_epoch: bool = False) -> None:
    """Write the checkpoint (rank 0): at an epoch's end, or within one (``mid_epoch``: with the batch reached and
    the epoch's sums so far, so a resumed run continues that epoch exactly)."""
    if not run.ddp.main:
        return
    probe = ({"probe": run.probe.state_dict(), "probe_optimizer": run.probe_opt.state_dict()}
             if run.probe is not None and run.probe_opt is not None else {})
    position = ({"epoch": state.epoch, "epoch_batch": state.batch, "epoch_sums": state.sums.clone(),
                 "epoch_good_steps": state.good_steps} if mid_epoch else {"epoch": state.epoch + 1})
    save_checkpoint(run.checkpoint, {
        "config": run.config.to_dict(), "model": run.model.state_dict(), "loss": run.loss_fn.state_dict(),
        "optimizer": run.optimizer.state_dict(), "step": state.step, "rng": _rng_state(), **probe, **position,
        "metrics": metrics or {},
    })


def _rng_state() -> dict[str, Any]:
    """Torch's global random generators (CPU and every GPU), saved in each checkpoint."""
    # Data order, batched augmentation and PIL augmentation use generators seeded from (seed, epoch, index);
    # torch's global generators are saved for anything else a model may draw (e.g. dropout).
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
