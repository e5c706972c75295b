"""`corinfomax index build`: bulk-load a features folder into an index folder the service loads.

All index files are written by ``serving.index.store.IndexStore`` (the one owner of that format);
this module only streams shards into it. The index is built in a hidden sibling folder and renamed
into place at the end, so a failed or interrupted build never leaves a half-filled index behind.
"""

from __future__ import annotations

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
from corinfomax.serving.index.store import IndexStore

log = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``4G``, ``1.5GB``, ``1000000``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise UserError(f"memory budget {text!r} is not a size such as 512M, 4G or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _batches(features_dir: str | Path,
             total_shards: int) -> Iterator[tuple[np.ndarray, list[dict[str, Any]], list[str | None]]]:
    """One batch per shard: its good rows in row order, with path and size as metadata."""
    for embeddings, table in tqdm(iter_shards(features_dir), total=total_shards, unit="shard", desc="index"):
        good = table.filter(pc.greater_equal(table["row"], 0)).sort_by("row")
        if good.num_rows == 0:
            continue
        metadata = [{"path": p, "width": w, "height": h} for p, w, h in
                    zip(good["path"].to_pylist(), good["width"].to_pylist(), good["height"].to_pylist())]
        yield embeddings, metadata, good["label"].to_pylist()


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
            added = store.add_many(_batches(features_dir, len(manifest["shards"])), rebuild=False)
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
