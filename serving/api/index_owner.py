"""``IndexOwner``: the BentoML service that opens the index and its collections; the public API's workers call it.

With an index folder (or a Milvus Lite ``.db`` file, which one process can open) it has 1 worker, so every
write is seen by every request and SQLite has a single writer. With a Milvus server (``milvus://``) it holds
no state but a client and the catalog it re-reads, so it runs as many workers as the public API, and several
replicas of the whole service may serve one collection (docs/ARCHITECTURE.md). Its answers travel in
``envelope``s. It owns the collections (``serving.index.collections``), their re-embed jobs (threads here) and
the models those need (an ``Embedder`` of one intra-op thread per model, loaded when first needed).
"""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path
from typing import Any, Optional

import bentoml
import numpy as np

from corinfomax.core.bundle import read_card
from corinfomax.core.errors import BadInput, NotFound
from corinfomax.core.images import walk_images
from corinfomax.core.thumbnails import make_thumbnail
from corinfomax.serving.api.channel import ChannelServer, socket_path
from corinfomax.serving.api.config import settings
from corinfomax.serving.api.envelope import envelope
from corinfomax.serving.api.metrics import INDEX_ITEMS
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.index import lite_lock, reads, switch
from corinfomax.serving.index.backend import Hit
from corinfomax.serving.index.catalog import DEFAULT
from corinfomax.serving.index.collections import Collections
from corinfomax.serving.index.factory import is_milvus, open_layout
from corinfomax.serving.index.filters import metadata_field
from corinfomax.serving.index.originals import Budget
from corinfomax.serving.index.reembed import Jobs
from corinfomax.serving.models import card_record, load_embedder

log = logging.getLogger("corinfomax.service")
SETTINGS = settings()
# A Milvus Lite file serves one service: `bentoml serve`'s main process locks it here, before any worker starts,
# so a second service stops at its start, naming the file, and never touches the first one's index.
lite_lock.claim(SETTINGS.index)


def index_workers(location: str | Path, api_workers: int) -> int:
    """One index worker for an embedded index (a folder, or a Milvus Lite file: one process only); as many as
    the API has for a Milvus server, whose clients share nothing."""
    return api_workers if str(location).startswith("milvus://") else 1


class ModelEmbedders:
    """An embedder per model this process needs, by key, from the model's record in the catalog."""

    def __init__(self, default: dict[str, Any]) -> None:
        self.default = default
        self.collections: Collections | None = None
        self._loaded: dict[str, Embedder] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> Embedder:
        with self._lock:
            if key not in self._loaded:
                records = self.collections.model_records() if self.collections is not None else {}
                record = records.get(key) or (self.default if key == self.default["key"] else None)
                if record is None:
                    raise NotFound(f"model {key} was never accepted by this service (POST /reload_models)")
                self._loaded[key] = load_embedder(record, threads=1)
            return self._loaded[key]


