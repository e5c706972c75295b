"""Every change this service makes to BentoML's internals, in one place, each with why.

BentoML 1.4 has no public hook for any of these, so each reaches a private name; pyproject pins the versions
they were checked against (``bentoml>=1.4.40,<1.5``) and tests/test_bentoml_patches.py checks, without a
server, that every private name below still exists with the shape used here, so an upgrade that moves one
fails fast and names the patch. Apply them all with ``apply(service, routes)`` at import (and
``keep_one_session`` on each dependency proxy at start-up).
"""

from __future__ import annotations

import asyncio
import math
import sys
from typing import Any, Awaitable, Callable

from corinfomax.serving.api.http import Receive, Scope, Send, send_error
from corinfomax.serving.api.serde import GuardedJSONSerde, GuardedMultipartSerde


def apply(service: Any, routes: frozenset[str]) -> None:
    """The process-wide patches, and strict validation of ``service``'s inputs; ``routes``: the paths that
    get metric series."""
    use_guarded_parsers()
    validate_strictly(service)
    free_timeout_timers()
    count_known_routes_only(routes)
    log_tracebacks_for_5xx_only()


def use_guarded_parsers() -> None:
    """Parse JSON and forms with ``serde``'s guarded parsers, which never fetch a URL given as text.

    BentoML's own parsers download any text given in place of a file, unguarded (``serde`` says more).
    Relies on: ``_bentoml_impl.serde.ALL_SERDE``, the dict BentoML looks a request's parser up in by media type.
    """
    from _bentoml_impl.serde import ALL_SERDE

    serdes: Any = ALL_SERDE  # typed as a read-only Mapping, but it is the dict BentoML looks parsers up in
    serdes["application/json"] = GuardedJSONSerde
    serdes["multipart/form-data"] = GuardedMultipartSerde
    serdes["application/x-www-form-urlencoded"] = GuardedMultipartSerde


def validate_strictly(service: Any) -> None:
    """Validate ``service``'s API inputs without pydantic's lax conversions, and refuse unknown fields.

    Lax mode reads ``true`` as the id 1, ``"10"`` as the number 10 and ``"0.5"`` as a vector component, so a
    client's type mistake would act on the wrong item instead of being named. A form's text fields are
    parsed as JSON first (BentoML), so ``-F k=10`` is still the number 10 there. BentoML's models ignore
    fields the API does not take, so a misspelt option (``"fitler"``, ``-F image=@cat.jpg``) silently did
    nothing; every field of a JSON body or a form (BentoML puts each form part in the model's input) must
    now be a parameter of the API.
    Relies on: ``service.apis[name].input_spec``, the pydantic model BentoML builds from each API's signature.
    """
    for api in service.apis.values():
        model = api.input_spec
        model.model_config["strict"] = True
        model.model_config["extra"] = "forbid"
        model.model_rebuild(force=True)


def log_tracebacks_for_5xx_only() -> None:
    """Keep BentoML from logging a traceback for a request it answers with a 4xx.

    BentoML logs every exception an API raises with its traceback, including the invalid input it answers 400
    (pydantic's ValidationError, its own 4xx exceptions, the parsers' ``RequestError``, the guard's 408 and
    413): a black-box run of 177 kinds of bad input left 63 tracebacks in the log. A 4xx is the client's
    error, logged as one line by ``http.JsonErrors``; a 5xx still gets BentoML's traceback.
    Relies on: ``_bentoml_impl.server.app.log_exception(request, exc_info=True)``, which
    ``ServiceAppFactory.api_endpoint_wrapper`` calls inside its ``except`` blocks.
    """
    from _bentoml_impl.server import app
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    original = app.log_exception
    if getattr(original, "for_5xx_only", False):
        return

    def log_exception(request: Any, exc_info: Any = True) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(error, ValidationError) or isinstance(error, BentoMLException) and error.error_code < 500:
            return  # answered with a 4xx, which JsonErrors logs in one line
        original(request, exc_info)

    log_exception.for_5xx_only = True  # type: ignore[attr-defined]
    app.log_exception = log_exception


