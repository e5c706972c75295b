"""Image folders in, uint8 tensors out.

A data folder is either a torchvision ``ImageFolder`` tree (one sub-folder per class; labels are used only
for evaluation and the online probe) or a flat folder of unlabelled images (searched recursively). Small
images are decoded once into a uint8 cache file so CPU epochs are not bound by PNG decoding. Unreadable
files are skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from corinfomax.core.errors import DataError, ImageError
from corinfomax.core.files import atomic_write
from corinfomax.core.images import ImageList, ResizeRule, load_image, scan_images, to_model_input

log = logging.getLogger(__name__)

CACHE_MAX_SIDE = 64  # images up to this size are decoded once into an in-memory uint8 cache
DECODER_VERSION = 2  # part of the cache key: bump when decoding changes (2: the serving rule for alpha and 16-bit)


def decode_resized(path: Path, size: int) -> np.ndarray | None:
    """Decode one image to RGB uint8 ``[size, size, 3]`` by the one image rule (`core.images`: EXIF
    orientation, transparency onto white, 16-bit scaled not clipped, shorter side to ``size`` bicubic, centre
    crop), so the model trains on what the service will feed it. Returns None for a file that is not an image.
    """
    try:
        return to_model_input(load_image(path), ResizeRule.square(size))
    except (ImageError, OSError) as err:  # load_image wraps every decoder error in ImageError
        log.warning("skipping unreadable image %s: %s", path, err)
        return None


@dataclass
class DecodedImages:
    """A whole folder decoded to uint8 ``images [N, 3, S, S]`` with ``labels [N]`` (-1: none)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    skipped: int

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image (for the per-image PIL augmentation)."""
        return Image.fromarray(self.images[index].permute(1, 2, 0).numpy())


def _cache_path(images: ImageList, size: int) -> Path:
    listing = hashlib.sha256()
    listing.update(f"{DECODER_VERSION}|{images.root.resolve()}|{size}|{len(images.paths)}".encode())
    for path in images.paths:  # relative to the resolved root: `data/x` and `/abs/data/x` share one cache
        listing.update(str(path.relative_to(images.root)).encode())
    for path in images.paths[:: max(1, len(images.paths) // 64)]:  # cheap change detector
        stat = path.stat()
        listing.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache_root = Path(os.environ.get("CORINFOMAX_CACHE", Path.home() / ".cache" / "corinfomax"))
    return cache_root / f"images-{listing.hexdigest()[:20]}.npz"


def _first_per_class(listing: ImageList, limit: int) -> ImageList:
    """Keep the first ``limit`` images of each class (of the whole folder when unlabelled)."""
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(listing.labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= limit:
            keep.append(i)
    return ImageList(listing.root, [listing.paths[i] for i in keep], [listing.labels[i] for i in keep], listing.classes)


def decode_folder(
    root: str | Path, size: int, limit_per_class: int | None = None, cache: bool = True, progress: bool = True
) -> DecodedImages:
    """Decode every image of a folder to ``size`` x ``size`` (cached on disk when ``cache``)."""
    listing = scan_images(root)
    if limit_per_class is not None:
        listing = _first_per_class(listing, limit_per_class)
    cache_file = _cache_path(listing, size) if cache else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file) as data:
            return DecodedImages(torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]),
                                 listing.classes, int(data["skipped"]))

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        decoded = list(tqdm(pool.map(lambda p: decode_resized(p, size), listing.paths), total=len(listing.paths),
                            desc=f"decoding {listing.root.name}", unit="img", disable=not progress))
    ok = [i for i, image in enumerate(decoded) if image is not None]
    skipped = len(decoded) - len(ok)
    if not ok:
        raise DataError(f"none of the {len(decoded)} files in {root} could be read as an image")
    if skipped:
        log.warning("skipped %d unreadable file(s) of %d in %s", skipped, len(decoded), root)
    images = np.stack([decoded[i] for i in ok]).transpose(0, 3, 1, 2).copy()
    labels = np.asarray([listing.labels[i] for i in ok], dtype=np.int64)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, lambda handle: np.savez(handle, images=images, labels=labels, skipped=skipped))
    return DecodedImages(torch.from_numpy(images), torch.from_numpy(labels), listing.classes, skipped)


def load_labelled_images(
    root: str | Path, image_size: int, limit_per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder tree as uint8 ``[N, 3, S, S]``, int64 labels and class names (for evaluation)."""
    data = decode_folder(root, image_size, limit_per_class)
    if not data.classes:
        raise DataError(f"{root} has no class sub-folders; evaluation needs an ImageFolder tree with labels")
    return data.images, data.labels, data.classes


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float32 normalised with per-channel mean and std."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - m) / s
