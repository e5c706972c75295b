"""Per-image work in DataLoader workers: images streamed from their files (or the uint8 cache, for the PIL
reference pipeline) made into views (two, or more for multi-crop).

Small training sizes (``image_size`` up to `data.CACHE_MAX_SIDE`) train from the decoded uint8 cache; larger
ones stream from the files (`batches.load_training_images` chooses): each worker decodes an image at reduced
size where the JPEG allows it and cuts one random-resized crop per view (`augment.Crops`, fixed-size uint8);
`batches.BatchSource` runs the colour ops batched on the training device (`augment.BatchViews.colour_views`).
Nothing is held in memory but the file list, so a folder of millions of photos trains as easily as a small one.

Items are ``(index, seed)``: each image's draws depend only on the run seed, the epoch and the index, so a
resumed or sharded run sees the same views as an uninterrupted single-process one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from corinfomax.core.errors import DataError, ImageError
from corinfomax.core.images import load_image, scan_images

log = logging.getLogger(__name__)

# Decode so the shorter side keeps at least this many times the training size. A random-resized crop of area
# scale s spans about sqrt(s) of the side, so 2x keeps full detail for crops down to a quarter of the image
# (most of the paper's 0.08-1 range), while a 3000-px photo still decodes at 1/8 for 128-px training.
DRAFT_FACTOR = 2
# Tries of the following files when one cannot be decoded (a file truncated after its header was read).
SUBSTITUTE_TRIES = 16


class ImageSource(Protocol):
    """What `ViewDataset` reads: a number of images, each loadable as an RGB PIL image, and their labels."""

    labels: Tensor

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...


@dataclass
class ImageFiles:
    """The image files of a folder, decoded on demand; ``labels [N]`` (-1: none). ``skipped`` counts the files
    found unreadable so far (while training; a file is only read when it is first drawn)."""

    paths: list[Path]
    labels: Tensor
    classes: list[str]
    min_side: int
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Decode one file by the one image rule (`core.images`), at reduced size where the JPEG allows."""
        try:
            return load_image(self.paths[index], min_side=self.min_side)
        except (ImageError, OSError) as err:  # name the file: the decoder's message does not
            raise ImageError(f"{self.paths[index]}: {err}") from err


def list_image_files(root: str | Path, image_size: int) -> ImageFiles:
    """List a folder (flat or ImageFolder) for streaming at ``image_size``; nothing is decoded yet."""
    listing = scan_images(root)
    return ImageFiles(listing.paths, torch.tensor(listing.labels, dtype=torch.int64), listing.classes,
                      min_side=DRAFT_FACTOR * image_size)


class ViewDataset(torch.utils.data.Dataset):
    """The views of each image by ``transform(image, seed)`` (`augment.Crops`, or the two-view reference
    `augment.PilTwoView`); an item is ``(view_1, ..., view_V, label, unreadable)``.

    A file that fails to decode is replaced by the next readable one (so batches keep their size and a run
    its determinism); ``unreadable`` is the failed index, or -1, for the main process to count.
    """

    def __init__(self, images: ImageSource, transform: Callable[[Image.Image, int], tuple[Tensor, ...]]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, ...]:  # (views..., label tensor, unreadable int)
        index, seed = item
        image, used, unreadable = self._load(index)
        return *self.transform(image, seed), self.images.labels[used], unreadable

    def _load(self, index: int) -> tuple[Image.Image, int, int]:
        unreadable = -1
        for offset in range(SUBSTITUTE_TRIES):
            candidate = (index + offset) % len(self.images)
            try:
                return self.images.load(candidate), candidate, unreadable
            except ImageError as err:
                log.warning("skipping unreadable image %s", err)
                unreadable = candidate if unreadable < 0 else unreadable
        raise DataError(f"{SUBSTITUTE_TRIES} images in a row from index {index} could not be decoded; check the "
                        "data folder")
