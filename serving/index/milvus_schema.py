"""The Milvus collections the service makes (docs/FORMATS.md section 5b): where a location points and a client
for it, the item collection's schema and indexes, the keyed-deletes and catalog tables, what an existing
collection holds, and how a Milvus failure reaches a client (503). ``milvus.MilvusStore`` (one item collection)
and ``milvus_catalog`` (the catalog) build on it.

Facts it relies on (milvus-lite 3.2 / pymilvus 3.0, and the Milvus docs for servers):
- VARCHAR ``max_length`` is at most 65,535 on a server: thumbnails are stored base64-encoded, so the shared
  thumbnail limit (``core.thumbnails.MAX_BYTES``) keeps their text under it.
- A new collection gets HNSW (a server's operator may create the collection beforehand with another index:
  it is kept as found).
- Milvus Lite takes rows with ids given even in an ``auto_id`` collection and keeps counting its own ids from
  where it was (so the service numbers a collection's items itself once it has had a second generation); a
  server needs the collection property ``allow_insert_auto_id`` for that, set when it happens.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from pymilvus import DataType, MilvusClient, MilvusException

from corinfomax.core.errors import BadInput
from corinfomax.serving.index import lite_lock
from corinfomax.serving.index.backend import (
    MAX_KEY_CHARS,
    MAX_LABEL_CHARS,
    MAX_SOURCE_CHARS,
    IndexMismatch,
    IndexUnavailable,
)

DEFAULT_COLLECTION = "corinfomax"  # the collection inside a Milvus Lite .db file
MODEL_PROPERTY = "corinfomax.model_sha256"
ALLOW_GIVEN_IDS = "allow_insert_auto_id"  # the property that lets an auto_id collection take rows with ids
HNSW = {"M": 16, "efConstruction": 200}
MAX_THUMBNAIL_CHARS = 65_535  # a server's VARCHAR limit
# Labels and keys are limited in characters; Milvus may count VARCHAR length in UTF-8 bytes (up to 4 each).
UTF8_MAX = 4
MAX_NAME_CHARS = 255  # Milvus' limit on a collection or alias name
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
ITEM_FIELDS = {"id", "vector", "metadata", "label", "thumbnail", "write_key", "write_rows"}
# Keyed writes' ids lie in [2**61, 2**62): above time-based ids (milliseconds << 18 stay below 2**61 until the
# year 2248) and far enough below 2**63 that a block allocator counting on from them cannot overflow.
KEYED_ID_BASE = 2**61


def is_server(location: str) -> bool:
    """A Milvus server (``milvus://``), which other processes may write at the same time; else a Lite file."""
    return location.startswith("milvus://")


def connection(location: str) -> tuple[str, str | None, str]:
    """(pymilvus uri, token, collection) of a ``.db`` path or ``milvus://host:port/collection``."""
    if not location.startswith("milvus://"):
        return os.path.abspath(location), None, DEFAULT_COLLECTION
    parts = urlsplit(location)
    collection = parts.path.strip("/")
    if not parts.hostname or not NAME.fullmatch(collection):
        raise BadInput(f"CORINFOMAX_INDEX={location!r}: give milvus://HOST:PORT/COLLECTION, the collection "
                       "made of letters, digits and underscores")
    return f"http://{parts.hostname}:{parts.port or 19530}", os.environ.get("CORINFOMAX_MILVUS_TOKEN") or None, \
        collection


def open_client(location: str) -> MilvusClient:
    """A client for ``location`` (one per process for a Milvus Lite file)."""
    uri, token, _ = connection(location)
    lite_lock.claim(location)
    try:
        return MilvusClient(uri=uri, token=token or "")
    except MilvusException as err:
        hint = " (a Milvus Lite .db file can be open in one process only)" if location.endswith(".db") else ""
        raise BadInput(f"cannot open Milvus at {location}: {err.message}{hint}") from err


F = TypeVar("F", bound=Callable[..., Any])


def answers_503(method: F) -> F:
    """A Milvus failure (server down, timeout) as IndexUnavailable: a 503 the client may retry, not a 500 (and a
    clean message from the CLI). A generator's failures arrive while it is iterated: they are caught there."""

    def unavailable(self: Any, err: MilvusException) -> IndexUnavailable:
        return IndexUnavailable(f"Milvus at {self.location} failed ({err.message}); retry the request (with the "
                                "same idempotency_key for a write)")

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except MilvusException as err:
            raise unavailable(self, err) from err

    @functools.wraps(method)
    def generator(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            yield from method(self, *args, **kwargs)
        except MilvusException as err:
            raise unavailable(self, err) from err

    return generator if inspect.isgeneratorfunction(method) else wrapper  # type: ignore[return-value]


def keyed_ids(key: str, n: int) -> list[int]:
    """The ids of the ``n`` rows of a write with idempotency ``key``: a function of the key alone.

    Milvus has no transaction or conditional insert, so two tries of one write that race on different replicas
    cannot see each other in time to stand back; with the same ids, each upserts the same rows and Milvus keeps
    one copy of each. Two ids of different writes meet with probability about one in 2**61 per pair.
    """
    digests = (hashlib.sha256(f"{i}:{key}".encode()).digest() for i in range(n))
    return [KEYED_ID_BASE + int.from_bytes(digest[:8], "big") % KEYED_ID_BASE for digest in digests]


def quote(text: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(text, ensure_ascii=False)


def create_indexes(client: MilvusClient, collection: str, index: Any) -> None:
    """Create ``collection``'s indexes and load it, without pymilvus' wait for each index to be built.

    ``create_collection(..., index_params=...)`` polls every index's state after a fixed 0.5 s sleep, once per
    index: ~1 s per new collection, ~19 s of the quick test lane. On a new, empty collection there is nothing
    to build, and ``load_collection`` still waits until the collection is loaded (searchable) before it returns.
    """
    client.create_index(collection, index, sync=False)
    client.load_collection(collection)


def create_items(client: MilvusClient, name: str, dim: int, model_sha256: str | None, explicit_ids: bool) -> None:
    """An item collection: Milvus numbers the items (``auto_id``) unless ``explicit_ids`` (a generation of a named
    collection, numbered by the service so every generation of it shares the ids)."""
    schema = client.create_schema(auto_id=not explicit_ids)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL_CHARS * UTF8_MAX, nullable=True)
    schema.add_field("thumbnail", DataType.VARCHAR, max_length=MAX_THUMBNAIL_CHARS, nullable=True)
    # The idempotency key rides on the rows it wrote, with their number, so a keyed add cannot half-happen.
    schema.add_field("write_key", DataType.VARCHAR, max_length=MAX_KEY_CHARS * UTF8_MAX, nullable=True)
    schema.add_field("write_rows", DataType.INT64, nullable=True)
    schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_CHARS * UTF8_MAX, nullable=True)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="HNSW", metric_type="IP", params=HNSW)
    index.add_index("write_key", index_type="INVERTED")
    index.add_index("source", index_type="INVERTED")
    client.create_collection(name, schema=schema, consistency_level="Strong",
                             properties={MODEL_PROPERTY: model_sha256 or ""})
    create_indexes(client, name, index)


