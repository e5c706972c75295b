"""The originals store: the bytes of each image added over HTTP to a collection that keeps them, so a new model can
embed them again (a re-embed reads these, not the thumbnails).

Content-addressed: ``<folder>/ab/cd/<sha256>``, so identical images are stored once and an item's ``source`` is
``sha256:<hex>``. A file is written atomically (fsync, rename, fsync of its folder) before the item that names it
is committed, and deleted only after the commit that removes its last reference in any generation of the
collection: a crash in between leaves an orphan file (swept later), never an item whose original is gone. Items
indexed from files record ``file:<path>`` instead; items added as vectors have no source.

One ``Budget`` caps the bytes of all collections' originals together (``CORINFOMAX_ORIGINALS_MAX_BYTES``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator

from corinfomax.core.errors import BadInput, NotFound
from corinfomax.core.files import atomic_write

SHA = "sha256:"
FILE = "file:"
DEFAULT_MAX_BYTES = 10 << 30
MAX_BYTES_VARIABLE = "CORINFOMAX_ORIGINALS_MAX_BYTES"


class OriginalsFull(BadInput):
    """An add whose originals would take the store over its size cap (409: nothing was written)."""

    status = 409


class Budget:
    """The size cap over every collection's originals, and what they use now."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.lock = threading.Lock()

    def check(self, adding: int) -> None:
        """Refuse ``adding`` more bytes when they would pass the cap."""
        with self.lock:
            if adding and self.used + adding > self.max_bytes:
                raise OriginalsFull(
                    f"storing these images would take the originals over their cap of {self.max_bytes} bytes "
                    f"({self.used} used, {adding} more asked); raise {MAX_BYTES_VARIABLE}, drop a generation or "
                    "collection, or add to a collection that does not keep originals")

    def change(self, delta: int) -> None:
        with self.lock:
            self.used += delta


class Originals:
    """One collection's originals, under ``folder``, counted against ``budget``."""

    def __init__(self, folder: Path, budget: Budget) -> None:
        self.folder, self.budget = folder, budget
        self._lock = threading.Lock()
        self.count, self.bytes = 0, 0
        for path in self._files():
            self.count += 1
            self.bytes += path.stat().st_size
        budget.change(self.bytes)

    def _files(self) -> Iterator[Path]:
        if self.folder.is_dir():
            yield from (path for path in self.folder.glob("??/??/*") if not path.name.startswith("."))

    def path_of(self, digest: str) -> Path:
        return self.folder / digest[:2] / digest[2:4] / digest

    def new_bytes(self, images: list[bytes]) -> int:
        """How many bytes storing ``images`` would add (identical or already stored images count once or not)."""
        digests = {hashlib.sha256(data).hexdigest(): len(data) for data in images}
        return sum(size for digest, size in digests.items() if not self.path_of(digest).exists())

    def put(self, data: bytes) -> str:
        """Store ``data`` (once) and return its source, ``sha256:<hex>``; durable when this returns."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_of(digest)
        with self._lock:
            if path.exists():
                return SHA + digest
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda handle: handle.write(data))
            _sync_folder(path.parent)  # the rename itself survives a power loss before the item's commit
            self.count += 1
            self.bytes += len(data)
        self.budget.change(len(data))
        return SHA + digest

    def discard(self, source: str) -> None:
        """Delete an original no generation references any more."""
        if not source.startswith(SHA):
            return
        path = self.path_of(source[len(SHA):])
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return
            self.count -= 1
            self.bytes -= size
        self.budget.change(-size)

    def sources(self) -> list[str]:
        """Every stored original's source."""
        return [SHA + path.name for path in self._files()]

    def stats(self) -> dict[str, int]:
        return {"originals_bytes": self.bytes, "originals_count": self.count}

    def drop(self) -> None:
        """Delete every original of the collection (it is being dropped)."""
        with self._lock:
            shutil.rmtree(self.folder, ignore_errors=True)
            freed, self.count, self.bytes = self.bytes, 0, 0
        self.budget.change(-freed)

    def read(self, source: str) -> bytes:
        """The image bytes an item's source names (NotFound when they are gone)."""
        return read_source(source, self)


def read_source(source: str, originals: Originals | None) -> bytes:
    """The bytes of ``sha256:<hex>`` (from ``originals``) or ``file:<path>``; NotFound when unreadable."""
    if source.startswith(SHA) and originals is not None:
        path = originals.path_of(source[len(SHA):])
    elif source.startswith(FILE):
        path = Path(source[len(FILE):])
    else:
        raise NotFound(f"source {source[:80]!r} cannot be read here")
    try:
        return path.read_bytes()
    except OSError as err:
        raise NotFound(f"the original of source {source[:120]!r} is gone ({type(err).__name__})") from err


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
