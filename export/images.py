"""Real images for the parity check and int8 calibration: a fixed random sample of an image folder."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from corinfomax.core.errors import DataError, ImageError
from corinfomax.core.images import ResizeRule, load_image, scan_images, to_model_input

log = logging.getLogger(__name__)
# Listing a 50k-image folder takes seconds; calibration and the kNN bank sample the same folder.
_scan = functools.lru_cache(maxsize=4)(scan_images)


@dataclass
class Sample:
    """Preprocessed images (uint8 ``[N, H, W, 3]``, as a client would send them) and their labels (-1: none)."""

    pixels: np.ndarray
    labels: np.ndarray
    classes: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def load_sample(root: str | Path, count: int, rule: ResizeRule, seed: int = 0, what: str = "images") -> Sample:
    """Decode ``count`` images drawn at random (fixed seed) from ``root`` with the card's preprocessing."""
    images = _scan(Path(root))
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(images.paths), size=min(count, len(images.paths)), replace=False))
    pixels, labels = [], []
    for i in tqdm(picked, desc=f"decoding {what}", unit="img", leave=False):
        try:
            pixels.append(to_model_input(load_image(images.paths[i]), rule))
        except ImageError as err:
            log.warning("skipping %s: %s", images.paths[i], err)
            continue
        labels.append(images.labels[i])
    if not pixels:
        raise DataError(f"none of the {len(picked)} images sampled from {root} could be decoded")
    return Sample(np.stack(pixels), np.asarray(labels, dtype=np.int64), images.classes)
