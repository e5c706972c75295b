"""HTTP guards in front of every API: optional API key and a request-size limit (ASGI middleware)."""

from __future__ import annotations

import hmac
import json
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


async def send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(BentoMLException):
    """Raised from ``receive`` mid-body; BentoML turns its ``error_code`` into the response status."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class GuardMiddleware:
    """Refuse requests without the API key (401) or with bodies over ``max_bytes`` (413).

    The size check reads ``Content-Length`` first, then counts streamed bytes, so chunked uploads
    cannot slip past it.
    """

    def __init__(self, app: Any, api_key: str | None, max_bytes: int) -> None:
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

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
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await send_error(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes")

    def _authorised(self, headers: dict[str, str]) -> bool:
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(given) and hmac.compare_digest(given.encode(), self.api_key.encode())  # type: ignore[union-attr]
