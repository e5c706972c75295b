"""The CorInfoMax training loop, DDP through torchrun, AMP, auto-resume: `train` sets a run up, then `_run`
reads top to bottom: per batch `_step`, per epoch `_end_epoch`, over a small `LoopState`.

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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from corinfomax.training.batches import BatchSource, load_training_images
from corinfomax.training.budget import budget_spent, budget_stop, budget_window, fit_budget
from corinfomax.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_weights
from corinfomax.training.config import ConfigError, TrainConfig, validate
from corinfomax.training.distributed import convert_global_batchnorm, pick_device, setup_distributed
from corinfomax.training.evaluate import knn_readout
from corinfomax.training.guard import StepGuard
from corinfomax.training.loss import CorInfoMaxLoss
from corinfomax.training.metrics_log import MetricsLog, log_record
from corinfomax.training.models import CorInfoMaxModel
from corinfomax.training.optim import lr_at, make_optimizer
from corinfomax.training.run import LoopState, Run
from corinfomax.training.run_folder import (
    RESUME_HINT,
    check_resume,
    restore_rng,
    trim_metrics,
    write_checkpoint,
    write_json,
)
from corinfomax.training.step import train_step

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the loop
def train(config: TrainConfig, allow_config_change: bool = False, progress: bool = True) -> Path:
    """Train (or resume) the run in ``config.out``; return the checkpoint path.

    Nothing is written until the data and model are ready; if the run folder was created by this call
    and no checkpoint got written, a failure removes it again (no partial output).
    """
    validate(config)
    ddp = setup_distributed(pick_device(config.device).type)
    device = pick_device(config.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT_FILE
    resume_state = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    changes: dict[str, list[Any]] = {}
    if resume_state is not None:
        changes = check_resume(config, resume_state["config"], allow_config_change)
        if not allow_config_change:
            config.epochs = int(resume_state["config"]["epochs"])  # a budget-fitted schedule stays fixed

    torch.manual_seed(config.seed + ddp.rank)
    model = CorInfoMaxModel(config.backbone, config.projector, config.cifar_stem).to(device)  # bad names fail here
    data = load_training_images(config, progress=progress and ddp.main)
    if data.skipped:
        log.warning("skipped %d unreadable file(s) in %s; training on %d images", data.skipped, config.data,
                    len(data))
    if config.val_data and not data.classes:
        raise ConfigError(f"--val-data needs class sub-folders in --data: the kNN read-out votes with the labels "
                          f"of training images, and {config.data} has none")
    source = BatchSource(data, config, device, ddp)
    steps_per_epoch = source.steps_per_epoch()
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(data)} images are fewer than one batch of {config.batch_size}; "
                          "lower --batch-size")

    if ddp.world > 1:  # global-batch BN; before the optimizer is built, as conversion makes new parameters
        if device.type == "cuda":
            model = cast(CorInfoMaxModel, nn.SyncBatchNorm.convert_sync_batchnorm(model))  # converted in place
        else:
            model = cast(CorInfoMaxModel, convert_global_batchnorm(model))
    if config.channels_last:  # faster on GPUs, and ~1.4x on CPU (tiny_resnet, batch 256, 1 thread)
        # On CPU its BatchNorm is ~10x noisier in float32 than contiguous: harmless for training, but enough for
        # runs with different BN code (1 process vs DDP) to part by ~1e-3 in a few steps; tests/test_ddp_train.py.
        model = model.to(memory_format=torch.channels_last)
    loss_fn = CorInfoMaxLoss(model.embedding_dim, config.alpha, config.la_R, config.la_mu, config.eps,
                             config.R_init, views=config.global_views + config.local_views,
                             global_views=config.global_views).to(device)
    num_classes = len(data.classes)
    probe = nn.Linear(model.feature_dim, num_classes).to(device) if (config.online_probe and num_classes) else None
    optimizer = make_optimizer(config, model)
    probe_opt = torch.optim.Adam(probe.parameters(), lr=1e-3) if probe is not None else None

    start_epoch, step, start_batch = 0, 0, 0
    if resume_state is not None:
        load_weights(model, resume_state["model"], "model", ckpt_path, RESUME_HINT)
        load_weights(loss_fn, resume_state["loss"], "loss state", ckpt_path, RESUME_HINT)
        optimizer.load_state_dict(resume_state["optimizer"])
        if probe is not None and "probe" in resume_state:
            load_weights(probe, resume_state["probe"], "online probe", ckpt_path, RESUME_HINT)
            probe_opt.load_state_dict(resume_state["probe_optimizer"])  # type: ignore[union-attr]
        start_epoch, step = int(resume_state["epoch"]), int(resume_state["step"])
        start_batch = int(resume_state.get("epoch_batch", 0))
        restore_rng(resume_state["rng"])
        log.info("resuming %s at epoch %d batch %d (step %d)", out, start_epoch, start_batch, step)

    train_model: nn.Module = model
    train_probe: nn.Module | None = probe
    if ddp.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
        if probe is not None:
            train_probe = DistributedDataParallel(probe, device_ids=ids)
    if config.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]  # compiled modules are callables

    created = ddp.main and not out.exists()
    try:
        guard = StepGuard([m for m in (model, loss_fn, probe) if m is not None],
                          [o for o in (optimizer, probe_opt) if o is not None])
        run = Run(config=config, ddp=ddp, device=device, out=out, source=source, data=data, train_model=train_model,
                  model=model, loss_fn=loss_fn, optimizer=optimizer, train_probe=train_probe, probe=probe,
                  probe_opt=probe_opt, guard=guard, changes=changes)
        state = LoopState(epoch=start_epoch, step=step, batch=start_batch)
        if resume_state is not None and start_batch:  # mid-epoch: the epoch's sums so far
            state.sums, state.good_steps = resume_state["epoch_sums"], int(resume_state["epoch_good_steps"])
        return _run(run, state, fresh=resume_state is None, progress=progress)
    except BaseException:
        if created and not ckpt_path.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(run: Run, state: LoopState, fresh: bool, progress: bool) -> Path:
    """The epochs: a step per batch, then the end-of-epoch summary and checkpoint (rank 0 writes)."""
    config, ddp, out = run.config, run.ddp, run.out
    steps_per_epoch = run.source.steps_per_epoch()
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config.to_dict())
        if not fresh:
            trim_metrics(out / "metrics.jsonl", state.step)
        run.metrics = MetricsLog(out / "metrics.jsonl", fresh, out / "tensorboard" if config.tensorboard else None)
        log_record(run.metrics, {"event": "data", "step": state.step, "images": len(run.data),
                           "skipped": run.data.skipped, "classes": len(run.data.classes), "world_size": ddp.world,
                           "device": str(run.device), **({"config_changes": run.changes} if run.changes else {})})
    first_epoch = state.epoch
    fitting = fresh and config.time_budget_min > 0  # a fresh run fits its schedule in epoch 0
    timed = budget_window(steps_per_epoch)
    timer = time.monotonic()
    try:
        epoch = first_epoch
        while epoch < config.epochs:  # not range(): fitting the time budget changes config.epochs
            state.start_epoch(epoch)
            run.model.train()
            bar = tqdm(run.source.epoch(epoch, state.batch), total=steps_per_epoch, initial=state.batch,
                       desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and ddp.main), unit="step")
            for i, (views, labels) in enumerate(bar, state.batch):
                lr = lr_at(state.step, config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch,
                           config.lr, config.min_lr)
                terms = train_step(run, state, lr, views, labels)
                if terms is not None and state.step % config.log_every == 0:
                    rate = state.window_images / max(1e-9, time.monotonic() - state.window_start)
                    state.window_start, state.window_images = time.monotonic(), 0
                    loss, attraction, big_bang = terms.tolist()
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                    log_record(run.metrics, {"step": state.step, "epoch": epoch + (i + 1) / steps_per_epoch, "lr": lr,
                                       "loss": loss, "attraction": attraction, "big_bang": big_bang,
                                       "images_per_s": rate}, group="step")
                state.batch = i + 1
                if config.checkpoint_every and state.step % config.checkpoint_every == 0 and i + 1 < steps_per_epoch:
                    write_checkpoint(run, state, mid_epoch=True)
                if fitting and epoch == 0 and i == timed[0] - 1:
                    timer = time.monotonic()
                if fitting and epoch == 0 and i == timed[1] - 1:
                    seconds_per_step = (time.monotonic() - timer) / (timed[1] - timed[0])
                    config.epochs = fit_budget(config, steps_per_epoch, seconds_per_step, ddp, run.device)
                    bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
                    if ddp.main:
                        write_json(out / "config.json", config.to_dict())
                if budget_spent(run, state):
                    break
            bar.close()
            if state.batch < steps_per_epoch:  # the time budget ran out within the epoch
                write_checkpoint(run, state, mid_epoch=True)
                budget_stop(run, state, steps_per_epoch)
                break
            _end_epoch(run, state)
            epoch += 1
            if epoch < config.epochs and budget_spent(run, state):
                budget_stop(run, state, steps_per_epoch)
                break
    finally:
        if run.metrics is not None:
            run.metrics.close()
    return run.checkpoint


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
