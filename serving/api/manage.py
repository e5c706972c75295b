"""The public API's management endpoints (a base of ``service.CorInfoMax``): collections, their re-embed jobs and
generations, and the models the service loads. Every one is a write or reveals the index's layout, so each needs
the API key when one is set (``http.GuardMiddleware`` guards every path that is not open).

- ``/collections``, ``/create_collection``, ``/drop_collection``;
- ``/reembed`` (-> a job), ``/jobs`` (its state), ``/rollback``, ``/drop_generation``;
- ``/reload_models``: load the bundles added to the models folder since start (each checked, verified on its
  own images where it has them, and warmed up before it serves; a bundle that fails is refused with the reason
  and nothing else changes).
"""

from __future__ import annotations

import asyncio
from typing import Any

import bentoml

from corinfomax.serving.api.envelope import call, http_errors, unwrap
from corinfomax.serving.api.routes import Routes
from corinfomax.serving.index.catalog import check_job_id, check_name
from corinfomax.serving.models import ModelRegistry, public


class Management:
    """Collection and model management over HTTP; the index service does the work (``IndexOwner``)."""

    index: Any
    routes: Routes
    registry: ModelRegistry

    @bentoml.api
    @http_errors
    async def collections(self) -> dict[str, Any]:
        """Every collection: its live model and version, item count, dimension, generation, originals, job."""
        return {"collections": unwrap(await call(self.index.to_async.collections_list))}

    @bentoml.api
    @http_errors
    async def create_collection(self, name: str, model: str, keep_originals: bool = False) -> dict[str, Any]:
        """A new, empty collection whose items ``model`` (a loaded model's name or name@version) embeds."""
        check_name(name)
        loaded = await self.routes.named(model)
        created = unwrap(await call(self.index.to_async.create_collection, name=name, model=loaded.record(),
                                    keep_originals=keep_originals))
        await self.routes.refresh()
        return created

    @bentoml.api
    @http_errors
    async def drop_collection(self, name: str) -> dict[str, Any]:
        """Drop a collection with every generation and kept original (not ``default``)."""
        check_name(name)
        dropped = unwrap(await call(self.index.to_async.drop_collection, name=name))
        await self.routes.refresh()
        return dropped

    @bentoml.api
    @http_errors
    async def reembed(self, collection: str, model: str, allow_missing: bool = False) -> dict[str, Any]:
        """Build a new generation of ``collection`` with ``model`` in the background, then switch to it; follow it
        with ``/jobs``. Items that cannot be embedded again fail the job unless ``allow_missing``."""
        check_name(collection)
        loaded = await self.routes.named(model)
        return unwrap(await call(self.index.to_async.reembed, collection=collection, model=loaded.record(),
                                 allow_missing=allow_missing))

    @bentoml.api
    @http_errors
    async def jobs(self, job: str) -> dict[str, Any]:
        """A re-embed job: its state (running, done, failed), progress, the items left out, and its error."""
        return unwrap(await call(self.index.to_async.job, job=check_job_id(job)))

    @bentoml.api
    @http_errors
    async def rollback(self, collection: str, allow_missing: bool = False) -> dict[str, Any]:
        """Make the previous generation (kept since the last switch) live again at once."""
        check_name(collection)
        answer = unwrap(await call(self.index.to_async.rollback, collection=collection, allow_missing=allow_missing))
        await self.routes.refresh()
        return answer

    @bentoml.api
    @http_errors
    async def drop_generation(self, collection: str) -> dict[str, Any]:
        """Free the previous generation (no rollback to it afterwards)."""
        check_name(collection)
        return unwrap(await call(self.index.to_async.drop_generation, collection=collection))

    @bentoml.api
    @http_errors
    async def reload_models(self) -> dict[str, Any]:
        """Load the bundles added to the models folder since start; refuse those that fail, with the reason."""
        loaded, refused = await asyncio.to_thread(self.registry.reload)
        await self.routes.refresh()  # tells the index service (and so the other workers) about the new ones
        return {"loaded": loaded, "refused": refused,
                "models": [public(record) for _, record in sorted(self.routes.records.items())]}
