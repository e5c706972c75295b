"""One optimisation step (`train_step`): bf16 autocast, every view through the model, the CorInfoMax loss, the
online probe, and the NaN guard, which rolls a non-finite step back and stops a run that keeps diverging."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from corinfomax.core.errors import UserError
from corinfomax.training.distributed import bf16_is_fast
from corinfomax.training.metrics_log import log_record
from corinfomax.training.run import LoopState, Run

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or model state."""


def train_step(run: Run, state: LoopState, lr: float, views: list[Tensor], labels: Tensor) -> Tensor | None:
    """One optimisation step (and one online-probe step); returns the float64 loss terms, or None for a
    step skipped by the NaN guard, which then rolls the whole state back (`StepGuard`)."""
    config, device = run.config, run.device
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if config.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    run.guard.save()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp and bf16_is_fast(device)):
        f1, z = _project(run.train_model, views, config.global_views)
    out_loss = run.loss_fn(*z)
    run.optimizer.zero_grad(set_to_none=True)
    out_loss.loss.backward()
    run.optimizer.step()
    correct = torch.zeros((), device=device)
    if run.train_probe is not None and run.probe_opt is not None:
        logits = run.train_probe(f1.detach().to(torch.get_default_dtype()))  # bf16 under autocast
        probe_loss = nn.functional.cross_entropy(logits, labels)
        run.probe_opt.zero_grad(set_to_none=True)
        probe_loss.backward()
        run.probe_opt.step()
        correct = (logits.argmax(1) == labels).sum()
    terms = torch.stack([out_loss.loss, out_loss.attraction, out_loss.big_bang]).detach().double()
    ok = (run.guard.finite(device) & torch.isfinite(terms).all()).to(torch.int32)
    if run.ddp.world > 1:  # every rank skips or none does
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    # One host sync per step, on detached values (no autograd-tensor-to-float conversions).
    host = torch.cat([terms, correct.double().view(1), ok.double().view(1)]).cpu()
    if not host[-1]:
        run.guard.restore()
        _skip_step(run, state)
        return None
    state.bad_steps = 0
    if run.train_probe is not None:
        state.sums[3] += host[3]
        state.sums[4] += len(labels)
    state.step += 1
    state.good_steps += 1
    state.window_images += len(labels) * run.ddp.world
    state.sums[:3] += host[:3]
    return host[:3]


def _project(model: nn.Module, views: list[Tensor], global_views: int) -> tuple[Tensor, list[Tensor]]:
    """The first view's backbone features (for the online probe) and every view's projection.

    Each global view is its own forward pass (batch-norm statistics per view, as the paper's two views);
    the local crops, all of one size, share one pass, which is faster than many small ones.
    """
    features, z = model(views[0])
    projections = [z] + [model(v)[1] for v in views[1:global_views]]
    if len(views) > global_views:
        projections += model(torch.cat(views[global_views:]))[1].chunk(len(views) - global_views)
    return features, projections


def _skip_step(run: Run, state: LoopState) -> None:
    """The NaN guard: skip a step that left a non-finite loss or state; stop after ``max_bad_steps`` in a row."""
    state.bad_steps += 1
    log.warning("non-finite loss or model state at step %d (%d in a row): step skipped and rolled back",
                state.step, state.bad_steps)
    log_record(run.metrics, {"event": "skipped_step", "step": state.step, "epoch": state.epoch,
                             "consecutive": state.bad_steps})
    if state.bad_steps >= run.config.max_bad_steps:
        advice = (f"The last good checkpoint ({run.checkpoint}) is intact; lower --lr or raise --eps and resume "
                  "with --allow-config-change." if run.checkpoint.exists() else
                  "No epoch finished, so nothing was saved; lower --lr or raise --eps and start again.")
        raise TrainingDiverged(f"{state.bad_steps} consecutive steps with a non-finite loss or model state at step "
                               f"{state.step}: training diverged. {advice}")
    state.step += 1
