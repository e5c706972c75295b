"""What one request may make the service do, checked before the work, and what /info may show.

Limits on images (count, bytes, pixels) live in ``Settings``; the index's own limits (k, metadata size,
answer size) in ``serving.index.backend``. This module adds the per-request products of the two.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sized

from PIL import Image

from corinfomax.core.errors import BadInput, ImageTooLarge
from corinfomax.serving.index.backend import MAX_ANSWER_BYTES, MAX_METADATA_BYTES, MAX_METADATA_DEPTH

MAX_HITS = 10_000  # queries x k in one search or kNN vote: 10 queries at k=1000, or 1000 at k=10
PUBLIC = {"max_hits": MAX_HITS, "max_metadata_bytes": MAX_METADATA_BYTES, "max_metadata_depth": MAX_METADATA_DEPTH,
          "max_answer_bytes": MAX_ANSWER_BYTES}
# Model-card fields that name files on the machine that trained or exported the model.
_LOCAL = {"data", "checkpoint", "provenance"}


def query_count(*given: Optional[Sized]) -> int:
    """Queries in a request: the summed lengths of the query lists it gives."""
    return sum(len(g) for g in given if g)


def check_hits(queries: int, k: int, name: str = "k") -> None:
    """Refuse a request whose answer would list more than MAX_HITS items."""
    if queries * k > MAX_HITS:
        raise BadInput(f"{queries} queries x {name}={k} asks for {queries * k} results; the limit is {MAX_HITS} "
                       "per request: split the queries or lower k")


def check_request_pixels(raw: list[bytes], limit: int) -> list[int]:
    """Refuse a request whose images declare more than ``limit`` pixels together, before decoding any; return
    the pixels each image declares (0 for one whose header is unreadable).

    Decoding runs at roughly 100 Mpx/s per core, so this bounds the CPU time one request can take. Only
    the image headers are read here; an image without a readable header is left to the decoder to name.
    """
    declared: list[int] = []
    total = 0
    for data in raw:
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception:  # any unreadable header: the decoder reports it, with the image's number
            declared.append(0)
            continue
        declared.append(width * height)
        total += width * height
        if total > limit:
            raise ImageTooLarge(f"the images of this request declare more than {limit} pixels together (the limit); "
                                "send fewer or smaller images per request")
    return declared


def public_card(card: dict[str, Any]) -> dict[str, Any]:
    """The model card without the fields that reveal local paths of the training machine."""
    return {key: public_card(value) if isinstance(value, dict) else value
            for key, value in card.items() if key not in _LOCAL}
