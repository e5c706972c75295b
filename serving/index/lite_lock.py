"""One service per Milvus Lite file: an exclusive lock on ``<file>.lock``, taken before Milvus Lite opens the file
and held until the process ends (Milvus Lite keeps the file that long too).

Why our own lock: Milvus Lite has one inside its folder, but a second service that got as far as opening the file
once left the first one's calls to the index timing out; this lock stops the second before it touches the file,
with a message naming it. `bentoml serve`'s main process takes it as the service module is imported, before any
worker starts; its workers (descendants) see their own service's lock and go on. ``flock`` locks belong to an open
file, so the kernel releases one when its process dies, even by kill -9: no stale lock to clean up.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import psutil

from corinfomax.core.errors import UserError

_held: set[str] = set()  # lock files this process (or its service's main process) holds
_descriptors: list[int] = []  # kept open for the process' lifetime: closing one would release its lock
_guard = threading.Lock()


class LiteFileInUse(UserError):
    """A Milvus Lite file another service or command has open."""


def claim(location: str | Path) -> None:
    """Lock ``location`` for this process when it is a Milvus Lite file (``FILE.db``), or raise LiteFileInUse
    naming it and the process that holds it. Idempotent within a process and its descendants."""
    text = str(location)
    if text.startswith("milvus://") or not text.endswith(".db"):
        return
    path = os.path.abspath(text)
    lock = f"{path}.lock"
    with _guard:
        if lock in _held:
            return
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if holder.isdigit() and int(holder) in _family():
                _held.add(lock)  # this service's main process holds it for its workers
                return
            raise LiteFileInUse(f"Milvus Lite file {path} is in use by another process (pid {holder or '?'}): a "
                                "Lite file opens in one process only; stop that one, or use a Milvus server "
                                "(milvus://HOST:PORT/COLLECTION) to share an index") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held.add(lock)
        _descriptors.append(fd)


def _family() -> set[int]:
    """This process and its ancestors."""
    return {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
