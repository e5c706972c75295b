"""The images of one request: gathered from the three ways they may arrive (uploaded files, base64 strings, URLs
the service fetches itself), counted before any work, then decoded to model input or thumbnails; a failure
names the image by its position.

Where decoding runs: a request whose images declare few pixels is decoded on the event loop, since handing it to
a thread costs more than the decode (~0.4 ms of CPU for the hand-off, 0.11 ms for a 32-px JPEG: bench/
serve_profile.py); a larger one is cut into up to one part per core, decoded in parallel in a pool of threads
(Pillow releases the GIL while it decodes), so one request of eight photos keeps every core busy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.core.thumbnails import make_thumbnail
from corinfomax.serving.api import limits
from corinfomax.serving.api.config import Settings
from corinfomax.serving.api.fetch import fetch_url
from corinfomax.serving.api.metrics import timed
from corinfomax.serving.embedder import Embedder

# Declared pixels of a request decoded on the event loop: about 0.5-1 ms of decoding (one 160x213 photo, or 48
# CIFAR images), short enough not to delay the other requests the loop serves.
INLINE_PIXELS = 50_000


def decode_b64(text: str, position: int) -> bytes:
    """Base64 (optionally a ``data:...;base64,`` URL) -> bytes."""
    if not isinstance(text, str):
        raise BadInput(f"images_b64[{position}] must be a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput(f"images_b64[{position}] is not valid base64 ({err})") from err


class ImageInputs:
    """Reads a request's images under the service's limits, and prepares them as a model's card says."""

    def __init__(self, settings: Settings, decoders: Optional[int] = None) -> None:
        self.settings = settings
        self.decoders = decoders or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.decoders, thread_name_prefix="decode")

    async def collect(self, images: Optional[Sequence[Path | bytes]], urls: Optional[list[str]],
                      images_b64: Optional[list[str]]) -> list[bytes]:
        """Raw bytes from the three ways an image can arrive; the count is checked before any work. Uploaded
        files come as their bytes (``direct``) or as paths of BentoML's temporary files."""
        settings = self.settings
        count = len(images or []) + len(urls or []) + len(images_b64 or [])
        if count > settings.max_images:
            raise BadInput(f"{count} images in one request; the limit is {settings.max_images}")
        raw = [p if isinstance(p, bytes) else Path(p).read_bytes() for p in images or []]
        raw += [decode_b64(text, i) for i, text in enumerate(images_b64 or [])]
        max_bytes = settings.max_request_bytes
        raw += await asyncio.gather(*(fetch_url(str(u), max_bytes, allow_private=settings.allow_private_urls)
                                      for u in urls or []))
        if not raw:
            raise BadInput("no images: send multipart files named 'images', a list 'urls', or a list 'images_b64'")
        return raw

    async def pixels(self, raw: list[bytes], embedder: Embedder) -> np.ndarray:
        """Decode + ``embedder``'s card's preprocessing, on the loop or in parallel parts (see the module's
        docstring); a failure names the image."""
        declared = limits.check_request_pixels(raw, self.settings.max_request_pixels)
        with timed("decode"):
            if sum(declared) <= INLINE_PIXELS:
                return np.stack(self._decode(raw, range(len(raw)), embedder))
            loop = asyncio.get_running_loop()
            parts = split_by_cost(declared, min(self.decoders, -(-sum(declared) // INLINE_PIXELS)))
            decoded = await asyncio.gather(*(loop.run_in_executor(self._pool, self._decode, raw, part, embedder)
                                             for part in parts))
        out: list[np.ndarray] = [np.empty(0)] * len(raw)
        for part, arrays in zip(parts, decoded):
            for i, array in zip(part, arrays):
                out[i] = array
        return np.stack(out)

    @staticmethod
    def _decode(raw: list[bytes], which: range | list[int], embedder: Embedder) -> list[np.ndarray]:
        out = []
        for i in which:
            try:
                out.append(embedder.preprocess(raw[i]))
            except BadInput as err:
                err.args = (f"image {i}: {err}",)
                raise
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def thumbnails(self, raw: list[bytes]) -> list[Optional[str]]:
        """Base64 WebP thumbnails to store with added images; a failure names the image."""
        out: list[Optional[str]] = []
        for i, data in enumerate(raw):
            try:
                thumbnail = make_thumbnail(data, self.settings.thumbnail_side, self.settings.max_pixels)
            except BadInput as err:
                err.args = (f"image {i}: {err}",)
                raise
            out.append(base64.b64encode(thumbnail).decode())
        return out


def split_by_cost(costs: list[int], parts: int) -> list[list[int]]:
    """Indices of ``costs`` in at most ``parts`` groups of about equal total cost (largest first, each to the
    group with the least so far); no group is empty."""
    groups: list[list[int]] = [[] for _ in range(max(1, min(parts, len(costs))))]
    totals = [0] * len(groups)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        least = totals.index(min(totals))
        groups[least].append(i)
        totals[least] += costs[i]
    return [sorted(group) for group in groups]
