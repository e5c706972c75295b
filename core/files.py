"""Atomic file writes: readers see the old file or the whole new one, never a part of it.

Shared by every stage (checkpoints, configs, metrics, reports, caches, probes, features, the index):
write to a temporary file in the same folder, flush it to disk, then rename it over the target. The file
gets the mode any other tool would give it (0o666 less the umask), so a service running as another user
can read what training and extraction wrote.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

T = TypeVar("T")

# O_EXCL: a name another writer already holds is never reused; O_CLOEXEC: no leak into child processes.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _unique(folder: Path, name: str, suffix: str, create: Callable[[Path], T]) -> tuple[Path, T]:
    """``create(path)`` on a new random name ``.NAME.XXXX.SUFFIX`` in ``folder``, retrying names that exist."""
    while True:
        path = folder / f".{name}.{secrets.token_hex(6)}{suffix}"
        try:
            return path, create(path)
        except FileExistsError:
            continue


def make_temp_dir(folder: Path, name: str, suffix: str = ".tmp") -> Path:
    """A new folder beside ``folder/name``, created with 0o777 less the umask like any `mkdir`.

    ``tempfile.mkdtemp`` (like ``mkstemp``) makes it owner-only whatever the umask; reading the umask back to
    chmod means setting it process-wide for a moment, which races with other threads creating files.
    """
    return _unique(folder, name, suffix, lambda path: os.mkdir(path, 0o777))[0]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp, fd = _unique(path.parent, path.name, ".tmp", lambda p: os.open(p, _CREATE_FLAGS, 0o666))
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
