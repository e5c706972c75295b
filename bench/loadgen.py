"""A closed-loop HTTP load generator for the service benches: N clients on one asyncio loop, in a child process of
its own so it takes as little of the shared cores as it can and its CPU is counted apart.

Each client sends requests one after another, cycling through a list of ``Shot``s from its own offset, and
records every answer's latency, status and ``Retry-After``; ``run_load`` returns them with the generator's CPU
seconds. The service benches (``serve_load``, ``serve_profile``, ``serve_backpressure``, ``serve_photos``) share it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Shot:
    """One request: ``files`` become multipart parts named ``images``; ``data`` form fields; or a ``json`` body."""

    path: str
    files: tuple[bytes, ...] = ()
    data: Optional[dict[str, str]] = None
    json: Any = None

    def kwargs(self) -> dict[str, Any]:
        if self.json is not None:
            return {"json": self.json}
        return {"files": [("images", (f"{i}.jpg", body, "image/jpeg")) for i, body in enumerate(self.files)],
                "data": self.data}


@dataclass
class LoadResult:
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)  # every answered request, in order of completion
    statuses: list[int] = field(default_factory=list)
    retry_after: list[Optional[str]] = field(default_factory=list)
    images: int = 0  # images in the requests answered 200
    errors: list[str] = field(default_factory=list)  # transport errors (timeouts, dropped connections) and 5xx
    bodies: dict[int, bytes] = field(default_factory=dict)  # the first answer's body of each status
    cpu_s: float = 0.0  # the load generator's own CPU

    def ok(self) -> list[float]:
        return [ms for ms, status in zip(self.latencies_ms, self.statuses) if status == 200]

    def with_status(self, status: int) -> list[float]:
        return [ms for ms, got in zip(self.latencies_ms, self.statuses) if got == status]


def _encode(shot: Shot, host: str) -> bytes:
    """The whole HTTP/1.1 request of a shot, encoded once (httpx builds the multipart body, not the socket)."""
    import httpx

    request = httpx.Request("POST", f"http://{host}{shot.path}", **shot.kwargs())
    body = request.read()
    head = [f"POST {shot.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
            f"Content-Type: {request.headers['content-type']}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])
               if name}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def _load(url: str, shots: list[Shot], clients: int, seconds: float, timeout: float,
                headers: dict[str, str], polite: bool) -> LoadResult:
    """The clients speak HTTP/1.1 over plain asyncio streams with requests encoded in advance: ~0.1 ms of CPU per
    request, where httpx took ~2 ms, which on a 2-core machine took CPU from the server it was measuring."""
    host = url.split("://", 1)[1].rstrip("/")
    address, _, port = host.rpartition(":")
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
    encoded = [request.replace(b"\r\n", b"\r\n" + extra, 1) if extra else request
               for request in (_encode(shot, host) for shot in shots)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    result = LoadResult(seconds)

    async def client(offset: int) -> None:
        i, stream = offset, None
        while loop.time() < deadline:
            index = i % len(shots)
            i += clients
            started = time.perf_counter()
            try:
                if stream is None:
                    stream = await asyncio.open_connection(address, int(port))
                stream[1].write(encoded[index])
                status, answer_headers, body = await asyncio.wait_for(_answer(stream[0]), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
                result.errors.append(f"{type(err).__name__}: {err}")
                stream = None
                continue
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.statuses.append(status)
            result.retry_after.append(answer_headers.get("retry-after"))
            result.bodies.setdefault(status, body)
            if status == 200:
                result.images += max(1, len(shots[index].files))
            elif status >= 500 and status != 503:
                result.errors.append(f"HTTP {status} {body[:300]!r}")
            if answer_headers.get("connection", "").lower() == "close":
                stream[1].close()
                stream = None
            if polite and status == 503 and answer_headers.get("retry-after", "").isdigit():
                await asyncio.sleep(min(float(answer_headers["retry-after"]), deadline - loop.time()))
        if stream is not None:
            stream[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_here(url: str, shots: list[Shot], clients: int, seconds: float, timeout: float,
               headers: dict[str, str], polite: bool) -> LoadResult:
    cpu = _cpu_seconds()  # the child's imports are not the load's
    try:
        import uvloop  # the server's loop too; cheaper per request than asyncio's

        result = uvloop.run(_load(url, shots, clients, seconds, timeout, headers, polite))
    except ImportError:
        result = asyncio.run(_load(url, shots, clients, seconds, timeout, headers, polite))
    result.cpu_s = _cpu_seconds() - cpu
    return result


def run_load(url: str, shots: list[Shot], clients: int, seconds: float, timeout: float = 60.0,
             headers: Optional[dict[str, str]] = None, polite: bool = False) -> LoadResult:
    """``clients`` closed-loop clients for ``seconds``, in a fresh child process (spawned: no inherited state).
    ``polite`` clients wait a 503's ``Retry-After`` before their next request, as HTTP asks; others send it at
    once."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_load_here, (url, shots, clients, seconds, timeout, headers or {}, polite))


def image_shots(path: str, jpegs: list[bytes], per_request: int, data: Optional[dict[str, str]] = None) -> list[Shot]:
    """Requests of ``per_request`` images each, cycling through ``jpegs``."""
    count = max(1, len(jpegs) // per_request)
    return [Shot(path, tuple(jpegs[(i * per_request + j) % len(jpegs)] for j in range(per_request)), data)
            for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")
