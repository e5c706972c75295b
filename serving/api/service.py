"""The BentoML service: embed, search, classify, and manage the index over HTTP.

Two services, one job each (start with ``bentoml serve serving.service:CorInfoMax``):
- ``CorInfoMax`` (N workers, the public entry): decodes images (files, URLs, base64) in a thread pool,
  validates input, runs the ONNX model in-process with concurrent requests merged into one call
  (``serving.service_batcher.MicroBatcher``), applies the probe or a kNN vote;
- ``IndexOwner``: the process that opens the index; ``CorInfoMax`` calls it through ``bentoml.depends``.
  With an index folder (or a Milvus Lite ``.db`` file, which one process can open) it has 1 worker, so
  every write is seen by every request and SQLite has a single writer. With a Milvus server
  (``milvus://``) it holds no state but a client, so it runs as many workers as the entry service, and
  several replicas of the whole service may serve one collection (docs/ARCHITECTURE.md).
Why the model is not a separate batchable service: the extra hop (uint8 arrays serialised both ways)
and BentoML's dispatcher cost more than the model itself for small images (docs/RESULTS.md "Serving").
Configuration comes from the environment (``serving.api.config.Settings``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import inspect
import logging
import math
import sys
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import bentoml
import numpy as np
from starlette.responses import JSONResponse

from corinfomax.core.bundle import read_card
from corinfomax.core.errors import BadInput
from corinfomax.core.images import walk_images
from corinfomax.core.thumbnails import make_thumbnail
from corinfomax.serving.api import limits, serde, web
from corinfomax.serving.api.batcher import MicroBatcher
from corinfomax.serving.api.config import Settings
from corinfomax.serving.api.fetch import fetch_url
from corinfomax.serving.api.http import GuardMiddleware, JsonErrors, count_known_routes_only, free_timeout_timers
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.index.backend import (
    MAX_K,
    VectorIndex,
    check_k,
    check_key,
    check_metadata,
    is_milvus,
    normalise,
    open_index,
)

log = logging.getLogger("corinfomax.service")
# BentoML's server logging shows its own loggers at INFO and the rest at WARNING: without this, the start-up
# lines (which model, which index folder) never reach the log.
log.setLevel(logging.INFO)
SETTINGS = Settings.from_env()
# Temperature of the /classify kNN vote: 0.07, InstDisc's and DINO's value. It turns the neighbours'
# similarities into the class confidences the API returns (the top label rarely depends on it). `corinfomax eval`
# votes at 0.1 instead (training/evaluate.py), the value every reported accuracy was measured with.
KNN_TEMPERATURE = 0.07


# -- the index ------------------------------------------------------------------------------------


def _envelope(method: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``{"ok": result}`` or ``{"error", "status"}`` so a 4xx crosses the service boundary intact."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return {"ok": method(*args, **kwargs)}
        except BadInput as err:
            return {"error": str(err), "status": err.status}

    wrapper.__signature__ = inspect.signature(method).replace(return_annotation=dict)  # type: ignore[attr-defined]
    return wrapper


def _hits(rows: list[list[Any]]) -> list[list[dict[str, Any]]]:
    return [[{"id": h.id, "score": round(h.score, 6), "metadata": h.metadata, "label": h.label} for h in row]
            for row in rows]


INDEX_ITEMS = bentoml.metrics.Gauge(name="corinfomax_index_items", documentation="Items in the vector index",
                                    multiprocess_mode="livemostrecent")


def index_workers(location: str | Path, api_workers: int) -> int:
    """One index worker for an embedded index (a folder, or a Milvus Lite file: one process only); as many as
    the API has for a Milvus server, whose clients share nothing."""
    return api_workers if str(location).startswith("milvus://") else 1


@bentoml.service(workers=index_workers(SETTINGS.index, SETTINGS.workers), traffic={"timeout": 600})
class IndexOwner:
    """Opens the index (``serving.index.backend.open_index``); all workers of the entry service call it."""

    def __init__(self) -> None:
        import faiss

        # One query per request: OpenMP threads only spin-wait against the model workers (bench/index_scale.py).
        faiss.omp_set_num_threads(1)
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

    @bentoml.api
    @_envelope
    def add(self, vectors: np.ndarray, metadata: Optional[list[dict[str, Any]]] = None,
            labels: Optional[list[Optional[str]]] = None,
            thumbnails: Optional[list[Optional[str]]] = None,  # base64, from CorInfoMax.add
            key: Optional[str] = None) -> list[int]:
        raw = [base64.b64decode(t) if t else None for t in thumbnails] if thumbnails is not None else None
        ids = self.store.add(vectors, metadata, labels, raw, key=key)
        INDEX_ITEMS.set(self.store.count())
        return ids

    @bentoml.api
    @_envelope
    def delete(self, ids: list[int], key: Optional[str] = None) -> list[int]:
        deleted = self.store.delete(ids, key=key)
        INDEX_ITEMS.set(self.store.count())
        return deleted

    @bentoml.api
    @_envelope
    def get(self, id: int) -> dict[str, Any]:  # BentoML names the API field after the parameter: "id"
        item = self.store.get(id)
        return {"id": item.id, "metadata": item.metadata, "label": item.label, "vector": item.vector.tolist()}

    @bentoml.api
    @_envelope
    def thumbnail(self, id: int) -> str:
        return base64.b64encode(self.store.thumbnail(id)).decode()

    @bentoml.api
    @_envelope
    def vectors(self, ids: list[int]) -> list[list[float]]:
        return self.store.vectors(ids).tolist()

    @bentoml.api
    @_envelope
    def search(self, vectors: np.ndarray, k: int, labelled_only: bool = False) -> list[list[dict[str, Any]]]:
        return _hits(self.store.search(vectors, k, labelled_only=labelled_only))

    @bentoml.api
    @_envelope
    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    @bentoml.api
    @_envelope
    def rebuild(self, kind: Optional[str] = None) -> dict[str, Any]:
        if is_milvus(SETTINGS.index):
            raise BadInput("a Milvus collection keeps its own index: change it with Milvus' tools, not rebuild")
        return self.store.rebuild(kind)  # type: ignore[attr-defined]


# -- the public API -------------------------------------------------------------------------------


def _http_errors(api: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Answer BadInput (and subclasses) with its 4xx status and ``{"error": message}``."""

    @functools.wraps(api)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await api(*args, **kwargs)
        except BadInput as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)

    return wrapper


