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
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from corinfomax.core.errors import UserError
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


Batch = tuple[np.ndarray, list[dict[str, Any]], list[str | None], list[str | None]]


def _batches(features_dir: str | Path, total_shards: int) -> Iterator[Batch]:
    """One batch per shard (empty when none of its images embedded): its good rows in row order, with path and
    size as metadata, and the file as the item's source (what a re-embed reads)."""
    for embeddings, table in tqdm(iter_shards(features_dir), total=total_shards, unit="shard", desc="index"):
        good = table.filter(pc.greater_equal(table["row"], 0)).sort_by("row")
        paths = good["path"].to_pylist()
        metadata = [{"path": p, "width": w, "height": h} for p, w, h in
                    zip(paths, good["width"].to_pylist(), good["height"].to_pylist())]
        yield embeddings, metadata, good["label"].to_pylist(), [f"file:{p}" for p in paths]


def build_index(
    features_dir: str | Path,
    out: str | Path,
    *,
    memory_budget_bytes: int | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """Build ``out`` from ``features_dir``; return the index stats (count, kind, recall_at_10, ...)."""
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
            batches = (batch for batch in _batches(features_dir, len(manifest["shards"])) if batch[1])
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


def build_into(features_dir: str | Path, location: str) -> dict[str, Any]:
    """Add ``features_dir`` to the Milvus collection at ``location`` (created if missing); return its stats.

    Resumable: each shard's insert carries the key ``build:<folder hash>:<shard>``, so a rerun answers the shards
    already in from their keys and writes only the rest.
    """
    if not is_milvus(location):
        raise UserError(f"--to takes a Milvus Lite .db file or milvus://host:port/collection, not {location!r}; "
                        "build an index folder with --out")
    manifest = read_manifest(features_dir)
    if not manifest["shards"]:
        raise UserError(f"{features_dir} has no finished shards; run `corinfomax extract` to completion first")
    model = manifest["model"]
    folder = hashlib.sha256(str(Path(features_dir).resolve()).encode()).hexdigest()[:16]
    with open_index(location, dim=int(model["embedding_dim"]), model_sha256=model.get("checkpoint_sha256")) as store:
        for name, (vectors, metadata, labels, sources) in zip(manifest["shards"],
                                                              _batches(features_dir, len(manifest["shards"]))):
            if metadata:
                store.add(vectors, metadata, labels, key=f"build:{folder}:{name}", sources=sources)
        stats = store.stats()
    log.info("index build: %s", stats)
    return stats
