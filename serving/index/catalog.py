"""The catalog: which collections exist, their generations (a physical index each, built with one model), the
re-embed jobs and the models the service accepted. One source of truth per index location, a table of JSON
documents by key (``collection/<name>``, ``job/<id>``, ``model/<name@version>``), written one change at a time:

- an index folder: ``<folder>/catalog.sqlite`` (WAL, synchronous FULL; every change one transaction);
- Milvus: the collection ``<base>_catalog`` (``milvus_catalog``), every change one upsert.

A collection's switch from one generation to another is a change of its one document, so a reader sees the old
state or the new one.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from corinfomax.core.errors import BadInput, NotFound

CATALOG_FILE = "catalog.sqlite"
DEFAULT = "default"  # the collection a request without `collection` reads and writes
NAME = re.compile(r"[a-z0-9_-]{1,64}")
JOB_ID = re.compile(r"[a-z0-9]{1,32}")


class Conflict(BadInput):
    """A request the collection's state does not allow now (a name taken, a job running): 409."""

    status = 409


class StaleRoute(Conflict):
    """A request prepared for a generation that is no longer live (embedded with the model it had): the caller
    looks the collection up again and retries."""


def check_name(name: Any, what: str = "collection") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = str(name)[:80]
        raise BadInput(f"{what} must be 1 to 64 characters of a-z, 0-9, '_' and '-', got {shown!r}")
    return name


def check_job_id(job: Any) -> str:
    if not isinstance(job, str) or not JOB_ID.fullmatch(job):
        raise BadInput(f"job must be a job id of 1 to 32 characters a-z and 0-9, got {str(job)[:80]!r}")
    return job


@dataclass
class GenerationDoc:
    """One physical index of a collection, built with one model."""

    model: str  # name@version
    dim: int
    model_sha256: str | None


@dataclass
class CollectionDoc:
    """A collection: its live generation answers reads; ``pending`` is being built by a job; ``previous`` is kept
    after a switch for a rollback. Both receive every write while they exist."""

    name: str
    keep_originals: bool
    live: int
    generations: dict[int, GenerationDoc]
    pending: int | None = None
    previous: int | None = None
    job: str | None = None
    explicit_ids: bool = False  # Milvus: the service numbers the items (every generation but a legacy first)
    id_floor: int = 1  # Milvus, explicit ids: every id below it may have been handed out
    next_generation: int = 2
    created_at: float = field(default_factory=time.time)

    @property
    def model(self) -> str:
        return self.generations[self.live].model

    def others(self) -> list[int]:
        """The generations besides the live one (they take every write too)."""
        return [number for number in (self.pending, self.previous) if number is not None]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["generations"] = {str(number): asdict(doc) for number, doc in self.generations.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CollectionDoc":
        values = dict(data)
        values["generations"] = {int(number): GenerationDoc(**doc) for number, doc in data["generations"].items()}
        return cls(**values)


@dataclass
class JobDoc:
    """A re-embed job: builds generation ``generation`` of ``collection`` with ``model``."""

    id: str
    collection: str
    model: str
    generation: int
    allow_missing: bool = False
    state: str = "running"  # running | done | failed
    done: int = 0
    total: int = 0
    missing: list[int] = field(default_factory=list)
    error: str | None = None
    cursor: int = 0  # ids up to here are copied (a resumed job continues after it)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def public(self) -> dict[str, Any]:
        """What ``/jobs`` answers."""
        return {"job": self.id, "collection": self.collection, "model": self.model, "state": self.state,
                "done": self.done, "total": self.total, "missing": self.missing, "error": self.error}


class Catalog(Protocol):
    """JSON documents by key; ``put`` applies its changes together (None deletes a key)."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def scan(self, prefix: str) -> dict[str, dict[str, Any]]: ...

    def put(self, changes: dict[str, dict[str, Any] | None]) -> None: ...

    def close(self) -> None: ...


class FolderCatalog:
    """The catalog of an index folder: one SQLite file beside the default collection's first generation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS catalog (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM catalog WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def scan(self, prefix: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM catalog WHERE substr(key, 1, ?) = ? ORDER BY key",
                                    (len(prefix), prefix)).fetchall()
        return {key: json.loads(value) for key, value in rows}

    def put(self, changes: dict[str, dict[str, Any] | None]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, value in changes.items():
                    if value is None:
                        self._db.execute("DELETE FROM catalog WHERE key = ?", (key,))
                    else:
                        self._db.execute("INSERT OR REPLACE INTO catalog(key, value) VALUES (?, ?)",
                                         (key, json.dumps(value)))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def collection_doc(catalog: Catalog, name: str) -> CollectionDoc:
    """The collection ``name`` (NotFound naming the collections there are)."""
    data = catalog.get(f"collection/{name}")
    if data is None:
        names = sorted(key.split("/", 1)[1] for key in catalog.scan("collection/"))
        raise NotFound(f"no collection {name!r} (collections: {', '.join(names)})")
    return CollectionDoc.from_json(data)


def job_doc(catalog: Catalog, job: str) -> JobDoc:
    data = catalog.get(f"job/{check_job_id(job)}")
    if data is None:
        raise NotFound(f"no job {job!r}")
    return JobDoc(**data)