@bentoml.service(workers=index_workers(SETTINGS.index, SETTINGS.workers), traffic={"timeout": 600})
class IndexOwner:
    """Opens the collections (``serving.index.factory.open_layout``); all workers of the entry service call it."""

    def __init__(self) -> None:
        bundle = SETTINGS.bundle_dir()
        default = card_record(read_card(bundle), bundle)
        self.embedders = ModelEmbedders(default)
        self.collections = Collections(open_layout(SETTINGS.index), self.embedders,
                                       Budget(SETTINGS.originals_max_bytes), SETTINGS.thumbnail_side)
        self.embedders.collections = self.collections
        self.collections.open(default, SETTINGS.keep_originals)
        self.jobs = Jobs(self.collections)
        first_worker = (bentoml.server_context.worker_index or 1) == 1  # Milvus: workers share one collection
        if SETTINGS.demo_dir is not None and first_worker:
            with self.collections.reading(None) as store:
                empty = store.count() == 0
            if empty:  # first start: index the demo collection so search and classify answer at once
                model = self.collections.route(None)["model"]
                added = seed_collection(self.collections, self.embedders(model), SETTINGS.demo_dir,
                                        thumbnail_side=SETTINGS.thumbnail_side)
                log.info("empty index: added %d demo images from %s", added, SETTINGS.demo_dir)
        if first_worker:
            self.jobs.resume()
            threading.Thread(target=self.collections.sweep, name="sweep", daemon=True).start()
        self._count_items(None)
        log.info("index %s: %s", SETTINGS.index, self.collections.stats(None))

    @bentoml.on_shutdown
    def close(self) -> None:
        self.jobs.close()
        self.collections.close()

    def _count_items(self, collection: Optional[str]) -> None:
        if collection in (None, DEFAULT):
            INDEX_ITEMS.set(self.collections.stats(None)["count"])

    @bentoml.on_startup
    async def open_channel(self) -> None:
        """The API's workers on this machine call this worker over a Unix socket (channel.py)."""
        self.channel: Optional[ChannelServer] = None
        if SETTINGS.index_channel:
            path = socket_path(bentoml.server_context.worker_index or 1)
            self.channel = await ChannelServer(self, IndexOwner, path).start()

    @bentoml.on_shutdown
    async def close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    @bentoml.api
    @envelope
    def add(self, vectors: np.ndarray, metadata: Optional[list[dict[str, Any]]] = None,
            labels: Optional[list[Optional[str]]] = None,
            thumbnails: Optional[list[Optional[str]]] = None,  # base64, from CorInfoMax.add
            key: Optional[str] = None, collection: Optional[str] = None, model: Optional[str] = None,
            originals: Optional[list[str]] = None) -> list[int]:  # base64: the images, when the collection keeps them
        raw = [base64.b64decode(t) if t else None for t in thumbnails] if thumbnails is not None else None
        images = [base64.b64decode(data) for data in originals] if originals is not None else None
        ids = self.collections.add(collection, vectors, metadata, labels, raw, key, images=images, model=model)
        self._count_items(collection)
        return ids

    @bentoml.api
    @envelope
    def delete(self, ids: list[int], key: Optional[str] = None, collection: Optional[str] = None) -> list[int]:
        deleted = self.collections.delete(collection, ids, key)
        self._count_items(collection)
        return deleted

    @bentoml.api
    @envelope
    def get(self, id: int, collection: Optional[str] = None) -> dict[str, Any]:  # BentoML names the field "id"
        with self.collections.reading(collection) as store:
            item = store.get(id)
        return {"id": item.id, "metadata": item.metadata, "label": item.label, "vector": item.vector.tolist()}

    @bentoml.api
    @envelope
    def thumbnail(self, id: int, collection: Optional[str] = None) -> str:
        with self.collections.reading(collection) as store:
            return base64.b64encode(store.thumbnail(id)).decode()

    @bentoml.api
    @envelope
    def vectors(self, ids: list[int], collection: Optional[str] = None) -> list[list[float]]:
        with self.collections.reading(collection) as store:
            return store.vectors(ids).tolist()

    @bentoml.api
    @envelope
    def search(self, vectors: Optional[np.ndarray] = None, k: int = 10, labelled_only: bool = False,
               collection: Optional[str] = None, model: Optional[str] = None,
               ids: Optional[list[int]] = None, filter: Optional[Any] = None,
               score_threshold: Optional[float] = None, dedup: Optional[float] = None) -> list[list[dict[str, Any]]]:
        """Top-k per query vector (embedded with ``model``, when by the API), or per stored item of ``ids`` (read
        from the same generation it is searched in), among the items ``filter`` passes, none below
        ``score_threshold``; with ``dedup`` (a similarity threshold), near-identical hits folded into the best
        ranked one, listed as its ``duplicates``."""
        with self.collections.reading(collection, model) as store:
            queries = store.vectors(ids) if ids is not None else vectors
            if dedup is None:
                return _hits(reads.search(store, queries, k, labelled_only, filter, score_threshold))
            rows = reads.search_folded(store, queries, k, dedup, labelled_only, filter, score_threshold)
            return [[{**_hit(kept), "duplicates": [hit.id for hit in folded]} for kept, folded in row] for row in rows]

    @bentoml.api
    @envelope
    def recommend(self, positive: list[Any], negative: Optional[list[Any]] = None, strategy: str = "average_vector",
                  k: int = 10, filter: Optional[Any] = None, score_threshold: Optional[float] = None,
                  collection: Optional[str] = None) -> list[list[dict[str, Any]]]:
        with self.collections.reading(collection) as store:
            return _hits([reads.recommend_hits(store, positive, negative, strategy, k, filter, score_threshold)])

    @bentoml.api
    @envelope
    def list_items(self, filter: Optional[Any] = None, limit: int = reads.DEFAULT_PAGE,
                   cursor: Optional[str] = None, collection: Optional[str] = None) -> dict[str, Any]:
        with self.collections.reading(collection) as store:
            return reads.page(store, filter, limit, cursor)

    @bentoml.api
    @envelope
    def update(self, id: int, metadata: Optional[dict[str, Any]] = None, label: Optional[str] = None,
               set_label: bool = False, collection: Optional[str] = None) -> dict[str, Any]:
        self.collections.update(collection, id, metadata, label, set_label)
        with self.collections.reading(collection) as store:
            item = store.get(id)
        return {"id": item.id, "metadata": item.metadata, "label": item.label}

    @bentoml.api
    @envelope
    def index_field(self, field: str, collection: Optional[str] = None) -> dict[str, Any]:
        return self.collections.index_field(collection, metadata_field(field))

    @bentoml.api
    @envelope
    def stats(self, collection: Optional[str] = None) -> dict[str, Any]:
        return self.collections.stats(collection)

    @bentoml.api
    @envelope
    def rebuild(self, kind: Optional[str] = None, collection: Optional[str] = None) -> dict[str, Any]:
        if is_milvus(SETTINGS.index):
            raise BadInput("a Milvus collection keeps its own index: change it with Milvus' tools, not rebuild")
        with self.collections.reading(collection) as store:
            return store.rebuild(kind)  # type: ignore[attr-defined]

    # -- collections, generations, jobs, models --------------------------------------------------------

    @bentoml.api
    @envelope
    def routes(self, models: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
        """Each collection's live model, dimension and generation, and the accepted models; ``models``: records of
        models an API worker accepted, remembered first."""
        if models:
            self.collections.record_models(models)
        return {"routes": self.collections.routes(), "models": list(self.collections.model_records().values())}

    @bentoml.api
    @envelope
    def collections_list(self) -> list[dict[str, Any]]:
        return self.collections.describe()

    @bentoml.api
    @envelope
    def create_collection(self, name: str, model: dict[str, Any], keep_originals: bool = False) -> dict[str, Any]:
        self.collections.record_models([model])
        return self.collections.create(name, model, keep_originals)

    @bentoml.api
    @envelope
    def drop_collection(self, name: str) -> dict[str, Any]:
        self.collections.doc(name)  # NotFound before anything stops
        if name != DEFAULT:
            self.jobs.cancel(name)
        self.collections.drop(name)
        return {"dropped": name}

    @bentoml.api
    @envelope
    def reembed(self, collection: str, model: dict[str, Any], allow_missing: bool = False) -> dict[str, Any]:
        return {"job": self.jobs.start(collection, model, allow_missing).id}

    @bentoml.api
    @envelope
    def job(self, job: str) -> dict[str, Any]:
        return self.jobs.get(job)

    @bentoml.api
    @envelope
    def rollback(self, collection: str, allow_missing: bool = False) -> dict[str, Any]:
        answer = switch.rollback(self.collections, collection, allow_missing)
        self._count_items(collection)
        return answer

    @bentoml.api
    @envelope
    def drop_generation(self, collection: str) -> dict[str, Any]:
        return switch.drop_generation(self.collections, collection)


def _hits(rows: list[list[Hit]]) -> list[list[dict[str, Any]]]:
    return [[_hit(hit) for hit in row] for row in rows]


def _hit(hit: Hit) -> dict[str, Any]:
    return {"id": hit.id, "score": round(hit.score, 6), "metadata": hit.metadata, "label": hit.label}


def seed_collection(collections: Collections, embedder: Embedder, folder: str | Path, batch: int = 64,
                    thumbnail_side: int = 0, name: str | None = None) -> int:
    """Index a folder of sample images into collection ``name`` (label = sub-folder name, source = the file, with
    thumbnails of ``thumbnail_side`` px unless 0); return how many."""
    files = walk_images(folder)
    added = 0
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        vectors = embedder.embed_images([path for path, _ in chunk])
        metadata = [{"path": str(path.relative_to(folder))} for path, _ in chunk]
        thumbnails = [make_thumbnail(path, thumbnail_side) for path, _ in chunk] if thumbnail_side else None
        sources: list[str | None] = [f"file:{path.absolute()}" for path, _ in chunk]
        added += len(collections.add(name, vectors, metadata, [label for _, label in chunk], thumbnails,
                                     sources=sources))
    return added
