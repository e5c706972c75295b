"""How a 4xx travels: from the index service to the public API (in an envelope, so its status and message cross
the internal hop intact) and from the public API to the client (``{"error": message}`` with its status).

``IndexOwner``'s APIs return ``{"ok": result}`` or ``{"error", "status"}`` (``envelope``; ``"stale": true`` when
the request was prepared for a generation that is no longer live); the public API calls them through ``call`` (one
retry on a dropped connection) and opens the answer with ``unwrap``, which raises the same ``BadInput`` (or
``StaleRoute``) again; ``http_errors`` answers it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Awaitable, Callable

from starlette.responses import JSONResponse

from corinfomax.core.errors import BadInput
from corinfomax.serving.api import metrics
from corinfomax.serving.api.channel import ChannelDropped
from corinfomax.serving.index.catalog import StaleRoute

log = logging.getLogger("corinfomax.service")
RETRY_AFTER_S = 1  # a failed index call is retried by the client after this many seconds


class Unavailable(BadInput):
    """The index service could not be reached twice in a row: the client should retry (503)."""

    status = 503


def envelope(method: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``{"ok": result}`` or ``{"error", "status"}`` so a 4xx crosses the service boundary intact."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return {"ok": method(*args, **kwargs)}
        except BadInput as err:
            return {"error": str(err), "status": err.status, **({"stale": True} if isinstance(err, StaleRoute) else {})}

    wrapper.__signature__ = inspect.signature(method).replace(return_annotation=dict)  # type: ignore[attr-defined]
    return wrapper


def unwrap(answer: dict[str, Any]) -> Any:
    """The result inside an ``envelope``'s answer, or its error raised as ``BadInput`` with the same status."""
    if "error" in answer:
        error = StaleRoute(answer["error"]) if answer.get("stale") else BadInput(answer["error"])
        error.status = int(answer.get("status", 400))
        raise error
    return answer["ok"]


async def call(method: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
    """Call a dependency, retrying once on a dropped connection.

    A retry is always safe: reads are idempotent and every write carries an idempotency key, so a write
    that landed before its answer was lost is answered again, not applied twice. What can still drop a
    connection: the callee closing an idle keep-alive connection just as the client reuses it.
    """
    import aiohttp

    dropped = (aiohttp.ClientConnectionError, ChannelDropped)
    try:
        with metrics.timed("index"):
            return await method(**kwargs)
    except dropped as err:
        log.warning("retrying %s after %s", getattr(method, "__name__", method), type(err).__name__)
    try:
        with metrics.timed("index"):
            return await method(**kwargs)
    except dropped as err:
        raise Unavailable(f"the index service is unreachable ({type(err).__name__}); retry the request "
                          "(with the same idempotency_key for a write)") from err


def http_errors(api: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Answer BadInput (and subclasses) with its 4xx status and ``{"error": message}``; mark the handler's start
    and end for the stage metrics (``metrics``: what precedes is ``parse``, what follows ``respond``)."""

    @functools.wraps(api)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        metrics.handler_started()
        try:
            return await api(*args, **kwargs)
        except BadInput as err:
            # A 503 (index unreachable or failing) is worth retrying: say when, as the admission gate does.
            headers = {"retry-after": str(RETRY_AFTER_S)} if err.status == 503 else None
            return JSONResponse({"error": str(err)}, status_code=err.status, headers=headers)
        finally:
            metrics.handler_finished()

    return wrapper
