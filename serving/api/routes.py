"""Which model serves each collection, as an API worker knows it (``Routes``).

The index service owns the truth (the catalog); a worker keeps a copy, fetched when it lacks a collection, when
the index service answers that a request was embedded for a generation no longer live (``StaleRoute``: the
request is then embedded again and retried once), and, for ``/embed`` (which never reaches the index service),
when its copy is older than a second. A model a route names that this worker has not loaded (accepted by another
worker's ``/reload_models``) is loaded here from its record in the catalog, checked the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional, TypeVar

from corinfomax.core.errors import NotFound
from corinfomax.serving.api.envelope import call, unwrap
from corinfomax.serving.index.catalog import DEFAULT, StaleRoute, check_name
from corinfomax.serving.models import LoadedModel, ModelRegistry, resolve

log = logging.getLogger("corinfomax.service")

EMBED_ROUTE_SECONDS = 1.0  # how stale /embed's idea of the default collection's model may be
T = TypeVar("T")


class Routes:
    """The routes (collection -> live model, dim, generation) and accepted models, from ``index`` (the proxy to
    ``IndexOwner``), served with the models of ``registry``."""

    def __init__(self, index: Any, registry: ModelRegistry) -> None:
        self.index, self.registry = index, registry
        self.routes: dict[str, dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self._fetched_at = 0.0
        self._recorded: set[str] = set()
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Fetch the routes (and tell the index service about models this worker accepted that it has not heard
        of)."""
        async with self._lock:
            news = [model.record() for model in self.registry.models() if model.key not in self._recorded]
            answer = unwrap(await call(self.index.to_async.routes, models=news or None))
            self._recorded.update(record["key"] for record in news)
            self.routes, self._fetched_at = answer["routes"], time.monotonic()
            self.records = {record["key"]: record for record in answer["models"]}

    def fresh(self) -> bool:
        """Whether the routes were fetched within the last second (a refusal based on them is not a stale one)."""
        return time.monotonic() - self._fetched_at <= EMBED_ROUTE_SECONDS

    async def get(self, collection: Optional[str]) -> dict[str, Any]:
        """The route of ``collection`` (None: the default one); NotFound naming the collections there are."""
        name = DEFAULT if collection is None else check_name(collection)
        if name not in self.routes:
            await self.refresh()
        if name not in self.routes:
            raise NotFound(f"no collection {name!r} (collections: {', '.join(sorted(self.routes))})")
        return self.routes[name]

    async def model(self, key: str) -> LoadedModel:
        """The loaded model ``key``, loading it here when another worker accepted it."""
        if self.registry.has(key):
            return self.registry.get(key)
        if key not in self.records:
            await self.refresh()
        if key not in self.records:
            raise NotFound(f"model {key} is not loaded (models: {', '.join(sorted(self.records))})")
        return await asyncio.to_thread(self.registry.load_accepted, self.records[key])

    async def named(self, name: Any) -> LoadedModel:
        """The model a request names (``name`` or ``name@version``), among every model the service accepted."""
        known = {model.key for model in self.registry.models()} | set(self.records)
        try:
            key = resolve(name, known)
        except NotFound:
            await self.refresh()
            key = resolve(name, known | set(self.records))
        return await self.model(key)

    async def for_embed(self, name: Optional[str]) -> LoadedModel:
        """``/embed``'s model: the one named, else the default collection's (this worker's default model when
        the index service cannot be asked)."""
        if name is not None:
            return await self.named(name)
        if not self.fresh():
            try:
                await self.refresh()
            except Exception as err:  # /embed needs no index: serve it with the default model meanwhile
                log.warning("routes unavailable (%s); /embed uses %s", err, self.registry.default_key)
                return self.registry.get(self.registry.default_key)
        route = self.routes.get(DEFAULT)
        return await self.model(route["model"]) if route else self.registry.get(self.registry.default_key)

    async def serve(self, collection: Optional[str],
                    work: Callable[[dict[str, Any], LoadedModel], Awaitable[T]]) -> T:
        """``work(route, model)`` for ``collection``; once more with fresh routes when the collection changed
        generation (model) meanwhile."""
        route = await self.get(collection)
        try:
            return await work(route, await self.model(route["model"]))
        except StaleRoute:
            await self.refresh()
            route = await self.get(collection)
            return await work(route, await self.model(route["model"]))
