"""The BentoML service: embed, search, classify, and manage the index over HTTP.

Two services, one job each (start with ``bentoml serve corinfomax.serving.api.service:CorInfoMax``):
- ``CorInfoMax`` (N workers, the public entry, this module): gathers and decodes images in a thread pool
  (``inputs``), validates input, runs the collection's model in-process with concurrent requests merged into
  one call (``batcher.MicroBatcher``, one per model of ``serving.models.ModelRegistry``), applies the probe or a
  kNN vote (``classify``); its collection and model management endpoints are ``manage.Management``'s;
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
from typing import Any, Awaitable, Callable, Optional

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
from corinfomax.serving.api.manage import Management
from corinfomax.serving.api.metrics import StageTimer, model_wait, observe_batch
from corinfomax.serving.api.routes import Routes
from corinfomax.serving.index.backend import MAX_K, check_ids, check_k, check_key, check_metadata, normalise
from corinfomax.serving.index.catalog import StaleRoute
from corinfomax.serving.index.duplicates import DEFAULT_THRESHOLD
from corinfomax.serving.index.duplicates import check_threshold as check_similarity
from corinfomax.serving.index.filters import metadata_field, parse_filter
from corinfomax.serving.index.reads import DEFAULT_PAGE, check_examples, check_limit
from corinfomax.serving.index.recommend import check_threshold
from corinfomax.serving.models import LoadedModel, ModelRegistry, public

log = logging.getLogger("corinfomax.service")
# BentoML's server logging shows its own loggers at INFO and the rest at WARNING: without this, the start-up
# lines (which model, which index folder) never reach the log.
log.setLevel(logging.INFO)
SETTINGS = settings()


@bentoml.service(workers=SETTINGS.workers, traffic={"timeout": 60},
                 logging={"access": {"enabled": SETTINGS.access_log}})
class CorInfoMax(Management):
    """Public API. Images come as multipart files (``images``), ``urls`` or base64 (``images_b64``). A request may
    name a ``collection`` (default: ``default``), and ``/embed`` a ``model`` (default: the default collection's)."""

    index = bentoml.depends(IndexOwner)

    def __init__(self) -> None:
        self.registry = ModelRegistry(SETTINGS.models_dir, SETTINGS.bundle_dir(), SETTINGS.probe,
                                      threads=SETTINGS.threads, max_pixels=SETTINGS.max_pixels)
        self.routes = Routes(self.index, self.registry)
        self.inputs = ImageInputs(SETTINGS)
        self.batchers: dict[str, MicroBatcher] = {}
        bentoml_patches.keep_one_session(self.index)
        if SETTINGS.index_channel:  # IndexOwner's calls over a Unix socket when it runs on this machine
            channel = IndexChannel.for_worker(bentoml.server_context.worker_index or 1,
                                              index_workers(SETTINGS.index, SETTINGS.workers))
            bentoml_patches.route_calls(self.index, channel.call)
        default = self.registry.get(self.registry.default_key)
        log.info("serving %s on %s (%d intra-op threads, batches of <= %d), probe %s; models: %s", default.key,
                 default.embedder.providers[0], SETTINGS.threads, SETTINGS.batch_size,
                 SETTINGS.probe or (default.path / "probe.npz" if default.probe is not None else None),
                 ", ".join(model.key for model in self.registry.models()))

    @bentoml.on_shutdown
    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()
        self.inputs.close()

    # -- helpers ----------------------------------------------------------------------------------

    async def _embed(self, raw: list[bytes], model: LoadedModel) -> np.ndarray:
        # Decoding (inline or in parallel parts: inputs.py); the model call is shared with concurrent requests.
        if model.key not in self.batchers:
            self.batchers[model.key] = MicroBatcher(model.embedder.embed_arrays, SETTINGS.batch_size,
                                                    SETTINGS.batch_wait_ms, on_batch=observe_batch,
                                                    on_request=model_wait)
        return await self.batchers[model.key](await self.inputs.pixels(raw, model.embedder))

    def _as_query(self, vectors: list[list[float]], route: dict[str, Any]) -> np.ndarray:
        """Client vectors checked against the collection's dimension (stale when the routes may be)."""
        try:
            return normalise(vectors, route["dim"], "vectors")
        except BadInput:
            if not self.routes.fresh():  # the collection may have switched to a model of another dimension
                raise StaleRoute("routes out of date") from None
            raise

    async def thumbnail_bytes(self, item_id: int, collection: Optional[str] = None) -> bytes:
        """An item's stored thumbnail (for ``web``'s GET /thumbnails/{id})."""
        return base64.b64decode(unwrap(await call(self.index.to_async.thumbnail, id=item_id, collection=collection)))

    async def _search(self, images: Optional[list[Path]], urls: Optional[list[str]], images_b64: Optional[list[str]],
                      vectors: Optional[list[list[float]]], ids: Optional[list[int]], collection: Optional[str],
                      **options: Any) -> Any:
        """Search ``collection`` by one kind of query: images (embedded with its model), vectors, or stored ids."""
        check_one_query(images, urls, images_b64, vectors, ids)
        if not (vectors or ids):
            return await self._search_images(await self.inputs.collect(images, urls, images_b64), collection,
                                             **options)

        async def work(route: dict[str, Any], model: LoadedModel) -> Any:
            if ids:
                return await call(self.index.to_async.search, ids=ids, collection=collection, **options)
            queries = self._as_query(vectors or [], route)
            return await call(self.index.to_async.search, vectors=queries, collection=collection, **options)

        return unwrap(await self.routes.serve(collection, work))

    async def _search_images(self, raw: list[bytes], collection: Optional[str], **options: Any) -> Any:
        """Search ``collection`` by images, embedded with its live model (again, if it switched meanwhile)."""

        async def work(route: dict[str, Any], model: LoadedModel) -> Any:
            queries = await self._embed(raw, model)
            return unwrap_stale(await call(self.index.to_async.search, vectors=queries, collection=collection,
                                           model=route["model"], **options))

        return unwrap(await self.routes.serve(collection, work))

    # -- APIs -------------------------------------------------------------------------------------

    @bentoml.api
    @http_errors
    async def embed(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                    images_b64: Optional[list[str]] = None, model: Optional[str] = None) -> dict[str, Any]:
        """Images -> L2-normalised embeddings, by ``model`` (a loaded model's name, or name@version; default: the
        default collection's)."""
        loaded = await self.routes.for_embed(model)
        vectors = await self._embed(await self.inputs.collect(images, urls, images_b64), loaded)
        return {"embeddings": vectors.tolist(), "dim": loaded.card.embedding_dim, "model": loaded.card.name}

    @bentoml.api
    @http_errors
    async def search(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                     images_b64: Optional[list[str]] = None, vectors: Optional[list[list[float]]] = None,
                     ids: Optional[list[int]] = None, k: int = 10, collection: Optional[str] = None,
                     filter: Optional[Any] = None, score_threshold: Optional[float] = None, dedup: bool = False,
                     dedup_threshold: Optional[float] = None) -> dict[str, Any]:
        """Top-k stored items per query (image, vector or stored id), with scores, metadata and labels; only items
        that ``filter`` passes (a JSON object, or its text in a form) and score at least ``score_threshold``. With
        ``dedup``, results at least ``dedup_threshold`` similar to a better ranked one are folded into it (listed
        as its ``duplicates``), and k results are kept while the collection has them."""
        check_k(k)
        limits.check_hits(limits.query_count(images, urls, images_b64, vectors, ids), k)
        options = {**search_options(filter, score_threshold), **dedup_option(dedup, dedup_threshold)}
        return {"results": await self._search(images, urls, images_b64, vectors, ids, collection, k=k, **options)}

    @bentoml.api
    @http_errors
    async def recommend(self, positive: list[Any], negative: Optional[list[Any]] = None,
                        strategy: str = "average_vector", k: int = 10, filter: Optional[Any] = None,
                        score_threshold: Optional[float] = None, collection: Optional[str] = None) -> dict[str, Any]:
        """Items like the ``positive`` examples and unlike the ``negative`` ones (stored ids or vectors), by
        ``strategy`` ``average_vector`` or ``best_score``; the examples themselves are left out. /search's answer."""
        check_k(k)
        check_examples(positive, "positive")
        check_examples(negative, "negative")
        options = search_options(filter, score_threshold)
        return {"results": unwrap(await call(self.index.to_async.recommend, positive=positive, negative=negative,
                                             strategy=strategy, k=k, collection=collection, **options))}

    @bentoml.api(route="/list")
    @http_errors
    async def list_items(self, filter: Optional[Any] = None, limit: int = DEFAULT_PAGE, cursor: Optional[str] = None,
                         collection: Optional[str] = None) -> dict[str, Any]:
        """Stored items (id, label, metadata) in id order that ``filter`` passes, ``limit`` a page; ``cursor``: the
        previous page's, for the next (null after the last)."""
        check_limit(limit)
        return unwrap(await call(self.index.to_async.list_items, limit=limit, cursor=cursor, collection=collection,
                                 **search_options(filter, None)))

    @bentoml.api
    @http_errors
    async def update(self, id: int, metadata: Optional[dict[str, Any]] = None, label: Optional[str] = None,
                     collection: Optional[str] = None) -> dict[str, Any]:
        """Replace a stored item's metadata and/or label (``""`` removes it) without embedding it again, in every
        generation of the collection; the item as now stored."""
        if metadata is not None:
            check_metadata(metadata, "metadata")
        return unwrap(await call(self.index.to_async.update, id=id, metadata=metadata, label=label or None,
                                 set_label=label is not None, collection=collection))

    @bentoml.api
    @http_errors
    async def index_field(self, field: str, collection: Optional[str] = None) -> dict[str, Any]:
        """Index a metadata field (``metadata.<path>``) for filters (folder index: an SQLite expression index; Milvus
        Lite: none); the collection's indexed fields."""
        metadata_field(field)
        return unwrap(await call(self.index.to_async.index_field, field=field, collection=collection))

    @bentoml.api
    @http_errors
    async def duplicates(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                         images_b64: Optional[list[str]] = None, vectors: Optional[list[list[float]]] = None,
                         ids: Optional[list[int]] = None, threshold: float = DEFAULT_THRESHOLD, k: int = 10,
                         collection: Optional[str] = None) -> dict[str, Any]:
        """Stored near-duplicates of each query (image, vector or stored id): the items at least ``threshold``
        similar, best first, at most ``k``; an id query's own item is left out."""
        threshold = check_similarity(threshold)
        check_k(k)
        ids = check_ids(ids) if ids else ids  # one answer row per distinct id, as /search gives
        limits.check_hits(limits.query_count(images, urls, images_b64, vectors, ids), k)
        fetch = min(k + 1, MAX_K) if ids else k  # an id query's own item is among its hits
        rows = await self._search(images, urls, images_b64, vectors, ids, collection, k=fetch)
        own: list[Optional[int]] = list(ids) if ids else [None] * len(rows)
        return {"results": [[hit for hit in row if hit["score"] >= threshold and hit["id"] != item][:k]
                            for row, item in zip(rows, own)]}

    @bentoml.api
    @http_errors
    async def classify(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                       images_b64: Optional[list[str]] = None, k: int = 5, method: str = "auto",
                       neighbours: int = 20, collection: Optional[str] = None,
                       filter: Optional[Any] = None) -> dict[str, Any]:
        """Top-k labels per image, by the collection's model's linear probe or by a weighted kNN vote over its
        labelled items (those ``filter`` passes)."""
        check_k(k)
        options = search_options(filter, None)
        if method not in ("auto", "probe", "knn"):
            raise BadInput(f"method must be 'auto', 'probe' or 'knn', got {method!r}")
        method = self._classify_method(method, await self.routes.model((await self.routes.get(collection))["model"]))
        if method == "probe" and options:
            raise BadInput("filter: applies to kNN classification only (method 'knn')")
        if method == "knn" and not 1 <= neighbours <= MAX_K:
            raise BadInput(f"neighbours must be between 1 and {MAX_K}, got {neighbours}")
        if method == "knn":
            limits.check_hits(limits.query_count(images, urls, images_b64), neighbours, "neighbours")
        raw = await self.inputs.collect(images, urls, images_b64)
        if method == "probe":
            return await self.routes.serve(collection, self._probe_work(raw, k))
        rows = await self._search_images(raw, collection, k=neighbours, labelled_only=True, **options)
        if not any(rows):
            raise BadInput("kNN classification needs labelled items in the index; add some with labels first")
        return {"method": method, "predictions": [knn_vote(row, k) for row in rows]}

    def _probe_work(self, raw: list[bytes], k: int) -> Callable[[dict[str, Any], LoadedModel],
                                                                Awaitable[dict[str, Any]]]:
        async def work(route: dict[str, Any], model: LoadedModel) -> dict[str, Any]:
            if model.probe is None:
                raise BadInput(f"collection {route['name']!r} now uses model {model.key}, which has no probe; "
                               "use method 'knn'")
            vectors = await self._embed(raw, model)
            return {"method": "probe", "predictions": probe_predictions(model.probe, vectors, k)}

        return work

    @staticmethod
    def _classify_method(method: str, model: LoadedModel) -> str:
        """``method`` as asked, ``auto`` resolved: the probe when the model has one, else kNN."""
        if method == "auto":
            return "probe" if model.probe is not None else "knn"
        if method == "probe" and model.probe is None:
            raise BadInput("no linear probe loaded (set CORINFOMAX_PROBE or put probe.npz in the bundle); "
                           "use method 'knn'")
        return method

    @bentoml.api
    @http_errors
    async def add(self, images: list[Path] = [], urls: Optional[list[str]] = None,
                  images_b64: Optional[list[str]] = None, vectors: Optional[list[list[float]]] = None,
                  metadata: Optional[list[dict[str, Any]]] = None,
                  labels: Optional[list[Optional[str]]] = None,
                  idempotency_key: Optional[str] = None, collection: Optional[str] = None) -> dict[str, Any]:
        """Store images (embedded here, with a thumbnail, and kept when the collection keeps originals) or vectors
        with JSON metadata and optional labels; ids once committed.

        A client that lost the answer retries with the same ``idempotency_key`` and gets the same ids.
        """
        key = check_key(idempotency_key) or uuid.uuid4().hex  # our own key makes the internal retry safe
        for i, meta in enumerate(metadata or []):  # before the hop: a hostile nesting must not reach pickle
            check_metadata(meta, f"metadata[{i}]")
        by_images = bool(images or urls or images_b64) and not vectors
        if not by_images:
            check_one_query(images, urls, images_b64, vectors, None)
        raw = await self.inputs.collect(images, urls, images_b64) if by_images else []
        thumbnails: Optional[list[Optional[str]]] = None

        async def work(route: dict[str, Any], model: LoadedModel) -> Any:
            nonlocal thumbnails
            fields = dict(metadata=metadata, labels=labels, key=key, collection=collection)
            if not by_images:
                return await call(self.index.to_async.add, vectors=self._as_query(vectors or [], route), **fields)
            queries = await self._embed(raw, model)  # first: a bad image is named by the decoder, as before
            if thumbnails is None and SETTINGS.thumbnail_side:
                thumbnails = await asyncio.to_thread(self.inputs.thumbnails, raw)
            originals = [base64.b64encode(data).decode() for data in raw] if route["keep_originals"] else None
            return unwrap_stale(await call(self.index.to_async.add, vectors=queries, model=route["model"],
                                           thumbnails=thumbnails, originals=originals, **fields))

        return {"ids": unwrap(await self.routes.serve(collection, work))}

    @bentoml.api
    @http_errors
    async def delete(self, ids: list[int], idempotency_key: Optional[str] = None,
                     collection: Optional[str] = None) -> dict[str, Any]:
        """Delete stored items by id (all must exist); ``idempotency_key`` as in ``add``."""
        key = check_key(idempotency_key) or uuid.uuid4().hex
        return {"deleted": unwrap(await call(self.index.to_async.delete, ids=ids, key=key, collection=collection))}

    @bentoml.api
    @http_errors
    async def get(self, id: int, collection: Optional[str] = None) -> dict[str, Any]:
        """One stored item: id, metadata, label and vector."""
        return unwrap(await call(self.index.to_async.get, id=id, collection=collection))

    @bentoml.api
    @http_errors
    async def stats(self, collection: Optional[str] = None) -> dict[str, Any]:
        """Index statistics: count, labelled, kind, recall@10, generation (and the originals kept)."""
        return unwrap(await call(self.index.to_async.stats, collection=collection))

    @bentoml.api
    @http_errors
    async def info(self, collection: Optional[str] = None) -> dict[str, Any]:
        """The collection's model card, its index size and probe classes, the limits, and every model loaded."""
        if not self.routes.fresh():  # the models other workers accepted since, too
            await self.routes.refresh()
        route = await self.routes.get(collection)
        model = await self.routes.model(route["model"])
        stats = unwrap(await call(self.index.to_async.stats, collection=collection))
        return {"model": limits.public_card(model.card.to_json()),
                "index": {"count": stats["count"], "labelled": stats["labelled"], "kind": stats["kind"]},
                "probe": {"classes": model.probe.classes} if model.probe is not None else None,
                "limits": {"max_images": SETTINGS.max_images, "max_request_bytes": SETTINGS.max_request_bytes,
                           "body_timeout_s": SETTINGS.body_seconds,
                           "max_pixels": SETTINGS.max_pixels, "max_request_pixels": SETTINGS.max_request_pixels,
                           "max_k": MAX_K, "max_queue_ms": SETTINGS.max_queue_ms, **limits.PUBLIC},
                "models": [public(record) for record in sorted(self.routes.records.values(),
                                                               key=lambda record: record["key"])]}


def check_one_query(images: Optional[list[Path]], urls: Optional[list[str]], images_b64: Optional[list[str]],
                    vectors: Optional[list[list[float]]], ids: Optional[list[int]]) -> None:
    given = [name for name, value in (("images/urls/images_b64", images or urls or images_b64),
                                      ("vectors", vectors), ("ids", ids)) if value]
    if len(given) != 1:
        raise BadInput("give exactly one kind of query: images (files, urls or images_b64), vectors, or ids"
                       + (f"; got {', '.join(given)}" if given else ""))


def search_options(flt: Any, score_threshold: Optional[float]) -> dict[str, Any]:
    """A search's optional filter and threshold, checked before any work (the index service parses the filter
    again from its JSON: only JSON crosses to it); absent ones are not sent, so old requests travel as before."""
    options: dict[str, Any] = {}
    if parse_filter(flt) is not None:
        options["filter"] = flt
    if check_threshold(score_threshold) is not None:
        options["score_threshold"] = score_threshold
    return options


def dedup_option(dedup: bool, threshold: Optional[float]) -> dict[str, float]:
    """The index's ``dedup`` option for /search: none without ``dedup``, so such a request answers as before."""
    if not dedup:
        if threshold is not None:
            raise BadInput("dedup_threshold is used only with dedup: true")
        return {}
    return {"dedup": check_similarity(DEFAULT_THRESHOLD if threshold is None else threshold, "dedup_threshold")}


def unwrap_stale(answer: dict[str, Any]) -> dict[str, Any]:
    """Raise a stale answer (so ``Routes.serve`` retries with the collection's new model); pass others on."""
    if answer.get("stale"):
        unwrap(answer)
    return answer


web.mount(CorInfoMax)
bentoml_patches.apply(CorInfoMax, routes=frozenset(api.route for api in [*CorInfoMax.apis.values(),
                                                                            *IndexOwner.apis.values()]))
CorInfoMax.add_asgi_middleware(web.FrontDoor)  # outermost: the redirect from / needs no key
CorInfoMax.add_asgi_middleware(JsonErrors)  # outside the guard: it also reshapes the guard's answers
CorInfoMax.add_asgi_middleware(GuardMiddleware, api_key=SETTINGS.api_key, max_bytes=SETTINGS.max_request_bytes,
                               body_seconds=SETTINGS.body_seconds)
ROUTES = {api.route: name for name, api in CorInfoMax.apis.items()}
CorInfoMax.add_asgi_middleware(AdmissionGate, routes=ROUTES, max_wait_ms=SETTINGS.max_queue_ms)  # 503 when overloaded
CorInfoMax.add_asgi_middleware(StageTimer, routes=ROUTES)  # stage metrics (metrics.py)
if SETTINGS.direct_apis:  # innermost: the APIs past BentoML's per-request machinery (direct.py)
    CorInfoMax.add_asgi_middleware(DirectApis, service=CorInfoMax)
