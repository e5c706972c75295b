"""The index in a Milvus collection (``pymilvus.MilvusClient``): a ``.db`` file opened by Milvus Lite, or a
Milvus server or cluster at ``milvus://host:port/collection``. Same semantics as ``store.IndexStore``.

Facts this module relies on, checked with milvus-lite 3.2 / pymilvus 3.0 (and the Milvus docs for servers):
- Milvus has no transactions. One insert request is one WAL entry per shard; an acknowledged insert is in
  the WAL, which Milvus replays after a crash (a kill -9 of a Milvus Lite process lost none of 4,188
  acknowledged single-row inserts). Deletes are WAL entries too, and deleting an absent id is a no-op.
- Reads at consistency level ``Strong`` see every write acknowledged before them, from any client; the
  collection is created with it, so a search right after an add finds the added item.
- Milvus Lite opens a ``.db`` file in one process only (a second process fails "Open local milvus
  failed"), and keeps it until that process ends (closing the client does not release it): with a ``.db``
  file the service keeps one index worker. A server takes any number of clients.
- A collection is not loaded after a restart (``NotLoad``): it must be loaded before search, get or query.
- ``auto_id`` ids of one insert are one ascending range (Lite counts from 1, servers from a timestamp);
  all stay below 2**63, like the service's ids. Ids of a deleted item are never handed out again.
- Nullable scalar fields and ``IS NOT NULL`` filters work; ``id in [...]`` filters take int64 literals;
  string literals are JSON-style quoted (Lite does not support ``filter_params`` templates).
- VARCHAR ``max_length`` is at most 65,535 on a server: thumbnails are stored base64-encoded, so the shared
  thumbnail limit (``core.thumbnails.MAX_BYTES``) keeps their text under it.
- Milvus Lite 3.x is a Python engine over FAISS and Parquet: it builds FLAT, HNSW, HNSW_SQ, IVF_FLAT,
  IVF_SQ8 and AUTOINDEX (= HNSW) per segment; IVF_PQ and DISKANN are accepted but not built. Each search
  also walks every stored row in Python (dedup and delete masks): p50 76 ms at 10k rows, 0.2-0.7 s at
  100k on a busy 2-core machine, so Lite is for tests and small collections, a server for scale.
- A new collection gets HNSW (a server's operator may create the collection beforehand with another index:
  it is kept as found).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from corinfomax.core.errors import BadInput, NotFound
from corinfomax.serving.index.backend import (
    MAX_KEY_CHARS,
    MAX_LABEL_CHARS,
    Hit,
    IndexMismatch,
    IndexUnavailable,
    Item,
    Labelled,
    check_answer_size,
    check_ids,
    check_k,
    check_key,
    check_rows,
    check_thumbnails,
    normalise,
)

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = "corinfomax"  # the collection inside a Milvus Lite .db file
MODEL_PROPERTY = "corinfomax.model_sha256"
HNSW = {"M": 16, "efConstruction": 200}
EF_SEARCH = 128  # HNSW search width (at least k): recall@10 >= 0.95 on clustered 256-dim vectors
READ_BATCH = 4096
MAX_THUMBNAIL_CHARS = 65_535  # a server's VARCHAR limit
# Labels and keys are limited in characters; Milvus may count VARCHAR length in UTF-8 bytes (up to 4 each).
UTF8_MAX = 4
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def connection(location: str) -> tuple[str, str | None, str]:
    """(pymilvus uri, token, collection) of a ``.db`` path or ``milvus://host:port/collection``."""
    if not location.startswith("milvus://"):
        return os.path.abspath(location), None, DEFAULT_COLLECTION
    parts = urlsplit(location)
    collection = parts.path.strip("/")
    if not parts.hostname or not _NAME.fullmatch(collection):
        raise BadInput(f"CORINFOMAX_INDEX={location!r}: give milvus://HOST:PORT/COLLECTION, the collection "
                       "made of letters, digits and underscores")
    return f"http://{parts.hostname}:{parts.port or 19530}", os.environ.get("CORINFOMAX_MILVUS_TOKEN") or None, \
        collection


F = TypeVar("F", bound=Callable[..., Any])


