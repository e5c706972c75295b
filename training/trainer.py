"""The CorInfoMax training loop, DDP through torchrun, AMP, auto-resume. `train` sets a run up in named steps,
then `_loop` runs its epochs: `_epoch` takes a `train_step` (step.py) per batch, `_end_epoch` summarises and
checkpoints. The batches come from batches.py, the time budget from budget.py, the run folder and resume from
run_folder.py; `Run` and `LoopState` (run.py) are what they all pass around.

One process: ``corinfomax train ...``. Several GPUs or machines: ``torchrun --nproc_per_node N
$(which corinfomax) train ...`` (the WORLD_SIZE / RANK / LOCAL_RANK environment is honoured; rank 0 writes).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from corinfomax.training.batches import BatchSource, load_training_images
from corinfomax.training.budget import ScheduleFit, budget_spent, budget_stop
from corinfomax.training.checkpoint import CHECKPOINT_FILE
from corinfomax.training.config import ConfigError, TrainConfig, validate
from corinfomax.training.data import DecodedImages
from corinfomax.training.distributed import (
    Dist,
    bf16_is_fast,
    convert_global_batchnorm,
    pick_device,
    setup_distributed,
)
from corinfomax.training.evaluate import knn_readout
from corinfomax.training.guard import StepGuard
from corinfomax.training.loss import CorInfoMaxLoss
from corinfomax.training.metrics_log import log_record
from corinfomax.training.models import CorInfoMaxModel
from corinfomax.training.optim import lr_at, make_optimizer
from corinfomax.training.run import LoopState, Run
from corinfomax.training.run_folder import (
    open_run_folder,
    restore_run,
    resume_position,
    saved_run,
    write_checkpoint,
    write_json,
)
from corinfomax.training.step import train_step
from corinfomax.training.stream import ImageFiles

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- setting a run up
def train(config: TrainConfig, allow_config_change: bool = False, progress: bool = True) -> Path:
    """Train (or resume) the run in ``config.out``; return the checkpoint path.

    Nothing is written until the data and model are ready; if the run folder was created by this call
    and no checkpoint got written, a failure removes it again (no partial output).
    """
    validate(config)
    ddp, device = _process(config)
    saved, changes = saved_run(config, allow_config_change)
    torch.manual_seed(config.seed + ddp.rank)
    model = CorInfoMaxModel(config.backbone, config.projector, config.cifar_stem).to(device)  # bad names fail here
    data, source = _batches(config, device, ddp, progress=progress and ddp.main)
    model = _for_training(model, config, ddp, device)
    loss_fn = CorInfoMaxLoss(model.embedding_dim, config.alpha, config.la_R, config.la_mu, config.eps,
                             config.R_init, views=config.global_views + config.local_views,
                             global_views=config.global_views).to(device)
    classes = len(data.classes)
    probe = nn.Linear(model.feature_dim, classes).to(device) if (config.online_probe and classes) else None
    optimizer = make_optimizer(config, model)
    probe_opt = torch.optim.Adam(probe.parameters(), lr=1e-3) if probe is not None else None
    out = Path(config.out)
    if saved is not None:
        restore_run(saved, out / CHECKPOINT_FILE, model=model, loss_fn=loss_fn, optimizer=optimizer, probe=probe,
                    probe_opt=probe_opt)
    train_model, train_probe = _wrap(model, probe, config, ddp, device)

    created = ddp.main and not out.exists()
    try:
        guard = StepGuard([m for m in (model, loss_fn, probe) if m is not None],
                          [o for o in (optimizer, probe_opt) if o is not None])
        run = Run(config=config, ddp=ddp, device=device, out=out, source=source, data=data, train_model=train_model,
                  model=model, loss_fn=loss_fn, optimizer=optimizer, train_probe=train_probe, probe=probe,
                  probe_opt=probe_opt, guard=guard, changes=changes)
        return _loop(run, resume_position(saved), fresh=saved is None, progress=progress)
    except BaseException:
        if created and not (out / CHECKPOINT_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _process(config: TrainConfig) -> tuple[Dist, torch.device]:
    """This process's place in a torchrun job (a job of one without torchrun) and its device."""
    ddp = setup_distributed(pick_device(config.device).type)
    device = pick_device(config.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log.info("training on %s in %s", device, "bf16 autocast" if config.amp and bf16_is_fast(device) else "float32")
    return ddp, device


def _batches(config: TrainConfig, device: torch.device, ddp: Dist,
             progress: bool) -> tuple[DecodedImages | ImageFiles, BatchSource]:
    """The training images and the batches made of them; refuses data that cannot train this config."""
    data = load_training_images(config, progress=progress)
    if data.skipped:
        log.warning("skipped %d unreadable file(s) in %s; training on %d images", data.skipped, config.data,
                    len(data))
    if config.val_data and not data.classes:
        raise ConfigError(f"--val-data needs class sub-folders in --data: the kNN read-out votes with the labels "
                          f"of training images, and {config.data} has none")
    source = BatchSource(data, config, device, ddp)
    if source.steps_per_epoch() == 0:
        raise ConfigError(f"{len(data)} images are fewer than one batch of {config.batch_size}; "
                          "lower --batch-size")
    return data, source


def _for_training(model: CorInfoMaxModel, config: TrainConfig, ddp: Dist, device: torch.device) -> CorInfoMaxModel:
    """Global-batch BatchNorm under DDP, and the channels-last memory layout when asked for. Before the
    optimizer is built: the BatchNorm conversion makes new parameters."""
    if ddp.world > 1:
        if device.type == "cuda":
            model = cast(CorInfoMaxModel, nn.SyncBatchNorm.convert_sync_batchnorm(model))  # converted in place
        else:
            model = cast(CorInfoMaxModel, convert_global_batchnorm(model))
    if config.channels_last:  # faster on GPUs, and ~1.4x on CPU (tiny_resnet, batch 256, 1 thread)
        # On CPU its BatchNorm is ~10x noisier in float32 than contiguous: harmless for training, but enough for
        # runs with different BN code (1 process vs DDP) to part by ~1e-3 in a few steps; tests/test_ddp_train.py.
        model = model.to(memory_format=torch.channels_last)
    return model


def _wrap(model: CorInfoMaxModel, probe: nn.Module | None, config: TrainConfig, ddp: Dist,
          device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """The modules the step calls: ``model`` and ``probe`` in DistributedDataParallel under DDP, the model
    compiled with ``--compile``. Their weights stay those of ``model`` and ``probe``, which checkpoints save."""
    train_model: nn.Module = model
    train_probe = probe
    if ddp.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
        if probe is not None:
            train_probe = DistributedDataParallel(probe, device_ids=ids)
    if config.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]  # compiled modules are callables
    return train_model, train_probe


# --------------------------------------------------------------------------- the loop
def _loop(run: Run, state: LoopState, fresh: bool, progress: bool) -> Path:
    """The epochs: a step per batch, then the end-of-epoch summary and checkpoint (rank 0 writes)."""
    config = run.config
    steps_per_epoch = run.source.steps_per_epoch()
    if run.ddp.main:
        run.metrics = open_run_folder(run, state.step, fresh)
    # A fresh run with a time budget fits its schedule to the speed of epoch 0's steps.
    fit = ScheduleFit(steps_per_epoch) if fresh and config.time_budget_min > 0 else None
    try:
        epoch = state.epoch
        while epoch < config.epochs:  # not range(): fitting the time budget changes config.epochs
            state.start_epoch(epoch)
            if not _epoch(run, state, steps_per_epoch, fit, progress):
                break  # the time budget ran out within the epoch
            _end_epoch(run, state)
            epoch += 1
            if epoch < config.epochs and budget_spent(run, state):
                budget_stop(run, state, steps_per_epoch)
                break
    finally:
        if run.metrics is not None:
            run.metrics.close()
    return run.checkpoint


def _epoch(run: Run, state: LoopState, steps_per_epoch: int, fit: ScheduleFit | None, progress: bool) -> bool:
    """The steps of ``state.epoch`` from batch ``state.batch`` on. False when the time budget stopped it within
    the epoch (after writing a mid-epoch checkpoint)."""
    config, epoch = run.config, state.epoch
    run.model.train()
    bar = tqdm(run.source.epoch(epoch, state.batch), total=steps_per_epoch, initial=state.batch,
               desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and run.ddp.main), unit="step")
    for i, (views, labels) in enumerate(bar, state.batch):
        lr = lr_at(state.step, config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch,
                   config.lr, config.min_lr)
        terms = train_step(run, state, lr, views, labels)
        if terms is not None and state.step % config.log_every == 0:
            _log_step(run, state, bar, lr, terms, epoch + (i + 1) / steps_per_epoch)
        state.batch = i + 1
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and i + 1 < steps_per_epoch:
            write_checkpoint(run, state, mid_epoch=True)
        if fit is not None and epoch == 0 and (epochs := fit.after_batch(run, i)) is not None:
            config.epochs = epochs
            bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
            if run.ddp.main:
                write_json(run.out / "config.json", config.to_dict())
        if budget_spent(run, state):
            break
    bar.close()
    if state.batch < steps_per_epoch:
        write_checkpoint(run, state, mid_epoch=True)
        budget_stop(run, state, steps_per_epoch)
        return False
    return True


