"""`corinfomax index snapshot --index LOC --to DIR`: a copy of an index, taken while a service serves and writes
it, that checks itself (``restore`` reads it back; docs/FORMATS.md describes the format).

An index folder's snapshot is an index folder too, beside ``manifest.json``:

- the catalog first, with SQLite's online backup (one step: a read transaction the writers do not wait for), then
  every generation the copied catalog names, the same way. Each copy is one point in time of its database, taken
  after the snapshot began, so every write acknowledged before ``started_at`` is in it; writes made during the
  snapshot may be in it or not. The catalog goes first so a generation it names already holds what it promises
  (a re-embed job's cursor never runs ahead of its generation's copy).
- a generation's FAISS files as they are on disk, when the pair is whole (``faiss.index`` matches the checksum
  ``faiss.json`` records). They may be older than the SQLite copy: the store's own rule after a kill -9 applies
  when the restored index is opened (``faiss.json``'s generation differs from SQLite's: refilled from SQLite).
- the originals the copied generations name, each checked against its content address.
- ``manifest.json`` last, atomically: every file with its size and sha256. A snapshot without it (interrupted,
  kill -9) or whose files differ from it is refused by ``restore``.

A Milvus location is snapshot through ``migrate`` into this folder format (its default collection; ids kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from corinfomax.core.errors import UserError
from corinfomax.core.files import atomic_write_text
from corinfomax.serving.index.catalog import CATALOG_FILE, DEFAULT, CollectionDoc
from corinfomax.serving.index.factory import has_catalog, is_milvus, open_layout
from corinfomax.serving.index.layout import generation_folder, originals_folder
from corinfomax.serving.index.migrate import migrate
from corinfomax.serving.index.originals import SHA
from corinfomax.serving.index.store_faiss import FAISS_FILE, FAISS_META
from corinfomax.serving.index.store_sqlite import DB_FILE

log = logging.getLogger(__name__)

FORMAT = "corinfomax-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
CHUNK = 1 << 20  # bytes read at a time when hashing or copying


def snapshot(location: str, to: str | Path, progress: bool = True) -> dict[str, Any]:
    """Snapshot the index at ``location`` into the new (or empty) folder ``to``; return the manifest."""
    dest = Path(to)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} exists and is not an empty folder: snapshot into a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    started = time.time()
    missing: list[str] = []
    try:
        if is_milvus(location):
            collections = _from_milvus(location, dest, progress)
        else:
            collections, missing = _from_folder(Path(location), dest, progress)
    except Exception:  # refused or failed: leave no partial copy in the way of the next try (a kill leaves one)
        shutil.rmtree(dest, ignore_errors=True)
        raise
    files = [describe(dest, path) for path in tqdm(sorted(_files(dest)), desc="checksums", unit="file",
                                                   disable=not progress)]
    manifest = {"format": FORMAT, "version": VERSION, "source": str(location),
                "backend": "milvus" if is_milvus(location) else "folder",
                "started_at": _iso(started), "finished_at": _iso(time.time()),
                "collections": collections, "missing_originals": missing, "files": files}
    _sync_folders(dest)  # the files' names are durable before the manifest vouches for them
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2))
    _sync_folders(dest, recursive=False)
    log.info("index snapshot of %s: %d files in %s", location, len(files), dest)
    return manifest


def describe(root: Path, path: Path) -> dict[str, Any]:
    """A manifest entry: ``path``'s name under ``root``, size and sha256, once its bytes are on disk."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _from_folder(src: Path, dest: Path, progress: bool) -> tuple[dict[str, Any], list[str]]:
    """Copy an index folder (module docstring); return what each collection's generations hold, and the originals
    that were named but gone (deleted with their last item while the snapshot ran)."""
    docs: dict[str, CollectionDoc] = {}
    if (src / CATALOG_FILE).is_file():
        _backup(src / CATALOG_FILE, dest / CATALOG_FILE)
        docs = _read_catalog(dest / CATALOG_FILE)
        wanted = [(name, number) for name, doc in docs.items() for number in sorted(doc.generations)]
    elif (src / DB_FILE).is_file():
        wanted = [(DEFAULT, 1)]  # an index made before collections: one generation, no catalog yet
    else:
        raise UserError(f"{src} is not an index folder (no {DB_FILE} or {CATALOG_FILE} in it)")
    collections: dict[str, Any] = {}
    sources: dict[str, set[str]] = {}  # the originals each collection's copied generations name
    for name, number in tqdm(wanted, desc="snapshot", unit="generation", disable=not progress):
        folder, copy = generation_folder(src, name, number), generation_folder(dest, name, number)
        if not (folder / DB_FILE).is_file():
            raise UserError(f"generation {number} of collection {name!r} is gone from {folder}: the collection "
                            "changed during the snapshot; take it again")
        copy.mkdir(parents=True, exist_ok=True)
        _backup(folder / DB_FILE, copy / DB_FILE)
        _copy_faiss(folder, copy)
        entry = collections.setdefault(name, {"live": docs[name].live if docs else 1, "generations": {}})
        entry["generations"][str(number)] = _state(copy / DB_FILE)
        with _reading(copy / DB_FILE) as db:
            sources.setdefault(name, set()).update(
                row[0] for row in db.execute("SELECT DISTINCT source FROM items WHERE source LIKE ?", (SHA + "%",)))
    missing = [source for name in sources for source in _copy_originals(src, dest, name, sources[name])]
    if missing:
        log.warning("index snapshot: %d originals were deleted while it ran; their items cannot be re-embedded",
                    len(missing))
    return collections, missing


