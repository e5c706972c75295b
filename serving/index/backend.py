"""What every index backend promises (``VectorIndex``) and the checks they share (``factory.open_index`` picks
the backend from ``CORINFOMAX_INDEX``).

Two backends satisfy the protocol: ``store.IndexStore`` (SQLite + FAISS in a folder, embedded, the default)
and ``milvus.MilvusStore`` (a Milvus collection: a local ``.db`` file opened by Milvus Lite, or a Milvus
server at ``milvus://host:port/collection``). Input is validated here, before either backend sees it, so
bad input is the same 4xx on both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.core.thumbnails import MAX_BYTES as MAX_THUMBNAIL_BYTES
from corinfomax.serving.index.filters import Field, Filter

MAX_K = 1000  # beyond this a "top-k" is a data dump, not a search
MAX_ID = 2**63 - 1  # SQLite's INTEGER range and Milvus' INT64
MIN_METADATA_INT = -(2**63)  # metadata integers: Milvus' JSON keeps int64 only, so both backends refuse more
# Metadata is a small description of an item, not a document store: every search answer carries it.
MAX_METADATA_BYTES = 16 << 10  # per item, as JSON text
MAX_METADATA_DEPTH = 32
MAX_ANSWER_BYTES = 8 << 20  # metadata in one search answer: bounds what a request makes the server build
MAX_LABEL_CHARS = 200
MAX_KEY_CHARS = 128  # an idempotency key (a UUID is 36)
MAX_SOURCE_CHARS = 4096 + 5  # an item's source: "file:" and a path (PATH_MAX), or "sha256:" and 64 hex digits


class AnswerTooLarge(BadInput):
    """A search whose answer would carry more than MAX_ANSWER_BYTES of metadata (413)."""

    status = 413


class IndexMismatch(BadInput):
    """An index made for another embedding dimension or another model."""


class IndexUnavailable(BadInput):
    """The index server failed or could not be reached: the client should retry (503)."""

    status = 503


@dataclass(frozen=True)
class Item:
    id: int
    vector: np.ndarray
    metadata: dict[str, Any]
    label: str | None


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    metadata: dict[str, Any]
    label: str | None


@dataclass(frozen=True)
class StoredRow:
    """An item as a generation stores it, less its vector: what a re-embed copies into another generation."""

    id: int
    metadata: dict[str, Any]
    label: str | None
    thumbnail: bytes | None
    source: str | None  # "sha256:<hex>" (kept original), "file:<path>", or None (added as a vector)
    carry: dict[str, Any]  # what else the backend keeps on the row and a copy keeps (Milvus: the write key)


@dataclass(frozen=True)
class Labelled:
    """What kNN classification needs: the labelled items' ids, unit vectors and labels."""

    ids: np.ndarray  # int64 [L]
    vectors: np.ndarray  # float32 [L, D]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


