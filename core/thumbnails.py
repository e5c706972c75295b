"""Small thumbnails the search page shows in place of the originals (which the service may not be able to reach).

One rule: decode by the shared image rule (same limits, same errors), shrink to fit ``side`` x ``side``
keeping the aspect ratio, encode as WebP (a few KB at 128 px; every current browser shows it)."""

from __future__ import annotations

import io

from PIL import Image

from corinfomax.core.errors import BadInput
from corinfomax.core.images import DEFAULT_MAX_PIXELS, ImageSource, load_image

MEDIA_TYPE = "image/webp"
DEFAULT_SIDE = 128
MAX_SIDE = 256  # a thumbnail, not a copy: bounds what each item adds to the index
# What an index accepts per thumbnail (a 256 px WebP at this quality is ~15 KB). 48,000, not 64 KiB: Milvus
# keeps it base64-encoded in a VARCHAR of at most 65,535 characters (serving/index/milvus.py).
MAX_BYTES = 48_000
QUALITY = 75


def make_thumbnail(source: ImageSource, side: int = DEFAULT_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """WebP bytes of ``source`` shrunk to fit ``side`` x ``side`` (never enlarged)."""
    if not 1 <= side <= MAX_SIDE:
        raise BadInput(f"thumbnail side must be between 1 and {MAX_SIDE} pixels, got {side}")
    image = load_image(source, max_pixels=max_pixels, min_side=side)  # JPEGs at reduced size: 1/8 of a big photo
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=QUALITY, method=4)
    return buffer.getvalue()
