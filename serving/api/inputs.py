"""The images of one request: gathered from the three ways they may arrive (uploaded files, base64 strings, URLs
the service fetches itself), counted before any work, then decoded to model input or thumbnails; a failure
names the image by its position."""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from typing import Optional

import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.core.thumbnails import make_thumbnail
from corinfomax.serving.api import limits
from corinfomax.serving.api.config import Settings
from corinfomax.serving.api.fetch import fetch_url
from corinfomax.serving.embedder import Embedder


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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def collect(self, images: Optional[list[Path]], urls: Optional[list[str]],
                      images_b64: Optional[list[str]]) -> list[bytes]:
        """Raw bytes from the three ways an image can arrive; the count is checked before any work."""
        settings = self.settings
        count = len(images or []) + len(urls or []) + len(images_b64 or [])
        if count > settings.max_images:
            raise BadInput(f"{count} images in one request; the limit is {settings.max_images}")
        raw = [Path(p).read_bytes() for p in images or []]
        raw += [decode_b64(text, i) for i, text in enumerate(images_b64 or [])]
        max_bytes = settings.max_request_bytes
        raw += await asyncio.gather(*(fetch_url(str(u), max_bytes, allow_private=settings.allow_private_urls)
                                      for u in urls or []))
        if not raw:
            raise BadInput("no images: send multipart files named 'images', a list 'urls', or a list 'images_b64'")
        return raw

    def pixels(self, raw: list[bytes], embedder: Embedder) -> np.ndarray:
        """Decode + ``embedder``'s card's preprocessing; a failure names the image."""
        limits.check_request_pixels(raw, self.settings.max_request_pixels)
        out = []
        for i, data in enumerate(raw):
            try:
                out.append(embedder.preprocess(data))
            except BadInput as err:
                err.args = (f"image {i}: {err}",)
                raise
        return np.stack(out)

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
