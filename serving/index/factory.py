"""Which backend an index location names, and opening it: the one place that picks a backend from
``CORINFOMAX_INDEX`` (above both backends, so neither needs to import it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from corinfomax.core.errors import NotFound
from corinfomax.serving.index.backend import VectorIndex
from corinfomax.serving.index.catalog import CATALOG_FILE, DEFAULT, check_name, collection_doc

if TYPE_CHECKING:  # the layouts import their backend's client library: only when one is opened
    from corinfomax.serving.index.layout import Layout


def is_milvus(location: str | Path) -> bool:
    """Whether ``CORINFOMAX_INDEX``-style ``location`` names a Milvus collection rather than an index folder."""
    text = str(location)
    return text.startswith("milvus://") or text.endswith(".db")


def open_index(location: str | Path, dim: int | None = None, model_sha256: str | None = None,
               collection: str | None = None) -> VectorIndex:
    """Open (or create, given ``dim``) the index at ``location``: a folder (SQLite + FAISS), a ``.db`` file
    (Milvus Lite) or ``milvus://host:port/collection`` (a Milvus server; token from CORINFOMAX_MILVUS_TOKEN).

    Opened to read (no ``dim``), it opens the live generation of ``collection`` (default: ``default``), the index
    the service answers that collection from. Each backend's client library (FAISS, pymilvus) is imported only
    when that backend is opened."""
    if dim is None and has_catalog(location):
        layout = open_layout(location)
        doc = collection_doc(layout.catalog, check_name(collection or DEFAULT))
        if doc.live != 1 or doc.name != DEFAULT:
            store = layout.open(doc.name, doc.live, doc.generations[doc.live], create=False)
            if not is_milvus(location):
                layout.close()  # the catalog's connection; a Milvus store keeps the layout's client until exit
            return store
        layout.close()
    elif collection not in (None, DEFAULT):
        raise NotFound(f"{location} has only its default collection, not {collection!r}")
    if is_milvus(location):
        from corinfomax.serving.index.milvus import MilvusStore

        return MilvusStore(str(location), dim=dim, model_sha256=model_sha256)
    from corinfomax.serving.index.store import IndexStore

    return IndexStore(location, dim=dim, model_sha256=model_sha256)


def has_catalog(location: str | Path) -> bool:
    """Whether ``location`` has a catalog (an index made before collections has none until a service opens it)."""
    if not is_milvus(location):
        return (Path(location) / CATALOG_FILE).is_file()
    if str(location).endswith(".db") and not Path(location).exists():
        return False
    from corinfomax.serving.index.milvus import open_client
    from corinfomax.serving.index.milvus_schema import connection

    client = open_client(str(location))
    try:
        return bool(client.has_collection(f"{connection(str(location))[2]}_catalog"))
    finally:
        client.close()


def open_layout(location: str | Path) -> "Layout":
    """The collections' layout at ``location`` (``CORINFOMAX_INDEX``-style): where each collection's generations,
    originals and the catalog live (``serving.index.collections.Collections`` opens them)."""
    if is_milvus(location):
        from corinfomax.serving.index.milvus_layout import MilvusLayout

        return MilvusLayout(str(location))
    from corinfomax.serving.index.layout import FolderLayout

    return FolderLayout(location)