class Unavailable(BadInput):
    """The index service could not be reached twice in a row: the client should retry (503)."""

    status = 503


def keep_one_session(proxy: Any) -> None:
    """Stop BentoML's internal client from replacing its HTTP session every 100 requests or 300 s.

    On replacement it closes the old session at once, cutting off the requests still in flight on it:
    under concurrent load, writes that IndexOwner had applied answered "connection closed" (issue 13).
    One session per worker for its whole life has no such moment.
    """
    sessions = proxy.to_async._session_manager
    if not hasattr(sessions, "max_requests") or not hasattr(sessions, "max_age"):
        raise RuntimeError("BentoML's internal client changed: review keep_one_session in serving/api/service.py")
    sessions.max_requests, sessions.max_age = sys.maxsize, math.inf


async def call(method: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
    """Call a dependency, retrying once on a dropped connection.

    A retry is always safe: reads are idempotent and every write carries an idempotency key, so a write
    that landed before its answer was lost is answered again, not applied twice. What can still drop a
    connection: the callee closing an idle keep-alive connection just as the client reuses it.
    """
    import aiohttp

    try:
        return await method(**kwargs)
    except aiohttp.ClientConnectionError as err:
        log.warning("retrying %s after %s", getattr(method, "__name__", method), type(err).__name__)
    try:
        return await method(**kwargs)
    except aiohttp.ClientConnectionError as err:
        raise Unavailable(f"the index service is unreachable ({type(err).__name__}); retry the request "
                          "(with the same idempotency_key for a write)") from err


def _unwrap(answer: dict[str, Any]) -> Any:
    if "error" in answer:
        error = BadInput(answer["error"])
        error.status = int(answer.get("status", 400))
        raise error
    return answer["ok"]


def decode_b64(text: str, position: int) -> bytes:
    """Base64 (optionally a ``data:...;base64,`` URL) -> bytes."""
    if not isinstance(text, str):
        raise BadInput(f"images_b64[{position}] must be a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput(f"images_b64[{position}] is not valid base64 ({err})") from err


def knn_vote(hits: list[dict[str, Any]], top: int, temperature: float = KNN_TEMPERATURE) -> list[dict[str, Any]]:
    """Weighted kNN vote: each neighbour adds ``exp(score / T)`` to its label; normalised to probabilities."""
    weights: dict[str, float] = {}
    for hit in hits:
        weights[hit["label"]] = weights.get(hit["label"], 0.0) + math.exp((hit["score"] - 1.0) / temperature)
    total = sum(weights.values()) or 1.0
    ranked = sorted(weights.items(), key=lambda kv: -kv[1])[:top]
    return [{"label": label, "probability": round(w / total, 6)} for label, w in ranked]


MODEL_BATCH = bentoml.metrics.Histogram(
    name="corinfomax_model_batch_size", documentation="Images per model call (requests merged by the batcher)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MODEL_SECONDS = bentoml.metrics.Histogram(
    name="corinfomax_model_seconds", documentation="Seconds per model call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))


def _observe_batch(rows: int, seconds: float) -> None:
    MODEL_BATCH.observe(rows)
    MODEL_SECONDS.observe(seconds)


@bentoml.service(workers=SETTINGS.workers, traffic={"timeout": 60},
                 logging={"access": {"enabled": SETTINGS.access_log}})
class CorInfoMax:
    """Public API. Images come as multipart files (``images``), ``urls`` or base64 (``images_b64``)."""

    index = bentoml.depends(IndexOwner)

    def __init__(self) -> None:
        from corinfomax.serving.probe import LinearProbe

        self.bundle = SETTINGS.bundle_dir()
        self.embedder = Embedder(self.bundle, threads=SETTINGS.threads, max_pixels=SETTINGS.max_pixels)
        self.card, self.dim = self.embedder.card, self.embedder.dim
        keep_one_session(self.index)
        self.batcher = MicroBatcher(self.embedder.embed_arrays, SETTINGS.batch_size, SETTINGS.batch_wait_ms,
                                    on_batch=_observe_batch)
        probe_path = SETTINGS.probe_path(self.bundle)
        self.probe = LinearProbe.load(probe_path) if probe_path else None
        if self.probe is not None and self.probe.dim != self.dim:
            raise BadInput(f"probe {probe_path} takes {self.probe.dim}-dim embeddings, the model makes {self.dim}")
        log.info("serving %s on %s (%d intra-op threads, batches of <= %d), probe %s", self.card.tag,
                 self.embedder.providers[0], SETTINGS.threads, SETTINGS.batch_size, probe_path)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.batcher.close()

    # -- helpers ----------------------------------------------------------------------------------

    async def _images(self, images: Optional[list[Path]], urls: Optional[list[str]],
                      images_b64: Optional[list[str]]) -> list[bytes]:
        """Collect raw bytes from the three ways an image can arrive; check the count before any work."""
        count = len(images or []) + len(urls or []) + len(images_b64 or [])
        if count > SETTINGS.max_images:
            raise BadInput(f"{count} images in one request; the limit is {SETTINGS.max_images}")
        raw = [Path(p).read_bytes() for p in images or []]
        raw += [decode_b64(text, i) for i, text in enumerate(images_b64 or [])]
        max_bytes = SETTINGS.max_request_bytes
        raw += await asyncio.gather(*(fetch_url(str(u), max_bytes, allow_private=SETTINGS.allow_private_urls)
                                      for u in urls or []))
        if not raw:
            raise BadInput("no images: send multipart files named 'images', a list 'urls', or a list 'images_b64'")
        return raw

    async def _embed(self, raw: list[bytes]) -> np.ndarray:
        # Decoding in a thread keeps the event loop free; the model call is shared with concurrent requests.
        return await self.batcher(await asyncio.to_thread(self._pixels, raw))

    def _pixels(self, raw: list[bytes]) -> np.ndarray:
        """Decode + the model card's preprocessing; a failure names the image."""
        limits.check_request_pixels(raw, SETTINGS.max_request_pixels)
        out = []
        for i, data in enumerate(raw):
            try:
                out.append(self.embedder.preprocess(data))
            except BadInput as err:
                err.args = (f"image {i}: {err}",)
                raise
        return np.stack(out)

    def _thumbnails(self, raw: list[bytes]) -> list[Optional[str]]:
        """Base64 WebP thumbnails to store with added images; a failure names the image."""
        out: list[Optional[str]] = []
        for i, data in enumerate(raw):
            try:
                out.append(base64.b64encode(make_thumbnail(data, SETTINGS.thumbnail_side, SETTINGS.max_pixels))
                           .decode())
            except BadInput as err:
                err.args = (f"image {i}: {err}",)
                raise
        return out

    async def thumbnail_bytes(self, item_id: int) -> bytes:
        """An item's stored thumbnail (for ``web``'s GET /thumbnails/{id})."""
        return base64.b64decode(_unwrap(await call(self.index.to_async.thumbnail, id=item_id)))

    async def _query_vectors(self, images: Optional[list[Path]], urls: Optional[list[str]],
                             images_b64: Optional[list[str]], vectors: Optional[list[list[float]]],
                             ids: Optional[list[int]]) -> np.ndarray:
        given = [name for name, value in (("images/urls/images_b64", images or urls or images_b64),
                                          ("vectors", vectors), ("ids", ids)) if value]
        if len(given) != 1:
            raise BadInput("give exactly one kind of query: images (files, urls or images_b64), vectors, or ids"
                           + (f"; got {', '.join(given)}" if given else ""))
        if vectors:
            return normalise(vectors, self.dim, "vectors")
        if ids:
            return np.asarray(_unwrap(await call(self.index.to_async.vectors, ids=ids)), dtype=np.float32)
        return await self._embed(await self._images(images, urls, images_b64))

    # -- APIs -------------------------------------------------------------------------------------

    @bentoml.api
    @_http_errors
    async def embed(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                    images_b64: Optional[list[str]] = None) -> dict[str, Any]:
        """Images -> L2-normalised embeddings."""
        vectors = await self._embed(await self._images(images, urls, images_b64))
        return {"embeddings": vectors.tolist(), "dim": self.dim, "model": self.card.name}

    @bentoml.api
    @_http_errors
    async def search(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                     images_b64: Optional[list[str]] = None, vectors: Optional[list[list[float]]] = None,
                     ids: Optional[list[int]] = None, k: int = 10) -> dict[str, Any]:
        """Top-k stored items per query (image, vector or stored id), with scores, metadata and labels."""
        check_k(k)
        limits.check_hits(limits.query_count(images, urls, images_b64, vectors, ids), k)
        queries = await self._query_vectors(images, urls, images_b64, vectors, ids)
        return {"results": _unwrap(await call(self.index.to_async.search, vectors=queries, k=k))}

    @bentoml.api
    @_http_errors
    async def classify(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                       images_b64: Optional[list[str]] = None, k: int = 5, method: str = "auto",
                       neighbours: int = 20) -> dict[str, Any]:
        """Top-k labels per image, by the linear probe or by a weighted kNN vote over labelled items."""
        check_k(k)
        if method not in ("auto", "probe", "knn"):
            raise BadInput(f"method must be 'auto', 'probe' or 'knn', got {method!r}")
        if method == "auto":
            method = "probe" if self.probe is not None else "knn"
        if method == "probe" and self.probe is None:
            raise BadInput("no linear probe loaded (set CORINFOMAX_PROBE or put probe.npz in the bundle); "
                           "use method 'knn'")
        if method == "knn" and not 1 <= neighbours <= MAX_K:
            raise BadInput(f"neighbours must be between 1 and {MAX_K}, got {neighbours}")
        if method == "knn":
            limits.check_hits(limits.query_count(images, urls, images_b64), neighbours, "neighbours")
        vectors = await self._embed(await self._images(images, urls, images_b64))
        if method == "probe":
            assert self.probe is not None
            probs = self.probe.predict_proba(vectors)
            order = np.argsort(-probs, axis=1)[:, :k]
            predictions = [[{"label": self.probe.classes[j], "probability": round(float(p[j]), 6)} for j in row]
                           for p, row in zip(probs, order)]
        else:
            rows = _unwrap(await call(self.index.to_async.search, vectors=vectors, k=neighbours, labelled_only=True))
            if not any(rows):
                raise BadInput("kNN classification needs labelled items in the index; add some with labels first")
            predictions = [knn_vote(row, k) for row in rows]
        return {"method": method, "predictions": predictions}

    @bentoml.api
    @_http_errors
    async def add(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                  images_b64: Optional[list[str]] = None, vectors: Optional[list[list[float]]] = None,
                  metadata: Optional[list[dict[str, Any]]] = None,
                  labels: Optional[list[Optional[str]]] = None,
                  idempotency_key: Optional[str] = None) -> dict[str, Any]:
        """Store images (embedded here, with a thumbnail) or vectors with JSON metadata and optional labels; ids
        once committed.

        A client that lost the answer retries with the same ``idempotency_key`` and gets the same ids.
        """
        key = check_key(idempotency_key) or uuid.uuid4().hex  # our own key makes the internal retry safe
        for i, meta in enumerate(metadata or []):  # before the hop: a hostile nesting must not reach pickle
            check_metadata(meta, f"metadata[{i}]")
        thumbnails = None
        if (images or urls or images_b64) and not vectors:
            raw = await self._images(images, urls, images_b64)
            queries = await self._embed(raw)
            if SETTINGS.thumbnail_side:
                thumbnails = await asyncio.to_thread(self._thumbnails, raw)
        else:
            queries = await self._query_vectors(images, urls, images_b64, vectors, None)
        return {"ids": _unwrap(await call(self.index.to_async.add, vectors=queries, metadata=metadata,
                                          labels=labels, thumbnails=thumbnails, key=key))}

    @bentoml.api
    @_http_errors
    async def delete(self, ids: list[int], idempotency_key: Optional[str] = None) -> dict[str, Any]:
        """Delete stored items by id (all must exist); ``idempotency_key`` as in ``add``."""
        key = check_key(idempotency_key) or uuid.uuid4().hex
        return {"deleted": _unwrap(await call(self.index.to_async.delete, ids=ids, key=key))}

    @bentoml.api
    @_http_errors
    async def get(self, id: int) -> dict[str, Any]:
        """One stored item: id, metadata, label and vector."""
        return _unwrap(await call(self.index.to_async.get, id=id))

    @bentoml.api
    @_http_errors
    async def stats(self) -> dict[str, Any]:
        """Index statistics: count, labelled, kind, recall@10, generation."""
        return _unwrap(await call(self.index.to_async.stats))

    @bentoml.api
    @_http_errors
    async def info(self) -> dict[str, Any]:
        """The model card, the index size and the probe's classes."""
        stats = _unwrap(await call(self.index.to_async.stats))
        return {"model": limits.public_card(self.card.to_json()),
                "index": {"count": stats["count"], "labelled": stats["labelled"], "kind": stats["kind"]},
                "probe": {"classes": self.probe.classes} if self.probe is not None else None,
                "limits": {"max_images": SETTINGS.max_images, "max_request_bytes": SETTINGS.max_request_bytes,
                           "body_timeout_s": SETTINGS.body_seconds,
                           "max_pixels": SETTINGS.max_pixels, "max_request_pixels": SETTINGS.max_request_pixels,
                           "max_k": MAX_K, **limits.PUBLIC}}


web.mount(CorInfoMax)
serde.install()
serde.validate_strictly(CorInfoMax)
free_timeout_timers()
count_known_routes_only(frozenset(f"/{name}" for name in [*CorInfoMax.apis, *IndexOwner.apis]))
CorInfoMax.add_asgi_middleware(JsonErrors)  # outermost of the two: it also reshapes the guard's answers
CorInfoMax.add_asgi_middleware(GuardMiddleware, api_key=SETTINGS.api_key, max_bytes=SETTINGS.max_request_bytes,
                               body_seconds=SETTINGS.body_seconds)


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