def keep_one_session(proxy: Any) -> None:
    """Stop BentoML's internal client from replacing its HTTP session every 100 requests or 300 s.

    On replacement it closes the old session at once, cutting off the requests still in flight on it:
    under concurrent load, writes that IndexOwner had applied answered "connection closed" (issue 13).
    One session per worker for its whole life has no such moment.
    Relies on: ``proxy.to_async._session_manager`` (``_bentoml_impl.client.proxy2.SessionManager``) and its
    ``max_requests`` and ``max_age``, read before each request.
    """
    sessions = proxy.to_async._session_manager
    if not hasattr(sessions, "max_requests") or not hasattr(sessions, "max_age"):
        raise RuntimeError("BentoML's internal client changed: review keep_one_session in "
                           "serving/api/bentoml_patches.py")
    sessions.max_requests, sessions.max_age = sys.maxsize, math.inf


def count_known_routes_only(routes: frozenset[str]) -> None:
    """Keep BentoML's per-endpoint HTTP metrics to ``routes``: one series per path ever requested would
    let anyone grow ``/metrics`` and the server's memory without bound with random paths.

    BentoML labels its request metrics with the raw path in a middleware outside the service's own
    ones, so the filter has to sit in that middleware's call (patched once per process).
    Relies on: ``bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware``, its
    ``__call__(scope, receive, send)`` and its ``app``.
    """
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metrics

    counted: Any = Metrics.__call__
    if getattr(counted, "routes", None) is not None:
        return

    async def call(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in routes:
            await self.app(scope, receive, send)
        else:
            await counted(self, scope, receive, send)

    call.routes = routes  # type: ignore[attr-defined]
    Metrics.__call__ = call  # type: ignore[method-assign,assignment]


def free_timeout_timers() -> None:
    """Make BentoML's request timeout (``traffic.timeout``) cancel its timer when the request ends.

    BentoML schedules one timer per request with ``loop.call_later`` and never cancels it, and the timer
    holds a copy of the request's context (its OpenTelemetry span, BentoML's request context): each request
    stayed in memory for the whole timeout after it had been answered. Measured under bench/hostile_load.py
    (tracemalloc snapshots diffed inside each worker): ~2.6 KB of Python objects per request, so ~5 KB of
    RSS per request growing for 600 s in ``IndexOwner`` (its timeout) and 60 s in each API worker.
    The replacement keeps the behaviour: 504 when no answer has started within the timeout.
    Relies on: ``bentoml._internal.server.http.traffic.TimeoutMiddleware``, its ``__call__(scope, receive,
    send)``, ``app`` and ``timeout``.
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    if getattr(TimeoutMiddleware.__call__, "frees_timer", False):
        return

    async def call(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        answering = asyncio.Event()

        async def marking_send(message: dict[str, Any]) -> None:
            answering.set()
            await send(message)

        app = asyncio.ensure_future(self.app(scope, receive, marking_send))
        started = asyncio.ensure_future(answering.wait())
        try:  # asyncio.wait cancels its own timer when it returns
            done, _ = await asyncio.wait({app, started}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            app.cancel()
            raise
        finally:
            started.cancel()
        if not done and app.cancel():
            await send_error(send, 504, f"not able to process the request in {self.timeout} seconds")
            return
        await app

    call.frees_timer = True  # type: ignore[attr-defined]
    TimeoutMiddleware.__call__ = call  # type: ignore[method-assign,assignment]


Route = Callable[[str, dict[str, Any], Callable[..., Awaitable[Any]]], Awaitable[Any]]


def route_calls(proxy: Any, route: Route) -> None:
    """Send the calls made through a dependency proxy's ``to_async`` to ``route(name, kwargs, fallback)`` (the
    index channel: ``channel.IndexChannel.call``), ``fallback`` being BentoML's own ``call``.

    The proxy stays BentoML's, so BentoML still opens it and checks the dependency's readiness.
    Relies on: ``proxy.to_async`` (``_bentoml_impl.client.proxy2.AsyncClient``), whose endpoint methods, made by
    ``_bentoml_impl.client.base.AbstractClient._make_method`` when it is opened, each call ``self.call(name,
    *args, **kwargs)``, an attribute an instance may shadow.
    """
    client = proxy.to_async
    original = client.call
    if getattr(original, "routed", False):
        return

    async def call(name: str, /, *args: Any, **kwargs: Any) -> Any:
        if args:  # BentoML's own positional form: left to BentoML
            return await original(name, *args, **kwargs)
        return await route(name, kwargs, original)

    call.routed = True  # type: ignore[attr-defined]
    client.call = call