def _log_step(run: Run, state: LoopState, bar: tqdm, lr: float, terms: Tensor, epoch: float) -> None:
    """A logged step: its loss terms and the images per second since the last one, on the bar and in the log."""
    rate = state.window_images / max(1e-9, time.monotonic() - state.window_start)
    state.window_start, state.window_images = time.monotonic(), 0
    loss, attraction, big_bang = terms.tolist()
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
    log_record(run.metrics, {"step": state.step, "epoch": epoch, "lr": lr, "loss": loss, "attraction": attraction,
                             "big_bang": big_bang, "images_per_s": rate}, group="step")


def _end_epoch(run: Run, state: LoopState) -> None:
    """Summarise the epoch (losses, spectrum, online probe, kNN when due), log it, write the checkpoint."""
    config, ddp, epoch = run.config, run.ddp, state.epoch
    if ddp.world > 1:
        probe_counts = state.sums[3:].to(run.device)
        dist.all_reduce(probe_counts)  # probe accuracy over every rank's images
        state.sums[3:] = probe_counts.cpu()
    means = (state.sums[:3] / max(1, state.good_steps)).tolist()
    summary: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "elapsed_s": time.monotonic() - state.started,
                               "loss": means[0], "attraction": means[1], "big_bang": means[2],
                               **run.loss_fn.spectrum()}
    if state.sums[4] > 0:
        summary["online_probe_acc"] = float(state.sums[3] / state.sums[4])
    last = epoch + 1 == config.epochs
    if config.val_data and ddp.main and (last or (config.knn_every and (epoch + 1) % config.knn_every == 0)):
        summary["knn_top1"], summary["knn_bank"] = knn_readout(run.model, config, run.device, len(run.data.classes))
    log_record(run.metrics, summary, group="epoch")
    log.info("epoch %d/%d: %s", epoch + 1, config.epochs,
             ", ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    write_checkpoint(run, state, metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))})
