"""HTTP guards in front of every API (ASGI middleware): optional API key, a request-size limit and a deadline for
the body, and errors always as ``{"error": message}``, each 4xx logged as one line naming route and reason."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from bentoml.exceptions import BentoMLException

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Probes and metrics stay open so orchestrators and Prometheus need no secret.
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
# The search page's static files hold no data (the page sends the key with its own API calls).
OPEN_PREFIX = "/ui"
MAX_DETAILS = 3  # validation problems named in one error message (then "and N more")
MAX_LOGGED_CHARS = 500  # of a 4xx's reason in its log line

log = logging.getLogger("corinfomax.http")
# BentoML's server logging shows only its own loggers at INFO: a client's error is INFO, not a warning.
log.setLevel(logging.INFO)


class _ParseWarnings(logging.Filter):
    """python-multipart logs a warning just before it raises each parse error, which the service answers with a
    400 logged with the same reason: drop those (its warnings about spooling parts to disk are kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "_internal_write"


logging.getLogger("python_multipart.multipart").addFilter(_ParseWarnings())


async def send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(BentoMLException):
    """Raised from ``receive`` mid-body; BentoML turns its ``error_code`` into the response status."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class _TooSlow(BentoMLException):
    """Raised from ``receive`` when the body has not arrived by its deadline."""

    error_code = HTTPStatus.REQUEST_TIMEOUT


class GuardMiddleware:
    """Refuse requests without the API key (401), with bodies over ``max_bytes`` (413), or whose body has
    not fully arrived ``body_seconds`` after the request started (408).

    The size check reads ``Content-Length`` first, then counts streamed bytes, so chunked uploads
    cannot slip past it. The deadline is for the whole body, so a client dripping it byte by byte
    holds a request (and its worker's memory and concurrency slot) for at most ``body_seconds``.
    """

    def __init__(self, app: Any, api_key: str | None, max_bytes: int, body_seconds: float) -> None:
        self.app, self.api_key, self.max_bytes, self.body_seconds = app, api_key, max_bytes, body_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path == OPEN_PREFIX or path.startswith(OPEN_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and not self._authorised(headers):
            await send_error(send, 401,
                             "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                             [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await send_error(send, 413, f"request body of {length} bytes exceeds the limit of {self.max_bytes} bytes")
            return
        received = 0
        body_done = False
        started = False
        deadline = asyncio.get_running_loop().time() + self.body_seconds

        async def guarded_receive() -> dict[str, Any]:
            nonlocal received, body_done
            if body_done:  # later calls wait for the client to disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _TooSlow(f"the request body did not arrive within {self.body_seconds:g} s (the limit)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise _TooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:  # answered before the whole body came (408, 413): free the connection too
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except (_TooLarge, _TooSlow) as err:
            if not started:
                await send_error(send, err.error_code, str(err))

    def _authorised(self, headers: dict[str, str]) -> bool:
        given = headers.get("x-api-key", "")
        if not given:  # RFC 9110: the scheme is case-insensitive; a bare key without "Bearer" is refused
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        return bool(given) and hmac.compare_digest(given.encode(), self.api_key.encode())  # type: ignore[union-attr]


class JsonErrors:
    """Give every error answer (status >= 400) the documented shape ``{"error": message}``, and log each 4xx
    as one line: ``POST /search 400: <the message the client got>``.

    Starlette answers unknown routes (404) and wrong methods (405) in plain text, and BentoML wraps the
    message of its own 4xx exceptions in a one-element array; both are rewritten here, keeping the status.
    Every answer passes here, so this is the one place a client's error is logged (BentoML's traceback for
    it is off: ``bentoml_patches.log_tracebacks_for_5xx_only``); a 5xx keeps its traceback.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        body = bytearray()

        async def shaping_send(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # hold it until the whole (small) error body is here
                return
            if start is None:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                headers = [(k, v) for k, v in start.get("headers", [])
                           if k.lower() not in (b"content-type", b"content-length")]
                reason = error_message(bytes(body), start["status"])
                if start["status"] < 500:
                    log.info("%s %s %d: %s", scope.get("method", ""), printable(scope.get("path", "")),
                             start["status"], printable(reason[:MAX_LOGGED_CHARS]))
                await send_error(send, start["status"], reason, headers)

        await self.app(scope, receive, shaping_send)


def printable(text: str) -> str:
    """``text`` on one line: a client's path or field name must not start a fake line in the log."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error_message(body: bytes, status: int) -> str:
    """The message of an error body in any of the shapes the stack produces."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or HTTPStatus(status).phrase
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        detail = data.get("detail")
        details = [d for d in detail if isinstance(d, dict)] if isinstance(detail, list) else []
        # Pydantic's validation details: where (the field) and what, so the message names the problem.
        where = ["{}: {}".format(".".join(map(str, d.get("loc", ()))),
                                 "unknown field" if d.get("type") == "extra_forbidden" else d.get("msg", ""))
                 for d in details[:MAX_DETAILS]]
        more = [f"and {len(details) - MAX_DETAILS} more"] if len(details) > MAX_DETAILS else []
        return "; ".join([data["error"], *where, *more])
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return data["detail"]
    return json.dumps(data)[:2000]
