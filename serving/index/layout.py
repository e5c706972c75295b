"""Where a collection's generations, originals and catalog live for one backend (``Layout``), and the index
folder's layout (``FolderLayout``); ``milvus_layout.MilvusLayout`` is Milvus'.

An index folder (``CORINFOMAX_INDEX=data/index``)::

    data/index/index.sqlite, faiss.*                  the default collection's first generation (as before)
    data/index/catalog.sqlite                         the catalog
    data/index/collections/<name>/g<N>/               every other generation (an IndexStore folder)
    data/index/collections/<name>/originals/ab/cd/<sha256>

Ids: the live generation's SQLite sequence hands them out; the other generations take them as given, and a
generation that becomes live first raises its sequence above the one it replaces, so no id is handed out twice.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Protocol

from corinfomax.serving.index.backend import VectorIndex
from corinfomax.serving.index.catalog import CATALOG_FILE, DEFAULT, Catalog, CollectionDoc, FolderCatalog, GenerationDoc
from corinfomax.serving.index.store import IndexStore
from corinfomax.serving.index.store_faiss import FAISS_FILE, FAISS_META
from corinfomax.serving.index.store_sqlite import DB_FILE

log = logging.getLogger(__name__)

COLLECTIONS = "collections"
ORIGINALS = "originals"


def generation_folder(folder: Path, name: str, number: int) -> Path:
    """Where generation ``number`` of collection ``name`` lives in index folder ``folder``."""
    return folder if (name, number) == (DEFAULT, 1) else folder / COLLECTIONS / name / f"g{number}"


def originals_folder(folder: Path, name: str) -> Path:
    """Where collection ``name`` keeps its originals in index folder ``folder``."""
    return folder / COLLECTIONS / name / ORIGINALS


class Layout(Protocol):
    """A backend's places for collections, and what its ids need at a switch."""

    location: str
    catalog: Catalog
    shared: bool  # other processes may write the same index (a Milvus server): re-read the catalog per write

    def exists(self, name: str, number: int) -> bool:
        """Whether generation ``number`` of ``name`` has storage (the first generation of an index made before
        collections existed has no catalog entry yet)."""
        ...

    def open(self, name: str, number: int, generation: GenerationDoc, create: bool) -> VectorIndex: ...

    def drop(self, name: str, number: int, store: VectorIndex) -> None: ...

    def drop_collection(self, name: str) -> None:
        """Remove what the collection keeps beside its generations."""
        ...

    def originals_folder(self, name: str) -> Path: ...

    def allocate(self, doc: CollectionDoc, n: int, key: str | None = None) -> list[int] | None:
        """Ids for ``n`` new items written with idempotency ``key``, or None when the live generation numbers them
        itself."""
        ...

    def switched(self, doc: CollectionDoc, live: VectorIndex, old: VectorIndex) -> None:
        """Before ``doc`` (with ``live`` now live, ``old`` before) is committed: ids above every id ``old`` handed
        out, and ``old``'s idempotency keys."""
        ...

    def published(self, doc: CollectionDoc) -> None:
        """After a change of ``doc`` is committed (Milvus: point the collection's alias at its live generation)."""
        ...

    def sweep(self, docs: dict[str, CollectionDoc]) -> None:
        """Delete storage the catalog no longer names (left by a crash between a change and its clean-up)."""
        ...

    def close(self) -> None: ...


class FolderLayout:
    """Collections of an index folder (module docstring)."""

    shared = False

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.location = str(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.catalog: Catalog = FolderCatalog(self.folder / CATALOG_FILE)

    def _path(self, name: str, number: int) -> Path:
        return generation_folder(self.folder, name, number)

    def exists(self, name: str, number: int) -> bool:
        return (self._path(name, number) / DB_FILE).is_file()

    def open(self, name: str, number: int, generation: GenerationDoc, create: bool) -> VectorIndex:
        return IndexStore(self._path(name, number), dim=generation.dim, model_sha256=generation.model_sha256)

    def drop(self, name: str, number: int, store: VectorIndex) -> None:
        store.close()
        path = self._path(name, number)
        if path == self.folder:  # the first generation shares its folder with the catalog: only its own files
            for file in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", FAISS_FILE, FAISS_META):
                (path / file).unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def drop_collection(self, name: str) -> None:
        shutil.rmtree(self.folder / COLLECTIONS / name, ignore_errors=True)

    def originals_folder(self, name: str) -> Path:
        return originals_folder(self.folder, name)

    def allocate(self, doc: CollectionDoc, n: int, key: str | None = None) -> list[int] | None:
        return None

    def switched(self, doc: CollectionDoc, live: VectorIndex, old: VectorIndex) -> None:
        assert isinstance(live, IndexStore) and isinstance(old, IndexStore)
        live.reserve_ids(old.next_id())
        live.take_keys(old)

    def published(self, doc: CollectionDoc) -> None:
        pass

    def sweep(self, docs: dict[str, CollectionDoc]) -> None:
        root = self.folder / COLLECTIONS
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            doc = docs.get(folder.name)
            if doc is None:
                log.warning("index %s: removing %s, a collection the catalog does not name", self.folder, folder)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for generation in sorted(folder.glob("g*")):
                if generation.name[1:].isdigit() and int(generation.name[1:]) not in doc.generations:
                    log.warning("index %s: removing %s, a generation the catalog does not name", self.folder,
                                generation)
                    shutil.rmtree(generation, ignore_errors=True)

    def close(self) -> None:
        self.catalog.close()
