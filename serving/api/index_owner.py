"""``IndexOwner``: the BentoML service that opens the index; the public API's workers call it.

With an index folder (or a Milvus Lite ``.db`` file, which one process can open) it has 1 worker, so every
write is seen by every request and SQLite has a single writer. With a Milvus server (``milvus://``) it holds
no state but a client, so it runs as many workers as the public API, and several replicas of the whole
service may serve one collection (docs/ARCHITECTURE.md). Its answers travel in ``envelope``s.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Any, Optional

import bentoml
import numpy as np

from corinfomax.core.bundle import read_card
from corinfomax.core.errors import BadInput
from corinfomax.core.images import walk_images
from corinfomax.core.thumbnails import make_thumbnail
from corinfomax.serving.api.channel import ChannelServer, socket_path
from corinfomax.serving.api.config import settings
from corinfomax.serving.api.envelope import envelope
from corinfomax.serving.api.metrics import INDEX_ITEMS
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.index.backend import Hit, VectorIndex
from corinfomax.serving.index.factory import is_milvus, open_index

log = logging.getLogger("corinfomax.service")
SETTINGS = settings()


def index_workers(location: str | Path, api_workers: int) -> int:
    """One index worker for an embedded index (a folder, or a Milvus Lite file: one process only); as many as
    the API has for a Milvus server, whose clients share nothing."""
    return api_workers if str(location).startswith("milvus://") else 1


def one_openmp_thread() -> None:
    """Run FAISS (the embedded index, and Milvus Lite, which searches with FAISS) on one OpenMP thread in every
    thread of this process: one query per request, and OpenMP teams only spin-wait against the model workers
    (bench/index_scale.py).

    ``faiss.omp_set_num_threads(1)`` holds only for the thread that calls it, and BentoML runs each call in a
    thread of its pool, where OpenMP still started a team of every core: a one-query search cost ~3 ms of CPU
    (bench/serve_profile.py, /search: IndexOwner 8.9 -> 2.5 ms of CPU per request with this). Every thread's
    default comes from ``OMP_NUM_THREADS``, read once when the OpenMP runtime loads (with FAISS), so it is set
    before that, and the calling thread is set too in case the runtime is already loaded.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    import faiss

    faiss.omp_set_num_threads(1)


@bentoml.service(workers=index_workers(SETTINGS.index, SETTINGS.workers), traffic={"timeout": 600})
class IndexOwner:
    """Opens the index (``serving.index.factory.open_index``); all workers of the entry service call it."""

    def __init__(self) -> None:
        one_openmp_thread()
        bundle = SETTINGS.bundle_dir()
        card = read_card(bundle)
        self.store = open_index(SETTINGS.index, dim=card.embedding_dim, model_sha256=card.checkpoint_sha256)
        first_worker = (bentoml.server_context.worker_index or 1) == 1  # Milvus: workers share one collection
        if SETTINGS.demo_dir is not None and first_worker and self.store.count() == 0:
            # First start: index the demo collection so search and classify answer at once.
            added = seed_index_if_empty(self.store, Embedder(bundle, threads=1), SETTINGS.demo_dir,
                                        thumbnail_side=SETTINGS.thumbnail_side)
            log.info("empty index: added %d demo images from %s", added, SETTINGS.demo_dir)
        INDEX_ITEMS.set(self.store.count())
        log.info("index %s: %s", SETTINGS.index, self.store.stats())

    @bentoml.on_shutdown
    def close(self) -> None:
        self.store.close()

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
            key: Optional[str] = None) -> list[int]:
        raw = [base64.b64decode(t) if t else None for t in thumbnails] if thumbnails is not None else None
        ids = self.store.add(vectors, metadata, labels, raw, key=key)
        INDEX_ITEMS.set(self.store.count())
        return ids

    @bentoml.api
    @envelope
    def delete(self, ids: list[int], key: Optional[str] = None) -> list[int]:
        deleted = self.store.delete(ids, key=key)
        INDEX_ITEMS.set(self.store.count())
        return deleted

    @bentoml.api
    @envelope
    def get(self, id: int) -> dict[str, Any]:  # BentoML names the API field after the parameter: "id"
        item = self.store.get(id)
        return {"id": item.id, "metadata": item.metadata, "label": item.label, "vector": item.vector.tolist()}

    @bentoml.api
    @envelope
    def thumbnail(self, id: int) -> str:
        return base64.b64encode(self.store.thumbnail(id)).decode()

    @bentoml.api
    @envelope
    def vectors(self, ids: list[int]) -> list[list[float]]:
        return self.store.vectors(ids).tolist()

    @bentoml.api
    @envelope
    def search(self, vectors: np.ndarray, k: int, labelled_only: bool = False) -> list[list[dict[str, Any]]]:
        return _hits(self.store.search(vectors, k, labelled_only=labelled_only))

    @bentoml.api
    @envelope
    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    @bentoml.api
    @envelope
    def rebuild(self, kind: Optional[str] = None) -> dict[str, Any]:
        if is_milvus(SETTINGS.index):
            raise BadInput("a Milvus collection keeps its own index: change it with Milvus' tools, not rebuild")
        return self.store.rebuild(kind)  # type: ignore[attr-defined]


def _hits(rows: list[list[Hit]]) -> list[list[dict[str, Any]]]:
    return [[{"id": h.id, "score": round(h.score, 6), "metadata": h.metadata, "label": h.label} for h in row]
            for row in rows]


def seed_index_if_empty(store: VectorIndex, embedder: Embedder, folder: str | Path, batch: int = 64,
                        thumbnail_side: int = 0) -> int:
    """Index a folder of sample images (label = sub-folder name, with thumbnails of ``thumbnail_side`` px unless
    0) if the index is empty; return how many."""
    if store.count() > 0:
        return 0
    files = walk_images(folder)
    added = 0
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        vectors = embedder.embed_images([path for path, _ in chunk])
        metadata = [{"path": str(path.relative_to(folder))} for path, _ in chunk]
        thumbnails = [make_thumbnail(path, thumbnail_side) for path, _ in chunk] if thumbnail_side else None
        added += len(store.add(vectors, metadata, [label for _, label in chunk], thumbnails))
    return added
