"""The training batches: which images an epoch visits in which order (`epoch_order`, sharded over DDP ranks),
whether they come from a decoded uint8 cache or stream from the files (`load_training_images`), and
`BatchSource`, which turns them into augmented views on the training device."""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch import Tensor

from corinfomax.training.augment import BatchViews, Crops, PilTwoView, view_specs
from corinfomax.training.config import ConfigError, TrainConfig
from corinfomax.training.data import CACHE_MAX_SIDE, DecodedImages, decode_folder
from corinfomax.training.distributed import Dist
from corinfomax.training.stream import ImageFiles, ViewDataset, list_image_files

log = logging.getLogger(__name__)

# Small training sizes train from a uint8 cache of the whole folder (held in memory, and on the device with the
# tensor pipeline) unless it would exceed this; such folders stream from the files like large sizes do.
CACHE_MAX_BYTES = 8 << 30


class _EpochSampler(torch.utils.data.Sampler):
    """This rank's ``(index, seed)`` items of the current epoch; `set_epoch` before each epoch.

    Iterated in the main process, so one persistent set of loader workers serves every epoch.
    """

    def __init__(self, n: int, config: TrainConfig, ddp: Dist, batch: int) -> None:
        self.n, self.seed, self.ddp, self.batch, self.epoch, self.start = n, config.seed, ddp, batch, 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Serve ``epoch`` from its batch ``start_batch`` on (a run resumed mid-epoch)."""
        self.epoch, self.start = epoch, start_batch * self.batch

    def __len__(self) -> int:
        return len(epoch_order(self.n, self.epoch, self.seed, self.ddp, self.batch)) - self.start

    def __iter__(self):
        base = (self.seed * 100_003 + self.epoch) * self.n
        order = epoch_order(self.n, self.epoch, self.seed, self.ddp, self.batch)[self.start :]
        return iter((i, base + i) for i in order.tolist())


def epoch_order(n: int, epoch: int, seed: int, ddp: Dist, batch: int) -> Tensor:
    """This rank's sample indices for an epoch: a seeded permutation, whole global batches only, every
    ``world``-th index, so batch k of all ranks together is batch k of a single-process run."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    usable = (n // (batch * ddp.world)) * batch * ddp.world
    return perm[:usable][ddp.rank :: ddp.world]


def load_training_images(config: TrainConfig, progress: bool) -> DecodedImages | ImageFiles:
    """The decoded uint8 cache for small training sizes when it fits `CACHE_MAX_BYTES`, else the file list to
    stream from (the choice is logged)."""
    files = list_image_files(config.data, config.image_size)
    need = len(files) * 3 * config.image_size**2
    if config.image_size <= CACHE_MAX_SIDE and need <= CACHE_MAX_BYTES:
        log.info("image_size %d <= %d: training from the decoded uint8 cache (%.2f GiB)", config.image_size,
                 CACHE_MAX_SIDE, need / 2**30)
        return decode_folder(config.data, config.image_size, progress=progress)
    reason = (f"image_size {config.image_size} > {CACHE_MAX_SIDE}" if config.image_size > CACHE_MAX_SIDE else
              f"a uint8 cache would need {need / 2**30:.1f} GiB > {CACHE_MAX_BYTES / 2**30:.0f} GiB")
    log.info("%s: streaming %d files, decoded and cropped in %d loader worker(s), %s", reason, len(files),
             config.workers, "coloured batched on the training device" if config.augment == "tensor" else
             "augmented there by the PIL reference (augment=pil)")
    return files


class BatchSource:
    """Yields ``(views, labels)`` on the training device for one epoch, by one of three pipelines:
    cached images through both stages of `BatchViews` on the device; streamed files cropped per image in
    loader workers (`Crops`) and coloured batched on the device; or, with ``augment="pil"``, the per-image
    PIL reference in the workers (cached images or streamed files; the baseline the benches compare with)."""

    def __init__(self, data: DecodedImages | ImageFiles, config: TrainConfig, device: torch.device,
                 ddp: Dist) -> None:
        self.config, self.device, self.ddp = config, device, ddp
        self.batch = config.batch_size // ddp.world
        if self.batch < 2:
            raise ConfigError(f"batch size {config.batch_size} over {ddp.world} processes leaves < 2 images "
                              "per process")
        self.data, self.n, self.labels = data, len(data), data.labels
        self.batched = config.augment == "tensor"
        self.cached = self.batched and isinstance(data, DecodedImages)
        self.unreadable: set[int] = set()
        specs = view_specs(config.image_size, config.global_views, config.local_views, config.local_size,
                           config.crop_scale, config.local_scale)
        self.augment = BatchViews(specs, config.mean, config.std)
        if self.cached:
            # Small images live on the device as uint8: no loader workers, no host-to-device copies per step.
            self.images = data.images.to(device)  # type: ignore[union-attr]  # DecodedImages here
        else:
            self.sampler = _EpochSampler(self.n, config, ddp, self.batch)
            transform = (Crops(specs) if self.batched else PilTwoView(config.image_size, config.mean, config.std))
            self.loader = torch.utils.data.DataLoader(
                ViewDataset(data, transform), batch_size=self.batch, sampler=self.sampler,
                num_workers=config.workers, pin_memory=device.type == "cuda", drop_last=True,
                persistent_workers=config.workers > 0,
            )

    def steps_per_epoch(self) -> int:
        return self.n // (self.batch * self.ddp.world)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[list[Tensor], Tensor]]:
        """The batches of ``epoch`` from batch ``start_batch`` on (a run resumed mid-epoch)."""
        rank, world = self.ddp.rank, self.ddp.world
        if self.cached:
            order = epoch_order(self.n, epoch, self.config.seed, self.ddp, self.batch)
            for k, idx in enumerate(order.split(self.batch)[start_batch:], start_batch):
                views = self.augment(self.images[idx.to(self.device)], self._generator(epoch, k), rank, world)
                yield views, self.labels[idx].to(self.device)
            return
        self.sampler.set_epoch(epoch, start_batch)
        for k, (*views, labels, unreadable) in enumerate(self.loader, start_batch):
            views = [v.to(self.device, non_blocking=True) for v in views]
            if self.batched:  # uint8 crops from the workers: the colour stage, batched
                views = self.augment.colour_views(views, self._generator(epoch, k), rank, world)
            yield views, labels.to(self.device, non_blocking=True)
            self._count_unreadable(unreadable)

    def _generator(self, epoch: int, batch: int) -> torch.Generator:
        # Seeded by (seed, epoch, batch) only: every rank draws the global batch's parameters and keeps its
        # rows, and a resumed run draws what an uninterrupted one would.
        return torch.Generator().manual_seed((self.config.seed * 100_003 + epoch) * 1_000_003 + batch)

    def _count_unreadable(self, unreadable: Tensor) -> None:
        new = set(unreadable[unreadable >= 0].tolist()) - self.unreadable
        if new:
            self.unreadable |= new
            self.data.skipped = len(self.unreadable)
            log.warning("%d unreadable file(s) skipped so far (each replaced by the next readable one)",
                        len(self.unreadable))
