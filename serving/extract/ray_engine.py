"""`corinfomax extract --engine ray`: the same extraction on Ray Data, for collections beyond one machine.

Two stages scale independently: decoding runs as stateless Ray tasks on every node's CPUs, and
embedding runs in a pool of actors that each hold one `Embedder` (one per GPU when the cluster has
GPUs). Each file's bytes are read inside the decode stage, so a corrupt file becomes an error row,
not a failed Ray task. Results stream back in input order to the driver, which writes the usual
features shards (embeddings are small), so resuming and the output format are the local engine's.
Workers must see the bundle and the image paths (shared storage) and have this package installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from corinfomax.core.errors import UserError
from corinfomax.core.images import ResizeRule
from corinfomax.serving.extract.features import Record, ShardResult
from corinfomax.serving.extract.inputs import InputFile, decode, shard_slices

log = logging.getLogger(__name__)


def decode_batch(batch: dict[str, np.ndarray], rule: ResizeRule, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray task: read and preprocess files; failures get zero pixels and a non-empty ``error``."""
    height, width = rule.size
    pixels = np.zeros((len(batch["path"]), height, width, 3), np.uint8)
    sizes = np.full((len(batch["path"]), 2), -1, np.int32)
    errors = []
    for i, path in enumerate(batch["path"]):
        array, record = decode(InputFile(str(path), None), rule, max_pixels)
        if array is not None:
            pixels[i] = array
        sizes[i] = record.width, record.height
        errors.append(record.error or "")
    return {"index": batch["index"], "pixels": pixels, "size": sizes, "error": np.array(errors, dtype=object)}


class EmbedBatch:
    """Ray actor: one onnxruntime session, reused for every batch it is given."""

    def __init__(self, bundle: str, threads: int | None) -> None:
        from corinfomax.serving.embedder import Embedder

        self.embedder = Embedder(bundle, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embedding = self.embedder.embed_arrays(batch["pixels"])
        return {"index": batch["index"], "embedding": embedding, "size": batch["size"], "error": batch["error"]}


def ray_shards(
    bundle: str | Path,
    items: Sequence[InputFile],
    shards: Sequence[int],
    shard_rows: int,
    batch_size: int,
    threads: int | None,
    address: str | None,
    progress: Callable[[int], None],
) -> Iterator[ShardResult]:
    """Embed the given shards on a Ray cluster (``address``; default: RAY_ADDRESS or a local instance)."""
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise UserError("--engine ray needs Ray Data: pip install 'corinfomax[ray]'") from err
    from corinfomax.core.bundle import read_card
    from corinfomax.core.images import DEFAULT_MAX_PIXELS

    if not shards:
        return
    if not ray.is_initialized():
        # A local instance must find this package even when it is not installed (running from a checkout).
        root = str(Path(__file__).resolve().parents[1])
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    actor_threads = threads or (4 if gpus else 1)
    actors = gpus or max(1, cpus // (2 * actor_threads))  # CPU-only: leave half the cores to decoding
    log.info("ray: %d CPUs, %d GPUs; %d embedding actors with %d threads each", cpus, gpus, actors, actor_threads)

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards must be the same rows, in the same order
    context.enable_progress_bars = False
    parts = shard_slices(len(items), shard_rows)
    wanted = [i for shard in shards for i in range(parts[shard].start, parts[shard].stop)]
    card = read_card(bundle)
    dataset = (
        ray.data.from_items([{"index": i, "path": items[i].path} for i in wanted])
        .map_batches(decode_batch, batch_size=batch_size, batch_format="numpy",  # type: ignore[arg-type]  # fn_kwargs fills the rest
                     fn_kwargs={"rule": card.input.resize, "max_pixels": DEFAULT_MAX_PIXELS})
        .map_batches(EmbedBatch, batch_size=batch_size, batch_format="numpy", concurrency=actors,
                     num_cpus=0 if gpus else actor_threads, num_gpus=1 if gpus else 0,
                     fn_constructor_kwargs={"bundle": str(Path(bundle).resolve()), "threads": actor_threads})
    )
    shard_of = {i: shard for shard in shards for i in range(parts[shard].start, parts[shard].stop)}
    vectors: list[np.ndarray] = []
    records: list[Record] = []
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for index, embedding, size, error in zip(batch["index"], batch["embedding"], batch["size"], batch["error"]):
            item = items[int(index)]
            records.append(Record(item.path, item.label, int(size[0]), int(size[1]), str(error) or None))
            if not error:
                vectors.append(embedding)
            shard = shard_of[int(index)]
            if int(index) == parts[shard].stop - 1:
                dim = card.embedding_dim
                embeddings = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
                yield shard, embeddings, records
                vectors, records = [], []
        progress(len(batch["index"]))