def create_table(client: MilvusClient, name: str, key: str, value: str) -> None:
    """A key -> JSON table (keyed deletes, the catalog). Milvus needs a vector field in every collection: a 2-dim
    dummy."""
    if client.has_collection(name):
        return
    schema = client.create_schema(auto_id=False)
    schema.add_field(key, DataType.VARCHAR, is_primary=True, max_length=MAX_KEY_CHARS * UTF8_MAX)
    schema.add_field(value, DataType.JSON)
    schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index("unused", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, consistency_level="Strong")
    create_indexes(client, name, index)


@dataclass(frozen=True)
class Described:
    """What an existing item collection holds."""

    dim: int
    model_sha256: str | None
    auto_id: bool  # Milvus numbers its items
    has_source: bool  # made before items had a source: its items have none
    takes_ids: bool  # rows with ids given are accepted (not auto_id, or allow_insert_auto_id set)


def describe(client: MilvusClient, name: str, location: str) -> Described:
    """Read an item collection's schema; refuse one that is not a corinfomax index."""
    described = client.describe_collection(name)
    fields = {field["name"]: field for field in described["fields"]}
    missing = ITEM_FIELDS - set(fields)
    if missing:
        raise IndexMismatch(f"collection {name!r} at {location} is not a corinfomax index "
                            f"(no field {', '.join(sorted(missing))}); use another collection")
    properties = described.get("properties", {})
    auto_id = bool(described.get("auto_id", True))
    return Described(int(fields["vector"]["params"]["dim"]), properties.get(MODEL_PROPERTY) or None, auto_id,
                     "source" in fields, not auto_id or properties.get(ALLOW_GIVEN_IDS) == "true")
