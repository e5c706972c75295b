"""`corinfomax extract`: embed a collection of image files into a features folder (``features``).

The input listing (``inputs``) is sorted and cut into fixed shards, so a killed run restarted with the same
command skips the shards the manifest lists and ends with the same bytes as an uninterrupted run.
Bad files never stop a run: each is recorded with its error in the shard's Parquet metadata.
The local engine decodes and embeds whole batches in parallel threads (PIL and onnxruntime release the GIL);
`--engine ray` (``ray_engine``) decodes and embeds in two stages on a Ray cluster.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from corinfomax.core.bundle import read_card
from corinfomax.core.errors import UserError
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.extract.features import FeaturesWriter, Record, ShardResult, shard_name
from corinfomax.serving.extract.inputs import InputFile, decode, list_inputs, listing_sha256, shard_slices

log = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 4096


def local_shards(
    embedder: Embedder,
    items: Sequence[InputFile],
    shards: Sequence[int],
    shard_rows: int,
    batch_size: int,
    workers: int,
    progress: Callable[[int], None],
) -> Iterator[ShardResult]:
    """Embed the given shards on this machine: ``workers`` batches at a time, each decoded and embedded in a thread
    of its own (Pillow and onnxruntime release the GIL), taken back in order.

    Whole batches per thread, and onnxruntime on one intra-op thread per call (``extract``'s default): every core
    does the least work per image, with no hand-off per file and no intra-op threads spinning while they wait for
    each other or for the decoders, so a run comes near the machine's limit, cores / (decode + inference CPU per
    image) (bench/extract_throughput.py). With a GPU, the threads' decoding keeps the device fed.
    """
    rule, max_pixels = embedder.resize, embedder.max_pixels
    # Batches never cross a shard boundary, so a resumed shard is computed exactly as before.
    parts = shard_slices(len(items), shard_rows)
    plan = iter([
        (index, start, min(start + batch_size, parts[index].stop), start + batch_size >= parts[index].stop)
        for index in shards
        for start in range(parts[index].start, parts[index].stop, batch_size)
    ])

    def work(index: int, start: int, stop: int, last: bool) -> tuple[int, np.ndarray, list[Record], bool]:
        decoded = [decode(items[i], rule, max_pixels) for i in range(start, stop)]
        pixels = [array for array, _ in decoded if array is not None]
        vectors = embedder.embed_arrays(np.stack(pixels), batch_size) if pixels else _concat([], embedder.dim)
        return index, vectors, [record for _, record in decoded], last

    queue: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="extract") as pool:

        def submit_next() -> None:
            step = next(plan, None)
            if step is not None:
                queue.append(pool.submit(work, *step))

        for _ in range(workers + 1):  # one batch more than the threads: none waits for the next to be handed out
            submit_next()
        vectors: list[np.ndarray] = []
        records: list[Record] = []
        while queue:
            index, batch_vectors, batch_records, last = queue.popleft().result()
            submit_next()
            vectors.append(batch_vectors)
            records += batch_records
            progress(len(batch_records))
            if last:
                yield index, _concat(vectors, embedder.dim), records
                vectors, records = [], []


def _concat(vectors: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)


def default_workers() -> int:
    """Batches in flight, one thread each: one per core."""
    return os.cpu_count() or 1


def extract(
    sources: Sequence[str],
    bundle: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    batch_size: int = 256,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    workers: int | None = None,
    threads: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Embed ``sources`` with the bundle into the features folder ``out`` (resuming it if started).

    Returns a summary: images, failed, shards written/skipped, seconds, images_per_s.
    """
    if batch_size < 1 or shard_rows < 1:
        raise UserError("--batch-size and --shard-rows must be positive")
    if engine not in ("local", "ray"):
        raise UserError(f"unknown --engine {engine!r}: use local or ray")
    items = list_inputs(sources)
    card = read_card(bundle)
    # Load the model before touching the output, so a bad bundle leaves no folder behind.
    embedder = Embedder(bundle, threads=threads or 1) if engine == "local" else None
    labels = {item.label for item in items if item.label is not None}
    writer = FeaturesWriter(out, card, dtype, sources, listing_sha256(items), shard_rows, sorted(labels) or None)
    slices = shard_slices(len(items), shard_rows)
    pending = [i for i in range(len(slices)) if shard_name(i) not in writer.done]
    todo = sum(slices[i].stop - slices[i].start for i in pending)
    log.info("extract: %d files in %d shards; %d shards already done, %d files to embed",
             len(items), len(slices), len(slices) - len(pending), todo)
    failed, started = 0, time.perf_counter()
    with tqdm(total=todo, unit="img", desc="extract", disable=not show_progress, smoothing=0.1) as bar:
        if embedder is not None:
            results = local_shards(embedder, items, pending, shard_rows, batch_size,
                                   workers or default_workers(), bar.update)
        else:
            from corinfomax.serving.extract.ray_engine import ray_shards

            results = ray_shards(bundle, items, pending, shard_rows, batch_size, threads, ray_address, bar.update)
        for index, embeddings, records in results:
            writer.write_shard(index, embeddings, records)
            for record in records:
                if record.error is not None:
                    failed += 1
                    log.warning("skipped %s: %s", record.path, record.error)
    seconds = time.perf_counter() - started
    summary = {
        "images": len(items),
        "embedded_now": todo - failed,
        "failed_now": failed,
        "shards_written": len(pending),
        "shards_skipped": len(slices) - len(pending),
        "seconds": round(seconds, 3),
        "images_per_s": round(todo / seconds, 1) if seconds > 0 else None,
    }
    log.info("extract done: %s", summary)
    return summary
