"""The time budget (``--time-budget-min``): a fresh run times a window of its first epoch's steps and fits the
number of epochs to the budget (`ScheduleFit`: `budget_window`, `fit_budget`); every run stops, resumable, once
this invocation has trained for the whole budget (`budget_spent`, `budget_stop`)."""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from corinfomax.training.config import TrainConfig
from corinfomax.training.distributed import Dist
from corinfomax.training.metrics_log import log_record
from corinfomax.training.run import LoopState, Run

log = logging.getLogger(__name__)

# --time-budget-min fits the epochs to the speed of steps [10, 30) of the first epoch. The first steps are slow
# (cuDNN autotuning, torch.compile, loader start-up): on an H100, timing steps 1-12 overestimated the step 3x.
BUDGET_SKIP_STEPS, BUDGET_TIMED_STEPS = 10, 20

# Share of the time budget the schedule is fitted to. The rest absorbs what epoch 0's timed steps do not see
# (end-of-epoch checkpoints and kNN read-outs, speed drift), so that the hard stop at the full budget does not
# cut off the schedule's last, low-learning-rate steps, which are where the features settle.
BUDGET_FIT_SHARE = 0.9


def budget_window(steps_per_epoch: int) -> tuple[int, int]:
    """The first epoch's steps [start, end) timed to fit --time-budget-min: after the warm-up steps."""
    start = min(BUDGET_SKIP_STEPS, steps_per_epoch // 2)
    return start, min(steps_per_epoch, start + BUDGET_TIMED_STEPS)


def fit_budget(config: TrainConfig, steps_per_epoch: int, seconds_per_step: float, ddp: Dist,
               device: torch.device) -> int:
    """Epochs that fit `BUDGET_FIT_SHARE` of the time budget at the measured speed (all ranks agree)."""
    seconds = BUDGET_FIT_SHARE * config.time_budget_min * 60
    epochs = max(1, min(config.epochs, int(seconds / (seconds_per_step * steps_per_epoch))))
    if ddp.world > 1:
        t = torch.tensor([epochs], device=device)
        dist.broadcast(t, 0)
        epochs = int(t.item())
    if epochs < config.epochs:  # the user asked for more: say so, and how to keep them
        log.warning("time budget %.0f min at %.3f s/step: schedule shortened from --epochs %d to %d "
                    "(--time-budget-min 0 keeps --epochs)", config.time_budget_min, seconds_per_step,
                    config.epochs, epochs)
    else:
        log.info("time budget %.0f min at %.3f s/step: all %d epoch(s) fit", config.time_budget_min,
                 seconds_per_step, epochs)
    return epochs


class ScheduleFit:
    """A fresh run's fit of its schedule to the time budget: times epoch 0's steps in `budget_window`, then
    `fit_budget` at the speed measured."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.start, self.end = budget_window(steps_per_epoch)
        self.timer = time.monotonic()  # a window that starts at step 0 starts now

    def after_batch(self, run: Run, batch: int) -> int | None:
        """Call after epoch 0's batch ``batch``: the epochs that fit once the timed window closes, else None."""
        if batch == self.start - 1:
            self.timer = time.monotonic()
        if batch != self.end - 1:
            return None
        seconds_per_step = (time.monotonic() - self.timer) / (self.end - self.start)
        return fit_budget(run.config, self.steps_per_epoch, seconds_per_step, run.ddp, run.device)


def budget_spent(run: Run, state: LoopState) -> bool:
    """Whether this invocation has trained for ``--time-budget-min`` minutes (all ranks agree)."""
    budget = run.config.time_budget_min
    spent = budget > 0 and time.monotonic() - state.started >= budget * 60
    if run.ddp.world > 1 and budget > 0:  # rank 0's clock decides, so every rank stops at the same step
        flag = torch.tensor([int(spent)], device=run.device)
        dist.broadcast(flag, 0)
        spent = bool(flag.item())
    return spent


def budget_stop(run: Run, state: LoopState, steps_per_epoch: int) -> None:
    """Say that the time budget stopped the run, where, and how to go on (its checkpoint is written)."""
    epochs = run.config.epochs
    where = (f"epoch {state.epoch + 1} of {epochs}, batch {state.batch} of {steps_per_epoch}"
             if state.batch < steps_per_epoch else f"the end of epoch {state.epoch + 1} of {epochs}")
    log.warning("time budget of %g min spent: stopped at step %d (%s) with a resumable checkpoint in %s; run the "
                "same command to continue (each run gets the budget again)", run.config.time_budget_min,
                state.step, where, run.out)
    log_record(run.metrics, {"event": "budget_stop", "step": state.step, "epoch": state.epoch,
                             "epoch_batch": state.batch, "budget_min": run.config.time_budget_min})
