"""`corinfomax index migrate --from A --to B`: copy every item (vector, metadata, label, thumbnail) between
index backends, either direction, then verify.

Ids are the target's: each backend hands out its own (SQLite counts, Milvus allocates), so the old -> new
id map can be written to a file for clients that kept ids. Each batch is added with an idempotency key
naming the source and the batch's id range, so rerunning an interrupted migration skips the batches already
copied (with the same ``batch`` size; an index folder remembers keys for 24 h).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from corinfomax.core.errors import UserError
from corinfomax.core.files import atomic_write_text
from corinfomax.serving.index.factory import is_milvus, open_index
from corinfomax.serving.index.store import IndexStore

log = logging.getLogger(__name__)

BATCH = 1000
SAMPLE = 100  # items whose vectors, metadata and labels are compared after the copy


def migrate(source: str, target: str, *, batch: int = BATCH, sample: int = SAMPLE, id_map: str | Path | None = None,
            progress: bool = True, keep_ids: bool = False) -> dict[str, Any]:
    """Copy ``source`` into ``target`` (created with the source's dim and model if missing); return a summary.

    ``keep_ids``: the target keeps the source's ids (an index folder only: its sequence follows the ids given,
    while a Milvus collection that numbers its items could hand a kept id out again).
    Raises UserError when the target refuses the source (other dim or model) or the verification fails.
    """
    if source == target:
        raise UserError("--from and --to name the same index")
    if keep_ids and is_milvus(target):
        raise UserError(f"{target}: only an index folder can keep the source's ids")
    origin = hashlib.sha256(source.encode()).hexdigest()[:16]
    mapping: dict[int, int] = {}
    with open_index(source) as src, open_index(target, dim=src.dim, model_sha256=src.model_sha256) as dst:
        total = src.count()
        for chunk in tqdm(src.items(batch), total=math.ceil(total / batch), unit="batch", desc="migrate",
                          disable=not progress):
            items = [item for item, _ in chunk]
            row = (np.stack([item.vector for item in items]), [item.metadata for item in items],
                   [item.label for item in items], [thumb for _, thumb in chunk])
            key = f"migrate:{origin}:{items[0].id}-{items[-1].id}"
            new = (dst.add_at([item.id for item in items], *row, key=key) if keep_ids else dst.add(*row, key=key))
            mapping.update(zip((item.id for item in items), new))
        _verify(src, dst, mapping, total, sample)
        if isinstance(dst, IndexStore):
            dst.rebuild()  # the FAISS kind for the collection's size, as `index build` chooses it
        stats = dst.stats()
    if id_map is not None:
        atomic_write_text(Path(id_map), json.dumps({str(old): new for old, new in mapping.items()}))
    summary = {"copied": len(mapping), "source_count": total, "target_count": stats["count"],
               "verified_sample": min(sample, len(mapping)), "target": stats}
    log.info("index migrate: %s", summary)
    return summary


def _verify(src: Any, dst: Any, mapping: dict[int, int], total: int, sample: int) -> None:
    """Every source item has a distinct target id that exists; a random sample holds the same vector (to float32
    rounding), metadata and label."""
    if len(mapping) != total or len(set(mapping.values())) != total:
        raise UserError(f"copied {len(mapping)} items (distinct target ids: {len(set(mapping.values()))}) "
                        f"of {total}: the source changed during the migration? run it again")
    if dst.count() < total:
        raise UserError(f"the target holds {dst.count()} items after copying {total}")
    olds = list(mapping)
    for start in range(0, len(olds), BATCH):
        dst.vectors([mapping[i] for i in olds[start : start + BATCH]])  # NotFound if any is missing
    rng = np.random.default_rng(0)
    for old in rng.choice(olds, size=min(sample, len(olds)), replace=False).tolist() if olds else []:
        a, b = src.get(old), dst.get(mapping[old])
        if (not np.allclose(a.vector.astype(np.float64), b.vector.astype(np.float64), atol=1e-6)
                or a.metadata != b.metadata or a.label != b.label):
            raise UserError(f"item {old} (now {mapping[old]}) differs after the copy")