class VectorIndex(Protocol):
    """Unit vectors with metadata, labels and thumbnails; what the service, `index build/migrate` and kNN use.

    Every write is acknowledged only once it is durable, and a write with an idempotency ``key`` that an
    earlier write used returns that write's answer and stores nothing again.
    """

    dim: int
    model_sha256: str | None

    def count(self) -> int: ...

    def add(self, vectors: Any, metadata: Sequence[dict[str, Any]] | None = None,
            labels: Sequence[str | None] | None = None, thumbnails: Sequence[bytes | None] | None = None,
            key: str | None = None, sources: Sequence[str | None] | None = None) -> list[int]: ...

    def delete(self, ids: Sequence[int], key: str | None = None) -> list[int]: ...

    def get(self, item_id: int) -> Item: ...

    def thumbnail(self, item_id: int) -> bytes: ...

    def vectors(self, ids: Sequence[int]) -> np.ndarray: ...

    def search(self, queries: Any, k: int, labelled_only: bool = False,
               where: Filter | None = None) -> list[list[Hit]]:
        """Top-k per query among the items ``where`` passes (and labelled ones only, if asked)."""
        ...

    def page(self, after: int, limit: int, where: Filter | None = None) -> list[tuple[int, dict[str, Any], str | None]]:
        """Up to ``limit`` items (id, metadata, label) with ids above ``after`` that ``where`` passes, by id."""
        ...

    def update(self, item_id: int, metadata: dict[str, Any] | None = None, label: str | None = None,
               set_label: bool = False) -> bool:
        """Replace an item's metadata (unless None) and, with ``set_label``, its label; whether it exists here."""
        ...

    def index_field(self, field: Field) -> None:
        """Index a metadata field for filters (where the backend can)."""
        ...

    def labelled(self) -> Labelled: ...

    def items(self, batch: int) -> Iterator[list[tuple[Item, bytes | None]]]:
        """Every item with its thumbnail (or None), in id order, ``batch`` at a time (for `index migrate`)."""
        ...

    def scan(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every item's (int64 ids [n], unit vectors [n, D]), a batch at a time (for `index duplicates`)."""
        ...

    def stats(self) -> dict[str, Any]: ...

    # -- what collections and their generations need (serving.index.collections) ------------------------

    def add_at(self, ids: Sequence[int], vectors: Any, metadata: Sequence[dict[str, Any]] | None = None,
               labels: Sequence[str | None] | None = None, thumbnails: Sequence[bytes | None] | None = None,
               key: str | None = None, sources: Sequence[str | None] | None = None) -> list[int]:
        """``add`` with the ids given (another generation's, or the collection's allocator's) and sources."""
        ...

    def put_rows(self, rows: Sequence[StoredRow], vectors: np.ndarray) -> None:
        """Insert copies of another generation's rows (ids absent here) with new vectors."""
        ...

    def remove(self, ids: Sequence[int]) -> list[int]:
        """Delete those of ``ids`` that exist here (a write another generation took); return them."""
        ...

    def stored(self, ids: Sequence[int]) -> list[StoredRow]:
        """The rows of those of ``ids`` that exist, in id order."""
        ...

    def id_list(self) -> np.ndarray:
        """Every id, ascending (int64)."""
        ...

    def existing(self, ids: Sequence[int]) -> set[int]: ...

    def sources(self) -> set[str]:
        """Every item's source (the originals and files this generation needs)."""
        ...

    def references(self, source: str) -> bool: ...

    def close(self) -> None: ...

    def __enter__(self) -> "VectorIndex": ...

    def __exit__(self, *exc: object) -> None: ...


# -- the checks every backend runs before touching storage ------------------------------------------


def normalise(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """Check a ``[N, dim]`` (or ``[dim]``) array of finite, non-zero vectors; return float32 unit rows."""
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise BadInput(f"{what} must be numbers: {err}") from err
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise BadInput(f"{what} must have shape [N, {dim}] (embedding dim {dim}), got {list(array.shape)}")
    if len(array) == 0:
        raise BadInput(f"{what}: empty batch, give at least one vector")
    if not np.isfinite(array).all():
        bad = sorted({int(i) for i in np.nonzero(~np.isfinite(array))[0]})[:5]
        raise BadInput(f"{what} contain NaN or infinite values (rows {bad})")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise BadInput(f"{what} contain all-zero rows {np.nonzero(norms[:, 0] == 0)[0][:5].tolist()}")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


def check_metadata(meta: Any, where: str) -> str:
    """A metadata object as JSON text, refused if not an object, too deep, over MAX_METADATA_BYTES, or holding a
    value one backend could not store as given (the error names its path, e.g. ``metadata[0]["a"][2]``)."""
    if not isinstance(meta, dict):
        raise BadInput(f"{where} must be a JSON object, got {type(meta).__name__}")
    stack: list[tuple[Any, int, str]] = [(meta, 1, where)]
    while stack:  # iterative, so a hostile nesting cannot exhaust the interpreter's recursion limit
        value, depth, path = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            raise BadInput(f"{where} is nested deeper than {MAX_METADATA_DEPTH} levels")
        if isinstance(value, dict):
            for key, child in value.items():
                _check_text(key, f"{path} key {_shown(key)}")
                stack.append((child, depth + 1, f"{path}[{_shown(key)}]"))
        elif isinstance(value, list):
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, int) and not isinstance(value, bool) and not MIN_METADATA_INT <= value <= MAX_ID:
            raise BadInput(f"{path}: an integer of {value.bit_length()} bits is outside the range [-2**63, 2**63-1] "
                           "that every index backend stores; send it as a string")
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BadInput(f"{where} is not JSON-serialisable: {err}") from err
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise BadInput(f"{where} is {len(text.encode())} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return text


def _check_text(text: Any, path: str) -> None:
    """A string must be Unicode text that UTF-8 can encode: JSON lets a client send a lone surrogate
    (``"\\ud800"``), which SQLite keeps but Milvus refuses."""
    if isinstance(text, str):
        try:
            text.encode()
        except UnicodeEncodeError as err:
            raise BadInput(f"{path}: a string with a lone UTF-16 surrogate at position {err.start} is not "
                           "Unicode text") from err


def _shown(key: Any) -> str:
    return json.dumps(key)[:66]


def check_key(key: Any) -> str | None:
    """An idempotency key: None, or 1..MAX_KEY_CHARS printable characters."""
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS or not key.isprintable():
        raise BadInput(f"idempotency_key must be a string of 1 to {MAX_KEY_CHARS} printable characters")
    return key


def check_k(k: Any) -> int:
    """Validate a top-k parameter."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise BadInput(f"k must be an integer, got {k!r}")
    if not 1 <= k <= MAX_K:
        raise BadInput(f"k must be between 1 and {MAX_K}, got {k}")
    return int(k)


def check_ids(ids: Any) -> list[int]:
    """A non-empty list of ids in 0..MAX_ID, duplicates dropped (first occurrence kept)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) and not isinstance(ids, np.ndarray):
        raise BadInput(f"ids must be a list of integers, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise BadInput(f"ids must be integers, got {str(i)[:100]!r}")
        if not 0 <= i <= MAX_ID:
            raise BadInput(f"ids must be between 0 and 2**63-1, got {str(i)[:100]}")
        out.append(int(i))
    if not out:
        raise BadInput("ids: empty list, give at least one id")
    return list(dict.fromkeys(out))


def check_rows(vectors: np.ndarray, metadata: Sequence[dict] | None,
               labels: Sequence[str | None] | None) -> list[tuple[np.ndarray, str, str | None]]:
    """(unit vector, metadata JSON text, label) per row, with one metadata object and one label per vector."""
    n = len(vectors)
    metadata = list(metadata) if metadata is not None else [{}] * n
    labels = list(labels) if labels is not None else [None] * n
    if len(metadata) != n or len(labels) != n:
        raise BadInput(f"{n} vectors but {len(metadata)} metadata objects and {len(labels)} labels")
    rows = []
    for i, (vector, meta, label) in enumerate(zip(vectors, metadata, labels)):
        rows.append((vector, check_metadata(meta, f"metadata[{i}]"), check_label(label, f"labels[{i}]")))
    return rows


def check_label(label: Any, where: str) -> str | None:
    """A label: a string of 1 to MAX_LABEL_CHARS characters, or None."""
    if label is not None and (not isinstance(label, str) or not 1 <= len(label) <= MAX_LABEL_CHARS):
        raise BadInput(f"{where} must be a string of 1 to {MAX_LABEL_CHARS} characters or null, "
                       f"got {str(label)[:100]!r}")
    _check_text(label, where)
    return label


def check_thumbnails(thumbnails: Sequence[bytes | None] | None, n: int) -> list[bytes | None]:
    """Check one thumbnail (or None) per item, each an encoded image of at most MAX_THUMBNAIL_BYTES."""
    if thumbnails is None:
        return [None] * n
    if len(thumbnails) != n:
        raise BadInput(f"{n} vectors but {len(thumbnails)} thumbnails")
    for i, thumb in enumerate(thumbnails):
        if thumb is not None and not (isinstance(thumb, bytes) and 0 < len(thumb) <= MAX_THUMBNAIL_BYTES):
            size = len(thumb) if isinstance(thumb, bytes) else type(thumb).__name__
            raise BadInput(f"thumbnails[{i}] must be 1 to {MAX_THUMBNAIL_BYTES} bytes, got {size}")
    return list(thumbnails)


def check_sources(sources: Sequence[str | None] | None, n: int) -> list[str | None]:
    """One source (or None) per item, each a string of at most MAX_SOURCE_CHARS."""
    if sources is None:
        return [None] * n
    if len(sources) != n:
        raise BadInput(f"{n} vectors but {len(sources)} sources")
    for i, source in enumerate(sources):
        if source is not None and not (isinstance(source, str) and 0 < len(source) <= MAX_SOURCE_CHARS):
            raise BadInput(f"sources[{i}] must be a string of 1 to {MAX_SOURCE_CHARS} characters or null")
    return list(sources)


def check_new_ids(ids: Sequence[int], n: int) -> list[int]:
    """Ids given for ``n`` new items: valid, distinct, one per item."""
    checked = check_ids(ids)
    if len(checked) != n or len(ids) != n:
        raise BadInput(f"{n} vectors but {len(ids)} ids (distinct: {len(checked)})")
    return checked


def check_answer_size(size: int) -> None:
    """Refuse a search answer that would carry more than MAX_ANSWER_BYTES of metadata (checked before parsing:
    the same item may be in every row)."""
    if size > MAX_ANSWER_BYTES:
        raise AnswerTooLarge(f"the answer would carry {size} bytes of metadata; the limit is {MAX_ANSWER_BYTES}: "
                             "lower k or send fewer queries per request")