def _backup(source: Path, target: Path) -> None:
    """Copy one SQLite database as of one instant with the online backup API (one step: one read transaction)."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    writer = sqlite3.connect(target)
    try:
        reader.backup(writer)
        _self_contained(writer)
    finally:
        writer.close()
        reader.close()


def _self_contained(db: sqlite3.Connection) -> None:
    """Leave a copy in rollback-journal mode: one file, which reading it does not change (a WAL database grows
    -wal and -shm files even for a read-only reader). The store turns WAL on again when it opens it."""
    db.execute("PRAGMA journal_mode=DELETE")


def _read_catalog(path: Path) -> dict[str, CollectionDoc]:
    with _reading(path) as db:
        rows = db.execute("SELECT value FROM catalog WHERE key LIKE 'collection/%'").fetchall()
    docs = [CollectionDoc.from_json(json.loads(value)) for (value,) in rows]
    return {doc.name: doc for doc in docs}


def _state(path: Path) -> dict[str, int]:
    """What a copied generation holds: its items and its write counter (``generation``: the point it was taken)."""
    with _reading(path) as db:
        count = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        generation = db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()[0]
    return {"count": int(count), "generation": int(generation)}


def _reading(path: Path) -> closing[sqlite3.Connection]:
    """A read-only connection to a copied database, closed on exit."""
    return closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


def _copy_faiss(folder: Path, copy: Path) -> None:
    """Copy the FAISS cache's pair of files when it is whole; else leave it out (the restored store rebuilds it)."""
    try:
        meta = (folder / FAISS_META).read_bytes()  # a pair read across a save of the cache does not match
        data = (folder / FAISS_FILE).read_bytes()
        whole = hashlib.sha256(data).hexdigest() == json.loads(meta).get("sha256")
    except (OSError, ValueError):
        whole = False
    if not whole:
        log.info("index snapshot: %s has no whole FAISS cache; the restored index rebuilds it", folder)
        return
    (copy / FAISS_FILE).write_bytes(data)
    (copy / FAISS_META).write_bytes(meta)


def _copy_originals(src: Path, dest: Path, name: str, sources: set[str]) -> list[str]:
    """Copy collection ``name``'s originals ``sources``; return those gone from ``src``."""
    missing = []
    for source in sorted(sources):
        digest = source[len(SHA):]
        relative = Path(digest[:2]) / digest[2:4] / digest
        origin, copy = originals_folder(src, name) / relative, originals_folder(dest, name) / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(origin, copy)
        except FileNotFoundError:
            missing.append(source)
            continue
        if describe(dest, copy)["sha256"] != digest:
            raise UserError(f"original {origin} does not match its content address: the index folder is damaged")
    return missing


def _from_milvus(location: str, dest: Path, progress: bool) -> dict[str, Any]:
    """Copy a Milvus location's default collection into the folder format at ``dest`` (ids kept)."""
    names: list[str] = []
    if has_catalog(location):
        layout = open_layout(location)
        try:
            names = sorted(key.split("/", 1)[1] for key in layout.catalog.scan("collection/"))
        finally:
            layout.close()
    others = [name for name in names if name != DEFAULT]
    if others:
        raise UserError(f"{location} holds collections {', '.join(others)} besides {DEFAULT!r}; a Milvus snapshot "
                        "copies the default collection only: migrate the others one by one")
    summary = migrate(location, str(dest), progress=progress, keep_ids=True)
    with closing(sqlite3.connect(dest / DB_FILE)) as db:
        _self_contained(db)
    log.info("index snapshot: %d items copied from %s", summary["copied"], location)
    return {DEFAULT: {"live": 1, "generations": {"1": _state(dest / DB_FILE)}}}


def _files(root: Path) -> Iterator[Path]:
    """Every file of the snapshot but the manifest (SQLite leaves no -wal or -shm file once closed)."""
    for path in root.rglob("*"):
        if path.is_file() and path.name != MANIFEST:
            yield path


def _sync_folders(root: Path, recursive: bool = True) -> None:
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())] if recursive else [root]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
