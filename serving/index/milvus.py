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
- Milvus Lite 3.x is a Python engine over FAISS and Parquet: it builds FLAT, HNSW, HNSW_SQ, IVF_FLAT,
  IVF_SQ8 and AUTOINDEX (= HNSW) per segment; IVF_PQ and DISKANN are accepted but not built. Each search
  also walks every stored row in Python (dedup and delete masks): p50 76 ms at 10k rows, 0.2-0.7 s at
  100k on a busy 2-core machine, so Lite is for tests and small collections, a server for scale.
(What the collections it makes hold: ``milvus_schema``.)
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
from pymilvus import MilvusClient

from corinfomax.core.errors import BadInput, NotFound
from corinfomax.serving.index.backend import (
    Hit,
    IndexMismatch,
    Item,
    StoredRow,
    check_answer_size,
    check_ids,
    check_k,
    check_key,
    check_label,
    check_metadata,
    check_new_ids,
    check_rows,
    check_sources,
    check_thumbnails,
    normalise,
)
from corinfomax.serving.index.filter_compile import milvus_condition, to_milvus
from corinfomax.serving.index.filters import Field, Filter
from corinfomax.serving.index.milvus_scans import READ_BATCH, ROW_FIELDS, MilvusScans, row_item
from corinfomax.serving.index.milvus_schema import (
    ALLOW_GIVEN_IDS,
    answers_503,
    connection,
    create_items,
    create_table,
    describe,
    is_server,
    keyed_ids,
    open_client,
    quote,
)

log = logging.getLogger(__name__)

EF_SEARCH = 128  # HNSW search width (at least k): recall@10 >= 0.95 on clustered 256-dim vectors
PLACEHOLDER_KEY = "corinfomax:placeholder"  # the row inserted to read an auto_id collection's next id


