"""`corinfomax index build`: bulk-load a features folder into an index the service loads.

Into a folder (``--out``): all index files are written by ``serving.index.store.IndexStore`` (the one owner
of that format); this module only streams shards into it. The index is built in a hidden sibling folder and
renamed into place at the end, so a failed or interrupted build never leaves a half-filled index behind.

Into Milvus (``--to``, a ``.db`` file or ``milvus://`` URL): one insert per shard, each with an idempotency
key naming the features folder and the shard, so rerunning an interrupted build skips the shards already in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from corinfomax.core.errors import UserError
from corinfomax.core.thumbnails import DEFAULT_SIDE, MAX_SIDE, make_thumbnail
from corinfomax.serving.extract.features import iter_shards, read_manifest
from corinfomax.serving.index.factory import is_milvus, open_index
from corinfomax.serving.index.store import IndexStore

log = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``4G``, ``1.5GB``, ``1000000``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise UserError(f"memory budget {text!r} is not a size such as 512M, 4G or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


Batch = tuple[np.ndarray, list[dict[str, Any]], list[str | None], list[str | None], list[bytes | None] | None]


def _batches(features_dir: str | Path, total_shards: int, thumbnail_side: int) -> Iterator[Batch]:
    """One batch per shard (empty when none of its images embedded): its good rows in row order, with path and
    size as metadata, the file as the item's source (what a re-embed reads), and thumbnails of ``thumbnail_side``
    px made from the files (None without: 0)."""
    thumbnails = Thumbnails(thumbnail_side) if thumbnail_side else None
    try:
        for embeddings, table in tqdm(iter_shards(features_dir), total=total_shards, unit="shard", desc="index"):
            good = table.filter(pc.greater_equal(table["row"], 0)).sort_by("row")
            paths = good["path"].to_pylist()
            metadata = [{"path": p, "width": w, "height": h} for p, w, h in
                        zip(paths, good["width"].to_pylist(), good["height"].to_pylist())]
            yield (embeddings, metadata, good["label"].to_pylist(), [f"file:{p}" for p in paths],
                   thumbnails.make(paths) if thumbnails else None)
    finally:
        if thumbnails:
            thumbnails.close()


def check_side(side: int) -> None:
    """Before any work: a bad side would fail every file, and each file's failure is only counted."""
    if not 0 <= side <= MAX_SIDE:
        raise UserError(f"--thumbnail-px must be 0 (none) to {MAX_SIDE}, got {side}")


class Thumbnails:
    """Thumbnails of image files for the page, made in a thread per core (Pillow decodes without the GIL), with
    a progress bar; a file that no longer decodes gets none (counted, logged at the end)."""

    def __init__(self, side: int) -> None:
        self.side, self.failed = side, 0
        self.pool = ThreadPoolExecutor(os.cpu_count() or 1)
        self.bar = tqdm(unit="image", desc="thumbnails")

    def make(self, paths: list[str]) -> list[bytes | None]:
        made = list(self.pool.map(self._one, paths))
        self.failed += made.count(None)
        self.bar.update(len(paths))
        return made

    def _one(self, path: str) -> bytes | None:
        try:
            return make_thumbnail(path, self.side)
        except (UserError, OSError) as err:  # moved or changed since `extract`: the item is indexed all the same
            log.debug("no thumbnail for %s: %s", path, err)
            return None

    def close(self) -> None:
        self.pool.shutdown()
        self.bar.close()
        if self.failed:
            log.warning("index build: %d files could not be read again for thumbnails (their items have none)",
                        self.failed)


def build_index(
    features_dir: str | Path,
    out: str | Path,
    *,
    memory_budget_bytes: int | None = None,
    kind: str | None = None,
    thumbnail_side: int = DEFAULT_SIDE,
) -> dict[str, Any]:
    """Build ``out`` from ``features_dir``, with thumbnails of ``thumbnail_side`` px (0: none) made from the image
    files; return the index stats (count, kind, recall_at_10, ...)."""
    check_side(thumbnail_side)
    manifest = read_manifest(features_dir)
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; `index build` makes a new index: choose a new --out "
                        "(the service adds to an existing index through its API)")
    if not manifest["shards"]:
        raise UserError(f"{features_dir} has no finished shards; run `corinfomax extract` to completion first")
    model = manifest["model"]
    building = out.parent / f".{out.name}.building"
    shutil.rmtree(building, ignore_errors=True)  # leftovers of an interrupted build
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with IndexStore(building, dim=int(model["embedding_dim"]),
                        model_sha256=model.get("checkpoint_sha256")) as store:
            batches = (batch for batch in _batches(features_dir, len(manifest["shards"]), thumbnail_side) if batch[1])
            added = store.add_many(batches, rebuild=False)
            if added == 0:
                raise UserError(f"{features_dir} holds no embedded images (every file failed); nothing to index")
            store.rebuild(kind=kind, memory_budget_bytes=memory_budget_bytes)
            stats = store.stats()
        os.replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    log.info("index build: %s", stats)
    return stats


def build_into(features_dir: str | Path, location: str, thumbnail_side: int = DEFAULT_SIDE) -> dict[str, Any]:
    """Add ``features_dir`` to the Milvus collection at ``location`` (created if missing), with thumbnails as
    ``build_index`` makes them; return its stats.

    Resumable: each shard's insert carries the key ``build:<folder hash>:<shard>``, so a rerun answers the shards
    already in from their keys and writes only the rest.
    """
    if not is_milvus(location):
        raise UserError(f"--to takes a Milvus Lite .db file or milvus://host:port/collection, not {location!r}; "
                        "build an index folder with --out")
    check_side(thumbnail_side)
    manifest = read_manifest(features_dir)
    if not manifest["shards"]:
        raise UserError(f"{features_dir} has no finished shards; run `corinfomax extract` to completion first")
    model = manifest["model"]
    folder = hashlib.sha256(str(Path(features_dir).resolve()).encode()).hexdigest()[:16]
    with open_index(location, dim=int(model["embedding_dim"]), model_sha256=model.get("checkpoint_sha256")) as store:
        for name, (vectors, metadata, labels, sources, thumbnails) in zip(
                manifest["shards"], _batches(features_dir, len(manifest["shards"]), thumbnail_side)):
            if metadata:
                store.add(vectors, metadata, labels, thumbnails, key=f"build:{folder}:{name}", sources=sources)
        stats = store.stats()
    log.info("index build: %s", stats)
    return stats
