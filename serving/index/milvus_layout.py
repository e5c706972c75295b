"""Collections on Milvus (``layout.Layout``): one Milvus collection per generation, an alias per collection, the
catalog collection, and the originals in a folder.

For the index ``BASE`` (``corinfomax`` in a Milvus Lite file, or the URL's collection):

- ``BASE``: the default collection's first generation (the collection the service always used);
- ``BASE__<name>__g<N>``: every other generation, numbered by the service (``explicit ids``);
- ``BASE__<name>``: an alias that follows the collection's live generation (switched with it), for other
  Milvus clients; ``BASE__<name>_writes``: its keyed deletes (``BASE_writes`` for the default collection);
- ``BASE_catalog``: the catalog; ``CORINFOMAX_ORIGINALS`` (default ``FILE.db.originals/`` beside a Lite file,
  ``data/originals`` for a server; replicas need it on shared storage): the originals, a folder per collection.

A collection name is encoded for Milvus (``_`` -> ``_u``, ``-`` -> ``_d``): names stay distinct and never hold
``__``, so the separators above are unambiguous.

Ids: once a collection has more than one generation, the service numbers its items itself. One process (Milvus
Lite) reserves blocks of ids in the catalog before handing them out, exactly; processes sharing a server cannot
reserve without a transaction, so they use time-based ids (milliseconds << 18, like Milvus' own, plus a random
tag and a counter per process): two processes collide only if, in one millisecond, both draw the same tag and
counter, about one chance in 2**14 per millisecond in which both allocate (documented in docs/ARCHITECTURE.md).
On a server, a write with an idempotency key gets the key's ids instead (``milvus_schema.keyed_ids``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from pymilvus import MilvusClient

from corinfomax.core.errors import BadInput
from corinfomax.serving.index.backend import VectorIndex
from corinfomax.serving.index.catalog import DEFAULT, Catalog, CollectionDoc, GenerationDoc
from corinfomax.serving.index.milvus import MilvusStore, open_client
from corinfomax.serving.index.milvus_catalog import MilvusCatalog
from corinfomax.serving.index.milvus_schema import MAX_NAME_CHARS, connection, is_server, keyed_ids

log = logging.getLogger(__name__)

ID_BLOCK = 1024  # ids reserved in the catalog at a time (one process)
_GENERATION = re.compile(r"(.+)__g(\d+)")


def encode(name: str) -> str:
    return name.replace("_", "_u").replace("-", "_d")


def decode(encoded: str) -> str:
    return encoded.replace("_d", "-").replace("_u", "_")


def originals_root(location: str) -> Path:
    """``CORINFOMAX_ORIGINALS``, else beside a Milvus Lite file, else ``data/originals``."""
    given = os.environ.get("CORINFOMAX_ORIGINALS")
    if given:
        return Path(given)
    return Path(location + ".originals") if not location.startswith("milvus://") else Path("data") / "originals"


class MilvusLayout:
    """Collections in the Milvus at ``location`` (module docstring)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.shared = is_server(location)
        self.base = connection(location)[2]
        self.client: MilvusClient = open_client(location)
        self.catalog: Catalog = MilvusCatalog(self.client, f"{self.base}_catalog", location)
        self.originals_root = originals_root(location)
        self._ids: dict[str, tuple[int, int]] = {}  # name -> (next id, end of the reserved block)
        self._lock = threading.Lock()
        self._tag, self._count, self._last = secrets.randbelow(64), 0, 0

    def _name(self, name: str, number: int) -> str:
        if (name, number) == (DEFAULT, 1):
            return self.base
        full = f"{self.base}__{encode(name)}__g{number}"
        if len(full) > MAX_NAME_CHARS:
            raise BadInput(f"collection name {name!r} is too long for Milvus under {self.base!r}")
        return full

    def _writes(self, name: str) -> str:
        return f"{self.base}_writes" if name == DEFAULT else f"{self.base}__{encode(name)}_writes"

    def _alias(self, name: str) -> str:
        return f"{self.base}__{encode(name)}"

    def exists(self, name: str, number: int) -> bool:
        return bool(self.client.has_collection(self._name(name, number)))

    def open(self, name: str, number: int, generation: GenerationDoc, create: bool) -> VectorIndex:
        explicit = (name, number) != (DEFAULT, 1)
        return MilvusStore(self.location, dim=generation.dim, model_sha256=generation.model_sha256,
                           collection=self._name(name, number), writes=self._writes(name), client=self.client,
                           explicit_ids=explicit)

    def drop(self, name: str, number: int, store: VectorIndex) -> None:
        assert isinstance(store, MilvusStore)
        store.drop()

    def drop_collection(self, name: str) -> None:
        if self._alias(name) in self.client.list_aliases().get("aliases", []):
            self.client.drop_alias(self._alias(name))
        if self.client.has_collection(self._writes(name)):
            self.client.drop_collection(self._writes(name))

    def originals_folder(self, name: str) -> Path:
        return self.originals_root / name

    def allocate(self, doc: CollectionDoc, n: int, key: str | None = None) -> list[int] | None:
        if not doc.explicit_ids:
            return None
        if key is not None and self.shared:
            return keyed_ids(key, n)  # what every try of this write allocates, wherever it runs
        with self._lock:
            if self.shared:
                return [self._time_id() for _ in range(n)]
            start, end = self._ids.get(doc.name, (doc.id_floor, doc.id_floor))
            if start + n > end:
                end = start + n + ID_BLOCK
                doc.id_floor = end
                self.catalog.put({f"collection/{doc.name}": doc.to_json()})  # reserved before handed out
            self._ids[doc.name] = (start + n, end)
            return list(range(start, start + n))

    def _time_id(self) -> int:
        """Milliseconds << 18 | tag << 12 | counter: increasing in this process, above Milvus' own (time) ids."""
        now = int(time.time() * 1000) << 18 | self._tag << 12
        self._count = (self._count + 1) % 4096
        self._last = max(self._last + 1, now | self._count)
        return self._last

    def switched(self, doc: CollectionDoc, live: VectorIndex, old: VectorIndex) -> None:
        assert isinstance(live, MilvusStore) and isinstance(old, MilvusStore)
        floor = max(old.next_id(), live.next_id(), doc.id_floor)
        with self._lock:
            doc.explicit_ids, doc.id_floor = True, floor
            self._ids[doc.name] = (floor, floor)

    def published(self, doc: CollectionDoc) -> None:
        alias, target = self._alias(doc.name), self._name(doc.name, doc.live)
        if alias in self.client.list_aliases(collection_name=target).get("aliases", []):
            return
        if alias in self.client.list_aliases().get("aliases", []):
            self.client.alter_alias(target, alias)
        else:
            self.client.create_alias(target, alias)

    def sweep(self, docs: dict[str, CollectionDoc]) -> None:
        prefix = f"{self.base}__"
        for collection in self.client.list_collections():
            match = _GENERATION.fullmatch(collection[len(prefix):]) if collection.startswith(prefix) else None
            if match is None:
                continue
            doc = docs.get(decode(match.group(1)))
            if doc is None or int(match.group(2)) not in doc.generations:
                log.warning("index %s: dropping %s, a generation the catalog does not name", self.location, collection)
                self.client.drop_collection(collection)

    def close(self) -> None:
        self.client.close()