class MilvusStore(MilvusScans):
    """A Milvus collection of unit vectors with metadata, labels, thumbnails and idempotency keys.

    Stateless apart from the client: any number of processes (on a server) may open the same collection,
    and each sees the others' writes at once (consistency level Strong).

    Args:
        location: a ``.db`` file (Milvus Lite) or ``milvus://host:port/collection``.
        dim: expected embedding dimension; a collection of another dimension is refused.
        model_sha256: the bundle's ``checkpoint_sha256``; a collection built by another model is refused.
    """

    def __init__(self, location: str, dim: int | None = None, model_sha256: str | None = None, *,
                 collection: str | None = None, writes: str | None = None, client: MilvusClient | None = None,
                 explicit_ids: bool = False) -> None:
        """``collection``/``writes``: another item collection and keyed-deletes table at ``location`` than its own
        (a generation of a named collection); ``client``: one already open there; ``explicit_ids``: a new collection
        is numbered by the caller (``add_at``), not by Milvus."""
        self.location = location
        self.shared = is_server(location)
        uri, _, default = connection(location)
        self.collection = collection or default
        self.writes = writes or f"{self.collection}_writes"
        if location.endswith(".db") and not os.path.exists(uri) and dim is None:
            raise BadInput(f"{location} is not an index; give the embedding dim to create one")
        self._client = client or open_client(location)
        self._owns_client = client is None
        if not self._client.has_collection(self.collection):
            if dim is None:
                raise BadInput(f"{location} has no collection {self.collection!r}; give the embedding dim to create it")
            create_items(self._client, self.collection, int(dim), model_sha256, explicit_ids)
        self._check(dim, model_sha256)
        for name in (self.collection, self.writes):
            self._client.load_collection(name)  # a no-op when loaded; needed after every restart

    def _check(self, dim: int | None, model_sha256: str | None) -> None:
        described = describe(self._client, self.collection, self.location)
        self.dim, self.model_sha256 = described.dim, described.model_sha256
        self.auto_id, self.has_source = described.auto_id, described.has_source
        self._explicit_allowed = described.takes_ids  # altered once per collection, not once per client
        if dim is not None and int(dim) != self.dim:
            raise IndexMismatch(f"index {self.location} holds {self.dim}-dim vectors, the model makes {dim}-dim "
                                "ones; use another collection or rebuild it with this model")
        if model_sha256 and self.model_sha256 and model_sha256 != self.model_sha256:
            raise IndexMismatch(f"index {self.location} was built with model {self.model_sha256[:12]}, not "
                                f"{model_sha256[:12]}; its vectors are not comparable: use another collection")
        create_table(self._client, self.writes, "key", "result")  # an operator's collection gets its table here

    # -- writes ------------------------------------------------------------------------------------

    @answers_503
    def add(self, vectors: Any, metadata: Sequence[dict[str, Any]] | None = None,
            labels: Sequence[str | None] | None = None, thumbnails: Sequence[bytes | None] | None = None,
            key: str | None = None, sources: Sequence[str | None] | None = None) -> list[int]:
        """Store vectors (L2-normalised here) with metadata, labels, thumbnails and sources; their ids once in the
        WAL.

        With a ``key`` that an earlier add stored on its rows (with their number), nothing is stored and those
        ids come back; a write found in part (a crash between two shards' WAL writes) is written again. On a
        server the ids are the key's (``keyed_ids``), upserted: tries racing on several replicas write the same
        rows. Milvus Lite (one process, whose collections lock orders the tries) keeps its ascending ids and
        deletes a partial write before writing it again.
        """
        if not self.auto_id:
            raise RuntimeError(f"collection {self.collection} is numbered by the service: add with ids (add_at)")
        return self._insert(None, vectors, metadata, labels, thumbnails, key, sources)

    @answers_503
    def add_at(self, ids: Sequence[int], vectors: Any, metadata: Sequence[dict[str, Any]] | None = None,
               labels: Sequence[str | None] | None = None, thumbnails: Sequence[bytes | None] | None = None,
               key: str | None = None, sources: Sequence[str | None] | None = None) -> list[int]:
        """``add`` with the ids given (another generation's, or the collection's allocator's)."""
        return self._insert(ids, vectors, metadata, labels, thumbnails, key, sources)

    def _insert(self, ids: Sequence[int] | None, vectors: Any, metadata: Sequence[dict[str, Any]] | None,
                labels: Sequence[str | None] | None, thumbnails: Sequence[bytes | None] | None, key: str | None,
                sources: Sequence[str | None] | None) -> list[int]:
        vectors = normalise(vectors, self.dim)
        rows = check_rows(vectors, metadata, labels)
        thumbs = check_thumbnails(thumbnails, len(rows))
        origins = check_sources(sources, len(rows))
        given = check_new_ids(ids, len(rows)) if ids is not None else None
        key = check_key(key)
        if key is not None:
            done, expected = self._keyed_rows(key)
            if done and len(done) == expected:
                return done
            if self.shared:
                given = given if given is not None else keyed_ids(key, len(rows))
            elif done:
                log.warning("index %s: write %r landed %d of %d rows; writing it again", self.location, key,
                            len(done), expected)
                self._client.delete(self.collection, ids=done)
        entities = [{"vector": vector, "metadata": json.loads(text), "label": label,
                     "thumbnail": base64.b64encode(thumb).decode() if thumb else None,
                     "write_key": key, "write_rows": len(rows) if key is not None else None}
                    for (vector, text, label), thumb in zip(rows, thumbs)]
        return self._write(entities, given, origins, upsert=key is not None and self.shared)

    def _write(self, entities: list[dict[str, Any]], ids: list[int] | None, sources: list[str | None],
               upsert: bool = False) -> list[int]:
        """Insert (or ``upsert``) ``entities``, with ``ids`` when given and their sources where the collection
        keeps them."""
        for i, entity in enumerate(entities):
            if ids is not None:
                entity["id"] = ids[i]
            if self.has_source:
                entity["source"] = sources[i]
        if ids is not None:
            self._allow_given_ids()
        answer = (self._client.upsert if upsert else self._client.insert)(self.collection, entities)
        return [int(i) for i in answer["ids"]]

    def _allow_given_ids(self) -> None:
        """A server refuses given ids in an auto_id collection (and an upsert there gives the row a new id) unless
        the collection allows them."""
        if not self._explicit_allowed:
            self._client.alter_collection_properties(self.collection, {ALLOW_GIVEN_IDS: "true"})
            self._explicit_allowed = True

    @answers_503
    def put_rows(self, rows: Sequence[StoredRow], vectors: np.ndarray) -> None:
        """Insert copies of another generation's rows (ids absent here) with new vectors, keys included."""
        if not rows:
            return
        vectors = normalise(vectors, self.dim)
        entities = [{"vector": vector, "metadata": row.metadata, "label": row.label,
                     "thumbnail": base64.b64encode(row.thumbnail).decode() if row.thumbnail else None,
                     "write_key": row.carry.get("write_key"), "write_rows": row.carry.get("write_rows")}
                    for row, vector in zip(rows, vectors)]
        self._write(entities, [row.id for row in rows], [row.source for row in rows])

    def _keyed_rows(self, key: str) -> tuple[list[int], int]:
        """Ids of the rows an add with ``key`` wrote, in input order, and how many it wrote."""
        found = self._client.query(self.collection, filter=f"write_key == {quote(key)}",
                                   output_fields=["id", "write_rows"])
        stored = {int(row["id"]) for row in found}
        expected = max((int(row["write_rows"]) for row in found), default=0)
        ordered = [i for i in keyed_ids(key, expected) if i in stored]
        # Rows whose ids are not the key's (Milvus Lite's, a generation's share of a write, or a write made before
        # ids came from keys): one insert's ids ascend in input order.
        return (ordered if len(ordered) == len(stored) else sorted(stored)), expected

    @answers_503
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
            self._client.upsert(self.writes, [{"key": key, "result": wanted, "unused": [0.0, 0.0]}])
        self._client.delete(self.collection, ids=wanted)
        return wanted

    @answers_503
    def remove(self, ids: Sequence[int]) -> list[int]:
        """Delete those of ``ids`` that exist here (a delete another generation took); return them."""
        wanted = check_ids(ids)
        present = [i for i in wanted if i in self._existing(wanted)]
        if present:
            self._client.delete(self.collection, ids=present)
        return present

    @answers_503
    def existing(self, ids: Sequence[int]) -> set[int]:
        return self._existing(list(ids))

    def _existing(self, ids: list[int]) -> set[int]:
        found: set[int] = set()
        for start in range(0, len(ids), READ_BATCH):
            chunk = ids[start : start + READ_BATCH]
            found.update(int(r["id"]) for r in self._client.get(self.collection, ids=chunk, output_fields=["id"]))
        return found

    @answers_503
    def next_id(self) -> int:
        """Above every id this collection handed out: for an ``auto_id`` collection, read by inserting one
        placeholder row and deleting it (Milvus keeps no readable counter; deleted ids may be above every stored
        one); else above every stored id."""
        if not self.auto_id:
            ids = self.id_list()
            return int(ids[-1]) + 1 if len(ids) else 1
        self._sweep_placeholders()
        answer = self._client.insert(self.collection, [{
            "vector": [1.0] + [0.0] * (self.dim - 1), "metadata": {}, "write_key": PLACEHOLDER_KEY, "write_rows": 1}])
        self._sweep_placeholders()
        return int(answer["ids"][0]) + 1

    def _sweep_placeholders(self) -> None:
        found = self._client.query(self.collection, filter=f"write_key == {quote(PLACEHOLDER_KEY)}",
                                   output_fields=["id"])
        if found:
            self._client.delete(self.collection, ids=[int(row["id"]) for row in found])

    # -- reads -------------------------------------------------------------------------------------

    @answers_503
    def count(self) -> int:
        return self._count("")

    def _count(self, condition: str) -> int:
        return int(self._client.query(self.collection, filter=condition, output_fields=["count(*)"])[0]["count(*)"])

    @answers_503
    def get(self, item_id: int) -> Item:
        (item_id,) = check_ids([item_id])
        rows = self._client.get(self.collection, ids=[item_id], output_fields=["vector", "metadata", "label"])
        if not rows:
            raise NotFound(f"no item with id {item_id}")
        return row_item(rows[0])

    @answers_503
    def thumbnail(self, item_id: int) -> bytes:
        """The stored thumbnail of an item (NotFound if the item is unknown or was added without one)."""
        (item_id,) = check_ids([item_id])
        rows = self._client.get(self.collection, ids=[item_id], output_fields=["thumbnail"])
        if not rows:
            raise NotFound(f"no item with id {item_id}")
        if not rows[0]["thumbnail"]:
            raise NotFound(f"item {item_id} has no thumbnail (it was added as a vector, or with thumbnails off)")
        return base64.b64decode(rows[0]["thumbnail"])

    @answers_503
    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored unit vectors of ``ids`` (NotFound if any is unknown), float32 ``[N, D]``."""
        wanted = check_ids(ids)
        rows = {int(r["id"]): r["vector"] for r in self._client.get(self.collection, ids=wanted,
                                                                    output_fields=["vector"])}
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise NotFound(f"no item with id {', '.join(map(str, missing[:10]))}")
        return np.asarray([rows[i] for i in wanted], dtype=np.float32)

    @answers_503
    def search(self, queries: Any, k: int, labelled_only: bool = False,
               where: Filter | None = None) -> list[list[Hit]]:
        """Top-``k`` stored items by inner product of unit vectors, per query (fewer if the index is smaller), among
        those ``where`` passes (Milvus filters during the search itself)."""
        queries = normalise(queries, self.dim, "query vectors")
        k = check_k(k)
        answer = self._client.search(
            self.collection, data=list(queries), limit=k, filter=milvus_condition(where, labelled_only),
            output_fields=["metadata", "label"],
            search_params={"metric_type": "IP", "params": {"ef": max(k, EF_SEARCH)}})
        texts = {int(hit["id"]): json.dumps(hit["entity"]["metadata"]) for row in answer for hit in row}
        check_answer_size(sum(len(texts[int(hit["id"])]) for row in answer for hit in row))
        return [[Hit(int(hit["id"]), float(hit["distance"]), hit["entity"]["metadata"], hit["entity"]["label"])
                 for hit in row] for row in answer]

    @answers_503
    def page(self, after: int, limit: int, where: Filter | None = None) -> list[tuple[int, dict[str, Any], str | None]]:
        """Up to ``limit`` items (id, metadata, label) with ids above ``after`` that ``where`` passes, by id (a query
        with a limit answers the lowest primary keys, as pymilvus' own query iterator relies on; sorted here)."""
        condition = f"id > {int(after)}" + (f" and {to_milvus(where)}" if where is not None else "")
        rows = self._client.query(self.collection, filter=condition, output_fields=["id", "metadata", "label"],
                                  limit=limit)
        return sorted((int(row["id"]), row["metadata"], row["label"]) for row in rows)

    @answers_503
    def update(self, item_id: int, metadata: dict[str, Any] | None = None, label: str | None = None,
               set_label: bool = False) -> bool:
        """Replace an item's metadata (unless None) and, with ``set_label``, its label, keeping its vector and every
        other field: one upsert of the whole row (Milvus replaces a row by its primary key)."""
        (item_id,) = check_ids([item_id])
        if metadata is not None:
            check_metadata(metadata, "metadata")
        check_label(label, "label")
        fields = ["vector", *ROW_FIELDS] + (["source"] if self.has_source else [])
        rows = self._client.get(self.collection, ids=[item_id], output_fields=fields)
        if not rows:
            return False
        row = {"id": item_id, **{name: rows[0][name] for name in fields}}
        row["metadata"] = metadata if metadata is not None else row["metadata"]
        row["label"] = label if set_label else row["label"]
        self._allow_given_ids()
        kept = [int(i) for i in self._client.upsert(self.collection, [row])["ids"]]
        if kept != [item_id]:  # checked on Milvus Lite only: a server that renumbers must not do so silently
            raise RuntimeError(f"Milvus at {self.location} stored the update of item {item_id} as item {kept}")
        return True

    def index_field(self, field: Field) -> None:
        """Nothing: Milvus Lite indexes no JSON paths (its filters scan; a server's operator may add a JSON path
        index with Milvus' tools)."""

    @answers_503
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
            "indexed_fields": [],
        }

    def drop(self) -> None:
        """Delete this item collection (a generation no longer wanted; its keyed-deletes table is the collection's)."""
        self._client.drop_collection(self.collection)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> "MilvusStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
