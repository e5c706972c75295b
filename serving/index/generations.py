"""A collection's open generations, and the two things done across them: embedding stored items again with a
generation's model (from their sources), and bringing one generation to hold exactly another's items (``sync``:
the end of a re-embed, a rollback)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.core.images import ImageSource
from corinfomax.core.thumbnails import make_thumbnail
from corinfomax.serving.index.backend import StoredRow, VectorIndex
from corinfomax.serving.index.catalog import CollectionDoc
from corinfomax.serving.index.originals import Originals, read_source

log = logging.getLogger(__name__)

COPY_BATCH = 64  # items embedded and written at a time when copying into a generation
RETIRE_SECONDS = 60  # how long dropping a generation waits for the requests still reading it


class Encoder(Protocol):
    """What embedding stored items needs of a model (``serving.embedder.Embedder`` is one)."""

    dim: int

    def preprocess(self, source: ImageSource) -> np.ndarray: ...

    def embed_arrays(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray: ...


Encoders = Callable[[str], Encoder]  # a model's key (name@version) -> its encoder


class Handle:
    """A generation's store with a count of the requests reading it, so dropping it waits for them to finish."""

    def __init__(self, store: VectorIndex) -> None:
        self.store = store
        self._readers = 0
        self._idle = threading.Condition()

    def enter(self) -> VectorIndex:
        with self._idle:
            self._readers += 1
        return self.store

    def exit(self) -> None:
        with self._idle:
            self._readers -= 1
            self._idle.notify_all()

    def retire(self, timeout: float = RETIRE_SECONDS) -> None:
        """Wait until no request reads this store (new ones no longer reach it)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._readers == 0, timeout):
                log.warning("dropping a generation still read by %d requests after %.0f s", self._readers, timeout)


@dataclass
class Open:
    """One collection as the index service holds it: its catalog document and its generations' stores."""

    doc: CollectionDoc
    handles: dict[int, Handle]
    originals: Originals | None

    def store(self, number: int) -> VectorIndex:
        return self.handles[number].store

    @property
    def live(self) -> VectorIndex:
        return self.store(self.doc.live)

    def referenced(self, source: str) -> bool:
        """Whether any generation still has an item with ``source``."""
        return any(handle.store.references(source) for handle in self.handles.values())


@dataclass
class Decoded:
    """Stored rows made ready for a model: those whose image decoded, their pixels, and the ids that failed."""

    rows: list[StoredRow]
    pixels: list[np.ndarray]
    missing: list[int]

    def embed(self, encoder: Encoder) -> np.ndarray:
        if not self.pixels:
            return np.zeros((0, encoder.dim), np.float32)
        return encoder.embed_arrays(np.stack(self.pixels))


def decode_rows(rows: Sequence[StoredRow], encoder: Encoder, originals: Originals | None,
                images: dict[int, bytes] | None = None, pool: Executor | None = None,
                thumbnail_side: int = 0) -> Decoded:
    """Read each row's image (``images`` by id, bytes at hand, else its source) and preprocess it for ``encoder``,
    in ``pool`` when given (decoding releases the GIL); a row without source, whose source is gone or no longer
    decodes is missing. A row without a thumbnail gets one of ``thumbnail_side`` px (unless 0) from its image:
    an index built before `index build` made them shows images on the page once re-embedded."""

    def one(row: StoredRow) -> tuple[StoredRow, np.ndarray | None]:
        data = (images or {}).get(row.id)
        try:
            if data is None:
                if row.source is None:
                    return row, None  # added as a vector
                data = read_source(row.source, originals)
            pixels = encoder.preprocess(data)
            return (with_thumbnail(row, data, thumbnail_side) if thumbnail_side else row), pixels
        except BadInput as err:  # NotFound (gone) and ImageError (not an image any more) are BadInputs
            log.debug("item %d cannot be embedded again: %s", row.id, err)
            return row, None

    decoded = list(pool.map(one, rows)) if pool is not None else [one(row) for row in rows]
    good = [(row, pixels) for row, pixels in decoded if pixels is not None]
    return Decoded([row for row, _ in good], [pixels for _, pixels in good],
                   [row.id for row, pixels in decoded if pixels is None])


def with_thumbnail(row: StoredRow, data: bytes, side: int) -> StoredRow:
    """``row`` with a thumbnail made from its image ``data`` if it has none; as it is if one cannot be made (the
    item is embedded all the same)."""
    if row.thumbnail is not None:
        return row
    try:
        return dataclasses.replace(row, thumbnail=make_thumbnail(data, side))
    except BadInput as err:
        log.debug("item %d: no thumbnail (%s)", row.id, err)
        return row


def encode_rows(rows: Sequence[StoredRow], encoder: Encoder, originals: Originals | None,
                images: dict[int, bytes] | None = None) -> tuple[list[StoredRow], np.ndarray, list[int]]:
    """Embed ``rows`` again from their sources (or ``images`` by id): (the rows embedded, their vectors, the ids
    that could not be: no source, source gone, not decodable)."""
    decoded = decode_rows(rows, encoder, originals, images)
    return decoded.rows, decoded.embed(encoder), decoded.missing


def sync(source: VectorIndex, target: VectorIndex, encoder: Encoder, originals: Originals | None) -> list[int]:
    """Make ``target`` hold exactly ``source``'s ids: remove what ``source`` no longer has, copy (embedded with
    ``encoder``) what ``target`` lacks; return the ids that could not be embedded (left out of ``target``)."""
    gone, lacking = difference(source, target)
    remove_all(target, gone)
    missing: list[int] = []
    for start in range(0, len(lacking), COPY_BATCH):
        good, vectors, bad = encode_rows(source.stored(lacking[start : start + COPY_BATCH]), encoder, originals)
        target.put_rows(good, vectors)
        missing += bad
    return missing


def difference(source: VectorIndex, target: VectorIndex) -> tuple[list[int], list[int]]:
    """(the ids ``target`` holds that ``source`` does not, the ids of ``source`` that ``target`` lacks)."""
    have = set(target.id_list().tolist())
    want = source.id_list().tolist()
    return sorted(have - set(want)), [i for i in want if i not in have]


def remove_all(target: VectorIndex, ids: Sequence[int]) -> None:
    for start in range(0, len(ids), 1000):  # bounded requests (a Milvus filter, an SQL list)
        target.remove(ids[start : start + 1000])


def rows_of(ids: Sequence[int], metadata: Sequence[dict[str, Any]] | None, labels: Sequence[str | None] | None,
            thumbnails: Sequence[bytes | None] | None, sources: Sequence[str | None] | None) -> list[StoredRow]:
    """An add's items as rows (to write them into another generation)."""
    n = len(ids)
    metadata, labels = metadata or [{}] * n, labels or [None] * n
    thumbnails, sources = thumbnails or [None] * n, sources or [None] * n
    return [StoredRow(i, m, lab, t, s, {}) for i, m, lab, t, s in zip(ids, metadata, labels, thumbnails, sources)]