def _answers_503(method: F) -> F:
    """A Milvus failure (server down, timeout) as IndexUnavailable: a 503 the client may retry, not a 500."""

    @functools.wraps(method)
    def wrapper(self: "MilvusStore", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except MilvusException as err:
            raise IndexUnavailable(f"Milvus at {self.location} failed ({err.message}); retry the request (with the "
                                   "same idempotency_key for a write)") from err

    return wrapper  # type: ignore[return-value]


def create_indexes(client: MilvusClient, collection: str, index: Any) -> None:
    """Create ``collection``'s indexes and load it, without pymilvus' wait for each index to be built.

    ``create_collection(..., index_params=...)`` polls every index's state after a fixed 0.5 s sleep, once per
    index: ~1 s per new collection, ~19 s of the quick test lane. On a new, empty collection there is nothing
    to build, and ``load_collection`` still waits until the collection is loaded (searchable) before it returns.
    """
    client.create_index(collection, index, sync=False)
    client.load_collection(collection)


def _quote(text: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(text, ensure_ascii=False)


class MilvusStore:
    """A Milvus collection of unit vectors with metadata, labels, thumbnails and idempotency keys.

    Stateless apart from the client: any number of processes (on a server) may open the same collection,
    and each sees the others' writes at once (consistency level Strong).

    Args:
        location: a ``.db`` file (Milvus Lite) or ``milvus://host:port/collection``.
        dim: expected embedding dimension; a collection of another dimension is refused.
        model_sha256: the bundle's ``checkpoint_sha256``; a collection built by another model is refused.
    """

    def __init__(self, location: str, dim: int | None = None, model_sha256: str | None = None) -> None:
        self.location = location
        uri, token, self.collection = connection(location)
        self.writes = f"{self.collection}_writes"
        if location.endswith(".db") and not os.path.exists(uri) and dim is None:
            raise BadInput(f"{location} is not an index; give the embedding dim to create one")
        try:
            self._client = MilvusClient(uri=uri, token=token or "")
        except MilvusException as err:
            hint = " (a Milvus Lite .db file can be open in one process only)" if location.endswith(".db") else ""
            raise BadInput(f"cannot open Milvus at {location}: {err.message}{hint}") from err
        if not self._client.has_collection(self.collection):
            if dim is None:
                raise BadInput(f"{location} has no collection {self.collection!r}; give the embedding dim to create it")
            self._create(int(dim), model_sha256)
        self._check(dim, model_sha256)
        for name in (self.collection, self.writes):
            self._client.load_collection(name)  # a no-op when loaded; needed after every restart

    # -- schema ------------------------------------------------------------------------------------

    def _create(self, dim: int, model_sha256: str | None) -> None:
        schema = self._client.create_schema(auto_id=True)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL_CHARS * UTF8_MAX, nullable=True)
        schema.add_field("thumbnail", DataType.VARCHAR, max_length=MAX_THUMBNAIL_CHARS, nullable=True)
        # The idempotency key rides on the rows it wrote, with their number, so a keyed add cannot half-happen.
        schema.add_field("write_key", DataType.VARCHAR, max_length=MAX_KEY_CHARS * UTF8_MAX, nullable=True)
        schema.add_field("write_rows", DataType.INT64, nullable=True)
        index = self._client.prepare_index_params()
        index.add_index("vector", index_type="HNSW", metric_type="IP", params=HNSW)
        index.add_index("write_key", index_type="INVERTED")
        self._client.create_collection(self.collection, schema=schema, consistency_level="Strong",
                                       properties={MODEL_PROPERTY: model_sha256 or ""})
        create_indexes(self._client, self.collection, index)
        self._create_writes()

    def _create_writes(self) -> None:
        """Keyed deletes: key -> deleted ids. Milvus needs a vector field in every collection: a 2-dim dummy."""
        if self._client.has_collection(self.writes):
            return
        schema = self._client.create_schema(auto_id=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=MAX_KEY_CHARS * UTF8_MAX)
        schema.add_field("result", DataType.JSON)
        schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
        index = self._client.prepare_index_params()
        index.add_index("unused", index_type="FLAT", metric_type="L2")
        self._client.create_collection(self.writes, schema=schema, consistency_level="Strong")
        create_indexes(self._client, self.writes, index)

    def _check(self, dim: int | None, model_sha256: str | None) -> None:
        described = self._client.describe_collection(self.collection)
        fields = {field["name"]: field for field in described["fields"]}
        missing = {"id", "vector", "metadata", "label", "thumbnail", "write_key", "write_rows"} - set(fields)
        if missing:
            raise IndexMismatch(f"collection {self.collection!r} at {self.location} is not a corinfomax index "
                                f"(no field {', '.join(sorted(missing))}); use another collection")
        self.dim = int(fields["vector"]["params"]["dim"])
        self.model_sha256 = described.get("properties", {}).get(MODEL_PROPERTY) or None
        if dim is not None and int(dim) != self.dim:
            raise IndexMismatch(f"index {self.location} holds {self.dim}-dim vectors, the model makes {dim}-dim "
                                "ones; use another collection or rebuild it with this model")
        if model_sha256 and self.model_sha256 and model_sha256 != self.model_sha256:
            raise IndexMismatch(f"index {self.location} was built with model {self.model_sha256[:12]}, not "
                                f"{model_sha256[:12]}; its vectors are not comparable: use another collection")
        self._create_writes()  # a collection made by an operator beforehand gets its writes table here

    # -- writes ------------------------------------------------------------------------------------

    @_answers_503
    def add(self, vectors: Any, metadata: Sequence[dict[str, Any]] | None = None,
            labels: Sequence[str | None] | None = None, thumbnails: Sequence[bytes | None] | None = None,
            key: str | None = None) -> list[int]:
        """Store vectors (L2-normalised here) with metadata, labels and thumbnails; their ids once in the WAL.

        With a ``key`` that an earlier add stored on its rows, nothing is stored and those ids come back. The
        key and the number of rows are on every row of one insert request, so a retry finds all of them;
        should it find only part (a crash between two shards' WAL writes), it deletes that part and inserts
        the batch again.
        """
        vectors = normalise(vectors, self.dim)
        rows = check_rows(vectors, metadata, labels)
        thumbs = check_thumbnails(thumbnails, len(rows))
        key = check_key(key)
        if key is not None:
            done, expected = self._keyed_rows(key)
            if done and len(done) == expected:
                return done
            if done:
                log.warning("index %s: write %r landed %d of %d rows; writing it again", self.location, key,
                            len(done), expected)
                self._client.delete(self.collection, ids=done)
        entities = [{"vector": vector, "metadata": json.loads(text), "label": label,
                     "thumbnail": base64.b64encode(thumb).decode() if thumb else None,
                     "write_key": key, "write_rows": len(rows) if key is not None else None}
                    for (vector, text, label), thumb in zip(rows, thumbs)]
        answer = self._client.insert(self.collection, entities)
        return [int(i) for i in answer["ids"]]

    def _keyed_rows(self, key: str) -> tuple[list[int], int]:
        """Ids of the rows an add with ``key`` wrote (one insert's ids ascend in input order), and how many it
        wrote."""
        found = self._client.query(self.collection, filter=f"write_key == {_quote(key)}",
                                   output_fields=["id", "write_rows"])
        return sorted(int(row["id"]) for row in found), max((int(row["write_rows"]) for row in found), default=0)

    @_answers_503
    def delete(self, ids: Sequence[int], key: str | None = None) -> list[int]:
        """Delete items by id; all must exist (else NotFound and nothing is deleted). ``key``: as in ``add``.

        A keyed delete records its ids first, then deletes: a retry after a crash in between finds the record
        and deletes again (deleting an absent id is a no-op), so the delete completes and answers the same.
        """
        wanted = check_ids(ids)
        key = check_key(key)
        if key is not None:
            done = self._client.get(self.writes, ids=[key], output_fields=["result"])
            if done:
                self._client.delete(self.collection, ids=done[0]["result"])
                return list(done[0]["result"])
        missing = sorted(set(wanted) - self._existing(wanted))
        if missing:
            raise NotFound(f"no item with id {', '.join(map(str, missing[:10]))}")
        if key is not None:
            self._client.insert(self.writes, [{"key": key, "result": wanted, "unused": [0.0, 0.0]}])
        self._client.delete(self.collection, ids=wanted)
        return wanted

    def _existing(self, ids: list[int]) -> set[int]:
        found: set[int] = set()
        for start in range(0, len(ids), READ_BATCH):
            chunk = ids[start : start + READ_BATCH]
            found.update(int(r["id"]) for r in self._client.get(self.collection, ids=chunk, output_fields=["id"]))
        return found

    # -- reads -------------------------------------------------------------------------------------

    @_answers_503
    def count(self) -> int:
        return self._count("")

    def _count(self, condition: str) -> int:
        return int(self._client.query(self.collection, filter=condition, output_fields=["count(*)"])[0]["count(*)"])

    @_answers_503
    def get(self, item_id: int) -> Item:
        (item_id,) = check_ids([item_id])
        rows = self._client.get(self.collection, ids=[item_id], output_fields=["vector", "metadata", "label"])
        if not rows:
            raise NotFound(f"no item with id {item_id}")
        return _item(rows[0])

    @_answers_503
    def thumbnail(self, item_id: int) -> bytes:
        """The stored thumbnail of an item (NotFound if the item is unknown or was added without one)."""
        (item_id,) = check_ids([item_id])
        rows = self._client.get(self.collection, ids=[item_id], output_fields=["thumbnail"])
        if not rows:
            raise NotFound(f"no item with id {item_id}")
        if not rows[0]["thumbnail"]:
            raise NotFound(f"item {item_id} has no thumbnail (it was added as a vector, or with thumbnails off)")
        return base64.b64decode(rows[0]["thumbnail"])

    @_answers_503
    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored unit vectors of ``ids`` (NotFound if any is unknown), float32 ``[N, D]``."""
        wanted = check_ids(ids)
        rows = {int(r["id"]): r["vector"] for r in self._client.get(self.collection, ids=wanted,
                                                                    output_fields=["vector"])}
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise NotFound(f"no item with id {', '.join(map(str, missing[:10]))}")
        return np.asarray([rows[i] for i in wanted], dtype=np.float32)

    @_answers_503
    def search(self, queries: Any, k: int, labelled_only: bool = False) -> list[list[Hit]]:
        """Top-``k`` stored items by inner product of unit vectors, per query (fewer if the index is smaller)."""
        queries = normalise(queries, self.dim, "query vectors")
        k = check_k(k)
        answer = self._client.search(
            self.collection, data=list(queries), limit=k, filter="label IS NOT NULL" if labelled_only else "",
            output_fields=["metadata", "label"],
            search_params={"metric_type": "IP", "params": {"ef": max(k, EF_SEARCH)}})
        texts = {int(hit["id"]): json.dumps(hit["entity"]["metadata"]) for row in answer for hit in row}
        check_answer_size(sum(len(texts[int(hit["id"])]) for row in answer for hit in row))
        return [[Hit(int(hit["id"]), float(hit["distance"]), hit["entity"]["metadata"], hit["entity"]["label"])
                 for hit in row] for row in answer]

    @_answers_503
    def labelled(self) -> Labelled:
        """All labelled items (for kNN classification)."""
        ids: list[int] = []
        vectors: list[list[float]] = []
        labels: list[str] = []
        for batch in self._scan("label IS NOT NULL", ["vector", "label"]):
            for row in batch:
                ids.append(int(row["id"]))
                vectors.append(row["vector"])
                labels.append(row["label"])
        order = np.argsort(ids, kind="stable")
        return Labelled(np.asarray(ids, np.int64)[order],
                        np.asarray(vectors, np.float32).reshape(-1, self.dim)[order], [labels[i] for i in order])

    def items(self, batch: int) -> Iterator[list[tuple[Item, bytes | None]]]:
        """Every item with its thumbnail (or None), ``batch`` at a time (for `index migrate`)."""
        for rows in self._scan("", ["vector", "metadata", "label", "thumbnail"], batch):
            yield [(_item(row), base64.b64decode(row["thumbnail"]) if row["thumbnail"] else None) for row in rows]

    def _scan(self, condition: str, fields: list[str], batch: int = READ_BATCH) -> Iterator[list[dict[str, Any]]]:
        iterator = self._client.query_iterator(self.collection, batch_size=batch, filter=condition,
                                               output_fields=["id", *fields])
        try:
            while rows := iterator.next():
                yield rows
        finally:
            iterator.close()

    @_answers_503
    def stats(self) -> dict[str, Any]:
        """Size and state of the index, for `info`, `/metrics` and the CLI (the keys of IndexStore's that apply)."""
        index = self._client.describe_index(self.collection, "vector")
        return {
            "count": self.count(),
            "labelled": self._count("label IS NOT NULL"),
            "thumbnails": self._count("thumbnail IS NOT NULL"),
            "dim": self.dim,
            "model_sha256": self.model_sha256,
            "backend": "milvus",
            "collection": self.collection,
            "kind": f"Milvus {index.get('index_type')}",
            "recall_at_10": None,  # Milvus does not measure it; bench/ does
        }

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "MilvusStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _item(row: dict[str, Any]) -> Item:
    return Item(int(row["id"]), np.asarray(row["vector"], np.float32), row["metadata"], row["label"])
