"""The internal hop from the public API's workers to ``IndexOwner`` over a Unix socket of our own, when both run on
one machine; BentoML's HTTP client otherwise.

Why: a one-query /search cost ~1.5 ms of CPU in the API worker and ~2.5 ms in ``IndexOwner`` for the hop alone
(bench/serve_profile.py: BentoML's client, then its server's middlewares, parsers, validation and thread hop
on the other side) around a FAISS search of microseconds. Here a call is one pickled frame each way over a
socket both processes already trust: the index worker listens in a folder only its user may open
(``channel_dir``, named after the ``bentoml serve`` process both workers are children of), and BentoML's own
internal hop already sends pickles between the services.

Generic: ``IndexOwner``'s methods are called by name with their keyword arguments, so every one of them, new ones
included, goes over the socket. The callers do not change: they still call BentoML's dependency proxy
(``self.index.to_async.search(vectors=..., k=...)``), whose calls ``bentoml_patches.route_calls`` sends to
``IndexChannel.call``; BentoML still opens the proxy and checks ``IndexOwner``'s readiness. A worker that finds
no socket (the index service elsewhere, as on BentoCloud) falls back to BentoML's client for that call. A frame is
``4-byte length + pickle``; the request ``(method, kwargs)``, the answer the method's envelope (or
``{"failed": text}`` for an exception, which the caller raises as ``IndexFailed``, a 500).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pickle
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

log = logging.getLogger("corinfomax.service")
HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30  # bounds what a broken peer can make the other side allocate
IDLE_CONNECTIONS = 16  # kept open per API worker for the next calls


class ChannelDropped(ConnectionError):
    """The connection to ``IndexOwner`` broke during a call (retried once by ``envelope.call``)."""


class IndexFailed(RuntimeError):
    """``IndexOwner`` raised an exception that is not a client's error: a fault of the service (500)."""


def channel_dir() -> Path:
    """The folder of the sockets of this service instance: the workers of one ``bentoml serve`` share a parent."""
    return Path(tempfile.gettempdir()) / f"corinfomax-{os.getuid()}-{os.getppid()}"


def socket_path(index_worker: int) -> Path:
    return channel_dir() / f"index-{index_worker}.sock"


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise ChannelDropped(f"frame of {size} bytes from the index channel")
    return pickle.loads(await reader.readexactly(size))


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class ChannelServer:
    """Serves the API methods of ``service`` (BentoML's service object) on its instance ``owner``, each call in a
    thread (they block on SQLite and FAISS), on a Unix socket."""

    def __init__(self, owner: Any, service: Any, path: Path, threads: int = 8) -> None:
        self.owner, self.path = owner, path
        self.methods = {name: method.func for name, method in service.apis.items()}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="index")
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self) -> ChannelServer:
        folder = self.path.parent
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
            raise PermissionError(f"{folder} is open to other users: the index channel will not listen there")
        self.path.unlink(missing_ok=True)  # left by a killed instance whose process id this one reuses
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        log.info("index channel listening on %s", self.path)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self._connections.add(writer)
        try:
            while True:
                name, kwargs = await _read_frame(reader)
                function = self.methods.get(name)
                try:
                    if function is None:
                        raise KeyError(f"IndexOwner has no method {name!r}")
                    answer = await loop.run_in_executor(self._pool, functools.partial(function, self.owner, **kwargs))
                except Exception as err:  # a fault of the service: logged here, a 500 at the caller
                    log.exception("index channel: %s failed", name)
                    answer = {"failed": f"{type(err).__name__}: {err}"}
                writer.write(_frame(answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the API worker closed the connection
        finally:
            self._connections.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):  # the API workers' idle connections too
                writer.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


class IndexChannel:
    """An API worker's side: ``await channel.call(name, kwargs, fallback)`` runs ``IndexOwner.name(**kwargs)`` over
    the socket at ``path`` when it exists, else ``fallback(name, **kwargs)`` (BentoML's client)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    @classmethod
    def for_worker(cls, api_worker: int, index_workers: int) -> IndexChannel:
        """API worker i (from 1) calls index worker ((i - 1) mod n) + 1: with a Milvus server there are as many of
        each, so each index worker serves one API worker."""
        return cls(socket_path((api_worker - 1) % index_workers + 1))

    async def call(self, name: str, kwargs: dict[str, Any], fallback: Callable[..., Awaitable[Any]]) -> Any:
        try:
            reader, writer = self._idle.pop() if self._idle else await asyncio.open_unix_connection(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            return await fallback(name, **kwargs)
        try:
            writer.write(_frame((name, kwargs)))
            answer = await _read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as err:
            writer.close()
            raise ChannelDropped(f"the index channel broke during {name} ({type(err).__name__})") from err
        except BaseException:  # cancelled mid-call: the connection's next answer would be this call's
            writer.close()
            raise
        if len(self._idle) < IDLE_CONNECTIONS:
            self._idle.append((reader, writer))
        else:
            writer.close()
        if isinstance(answer, dict) and "failed" in answer:
            raise IndexFailed(f"IndexOwner.{name}: {answer['failed']}")
        return answer
