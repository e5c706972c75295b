"""The BentoML service: embed, search, classify, and manage the index over HTTP.

Two services, one job each (start with ``bentoml serve corinfomax.serving.api.service:CorInfoMax``):
- ``CorInfoMax`` (N workers, the public entry, this module): gathers and decodes images in a thread pool
  (``inputs``), validates input, runs the ONNX model in-process with concurrent requests merged into one call
  (``batcher.MicroBatcher``), applies the probe or a kNN vote (``classify``);
- ``IndexOwner`` (``index_owner``): the process that opens the index; ``CorInfoMax`` calls it through
  ``bentoml.depends``, its answers in an ``envelope``.
Why the model is not a separate batchable service: the extra hop (uint8 arrays serialised both ways)
and BentoML's dispatcher cost more than the model itself for small images (docs/RESULTS.md "Serving").
Configuration comes from the environment (``config.Settings``). The bottom of this module assembles the
HTTP app: the search page, BentoML's patched parts (``bentoml_patches``), the guards.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from pathlib import Path
from typing import Any, Optional

import bentoml
import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.serving.api import bentoml_patches, limits, web
from corinfomax.serving.api.admission import AdmissionGate
from corinfomax.serving.api.batcher import MicroBatcher
from corinfomax.serving.api.channel import IndexChannel
from corinfomax.serving.api.classify import knn_vote, probe_predictions
from corinfomax.serving.api.config import settings
from corinfomax.serving.api.direct import DirectApis
from corinfomax.serving.api.envelope import call, http_errors, unwrap
from corinfomax.serving.api.http import GuardMiddleware, JsonErrors
from corinfomax.serving.api.index_owner import IndexOwner, index_workers
from corinfomax.serving.api.inputs import ImageInputs
from corinfomax.serving.api.metrics import StageTimer, model_wait, observe_batch
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.index.backend import MAX_K, check_k, check_key, check_metadata, normalise

log = logging.getLogger("corinfomax.service")
# BentoML's server logging shows its own loggers at INFO and the rest at WARNING: without this, the start-up
# lines (which model, which index folder) never reach the log.
log.setLevel(logging.INFO)
SETTINGS = settings()


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
        self.inputs = ImageInputs(self.embedder, SETTINGS)
        bentoml_patches.keep_one_session(self.index)
        if SETTINGS.index_channel:  # IndexOwner's calls over a Unix socket when it runs on this machine
            channel = IndexChannel.for_worker(bentoml.server_context.worker_index or 1,
                                              index_workers(SETTINGS.index, SETTINGS.workers))
            bentoml_patches.route_calls(self.index, channel.call)
        self.batcher = MicroBatcher(self.embedder.embed_arrays, SETTINGS.batch_size, SETTINGS.batch_wait_ms,
                                    on_batch=observe_batch, on_request=model_wait)
        probe_path = SETTINGS.probe_path(self.bundle)
        self.probe = LinearProbe.load(probe_path) if probe_path else None
        if self.probe is not None and self.probe.dim != self.dim:
            raise BadInput(f"probe {probe_path} takes {self.probe.dim}-dim embeddings, the model makes {self.dim}")
        log.info("serving %s on %s (%d intra-op threads, batches of <= %d), probe %s", self.card.tag,
                 self.embedder.providers[0], SETTINGS.threads, SETTINGS.batch_size, probe_path)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.batcher.close()
        self.inputs.close()

    # -- helpers ----------------------------------------------------------------------------------

    async def _embed(self, raw: list[bytes]) -> np.ndarray:
        # Decoding (inline or in parallel parts: inputs.py); the model call is shared with concurrent requests.
        return await self.batcher(await self.inputs.pixels(raw))

    async def _embed_request(self, images: Optional[list[Path]], urls: Optional[list[str]],
                             images_b64: Optional[list[str]]) -> np.ndarray:
        return await self._embed(await self.inputs.collect(images, urls, images_b64))

    async def thumbnail_bytes(self, item_id: int) -> bytes:
        """An item's stored thumbnail (for ``web``'s GET /thumbnails/{id})."""
        return base64.b64decode(unwrap(await call(self.index.to_async.thumbnail, id=item_id)))

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
            return np.asarray(unwrap(await call(self.index.to_async.vectors, ids=ids)), dtype=np.float32)
        return await self._embed_request(images, urls, images_b64)

    # -- APIs -------------------------------------------------------------------------------------

    @bentoml.api
    @http_errors
    async def embed(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                    images_b64: Optional[list[str]] = None) -> dict[str, Any]:
        """Images -> L2-normalised embeddings."""
        vectors = await self._embed_request(images, urls, images_b64)
        return {"embeddings": vectors.tolist(), "dim": self.dim, "model": self.card.name}

    @bentoml.api
    @http_errors
    async def search(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                     images_b64: Optional[list[str]] = None, vectors: Optional[list[list[float]]] = None,
                     ids: Optional[list[int]] = None, k: int = 10) -> dict[str, Any]:
        """Top-k stored items per query (image, vector or stored id), with scores, metadata and labels."""
        check_k(k)
        limits.check_hits(limits.query_count(images, urls, images_b64, vectors, ids), k)
        queries = await self._query_vectors(images, urls, images_b64, vectors, ids)
        return {"results": unwrap(await call(self.index.to_async.search, vectors=queries, k=k))}

    @bentoml.api
    @http_errors
    async def classify(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                       images_b64: Optional[list[str]] = None, k: int = 5, method: str = "auto",
                       neighbours: int = 20) -> dict[str, Any]:
        """Top-k labels per image, by the linear probe or by a weighted kNN vote over labelled items."""
        check_k(k)
        method = self._classify_method(method)
        if method == "knn" and not 1 <= neighbours <= MAX_K:
            raise BadInput(f"neighbours must be between 1 and {MAX_K}, got {neighbours}")
        if method == "knn":
            limits.check_hits(limits.query_count(images, urls, images_b64), neighbours, "neighbours")
        vectors = await self._embed_request(images, urls, images_b64)
        if method == "probe":
            assert self.probe is not None
            return {"method": method, "predictions": probe_predictions(self.probe, vectors, k)}
        rows = unwrap(await call(self.index.to_async.search, vectors=vectors, k=neighbours, labelled_only=True))
        if not any(rows):
            raise BadInput("kNN classification needs labelled items in the index; add some with labels first")
        return {"method": method, "predictions": [knn_vote(row, k) for row in rows]}

    def _classify_method(self, method: str) -> str:
        """``method`` as asked, ``auto`` resolved: the probe when one is loaded, else kNN."""
        if method not in ("auto", "probe", "knn"):
            raise BadInput(f"method must be 'auto', 'probe' or 'knn', got {method!r}")
        if method == "auto":
            return "probe" if self.probe is not None else "knn"
        if method == "probe" and self.probe is None:
            raise BadInput("no linear probe loaded (set CORINFOMAX_PROBE or put probe.npz in the bundle); "
                           "use method 'knn'")
        return method

    @bentoml.api
    @http_errors
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
            raw = await self.inputs.collect(images, urls, images_b64)
            queries = await self._embed(raw)
            if SETTINGS.thumbnail_side:
                thumbnails = await asyncio.to_thread(self.inputs.thumbnails, raw)
        else:
            queries = await self._query_vectors(images, urls, images_b64, vectors, None)
        return {"ids": unwrap(await call(self.index.to_async.add, vectors=queries, metadata=metadata,
                                         labels=labels, thumbnails=thumbnails, key=key))}

    @bentoml.api
    @http_errors
    async def delete(self, ids: list[int], idempotency_key: Optional[str] = None) -> dict[str, Any]:
        """Delete stored items by id (all must exist); ``idempotency_key`` as in ``add``."""
        key = check_key(idempotency_key) or uuid.uuid4().hex
        return {"deleted": unwrap(await call(self.index.to_async.delete, ids=ids, key=key))}

    @bentoml.api
    @http_errors
    async def get(self, id: int) -> dict[str, Any]:
        """One stored item: id, metadata, label and vector."""
        return unwrap(await call(self.index.to_async.get, id=id))

    @bentoml.api
    @http_errors
    async def stats(self) -> dict[str, Any]:
        """Index statistics: count, labelled, kind, recall@10, generation."""
        return unwrap(await call(self.index.to_async.stats))

    @bentoml.api
    @http_errors
    async def info(self) -> dict[str, Any]:
        """The model card, the index size and the probe's classes."""
        stats = unwrap(await call(self.index.to_async.stats))
        return {"model": limits.public_card(self.card.to_json()),
                "index": {"count": stats["count"], "labelled": stats["labelled"], "kind": stats["kind"]},
                "probe": {"classes": self.probe.classes} if self.probe is not None else None,
                "limits": {"max_images": SETTINGS.max_images, "max_request_bytes": SETTINGS.max_request_bytes,
                           "body_timeout_s": SETTINGS.body_seconds,
                           "max_pixels": SETTINGS.max_pixels, "max_request_pixels": SETTINGS.max_request_pixels,
                           "max_k": MAX_K, "max_queue_ms": SETTINGS.max_queue_ms, **limits.PUBLIC}}


web.mount(CorInfoMax)
bentoml_patches.apply(CorInfoMax, routes=frozenset(f"/{name}" for name in [*CorInfoMax.apis, *IndexOwner.apis]))
CorInfoMax.add_asgi_middleware(web.FrontDoor)  # outermost: the redirect from / needs no key
CorInfoMax.add_asgi_middleware(JsonErrors)  # outside the guard: it also reshapes the guard's answers
CorInfoMax.add_asgi_middleware(GuardMiddleware, api_key=SETTINGS.api_key, max_bytes=SETTINGS.max_request_bytes,
                               body_seconds=SETTINGS.body_seconds)
ROUTES = {f"/{name}": name for name in CorInfoMax.apis}
CorInfoMax.add_asgi_middleware(AdmissionGate, routes=ROUTES, max_wait_ms=SETTINGS.max_queue_ms)  # 503 when overloaded
CorInfoMax.add_asgi_middleware(StageTimer, routes=ROUTES)  # stage metrics (metrics.py)
if SETTINGS.direct_apis:  # innermost: the APIs past BentoML's per-request machinery (direct.py)
    CorInfoMax.add_asgi_middleware(DirectApis, service=CorInfoMax)
