"""`corinfomax extract`: embed a collection of image files into a features folder (serving.features).

The input listing is sorted and cut into fixed shards, so a killed run restarted with the same
command skips the shards the manifest lists and ends with the same bytes as an uninterrupted run.
Bad files never stop a run: each is recorded with its error in the shard's Parquet metadata.
The local engine decodes in a thread pool (PIL releases the GIL) while onnxruntime runs the
previous batch; `--engine ray` (serving.ray_engine) does the same on a Ray cluster.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from corinfomax.core.bundle import read_card
from corinfomax.core.errors import UserError, describe
from corinfomax.core.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ResizeRule,
    is_image_file,
    load_image,
    to_model_input,
    walk_images,
)
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.extract.features import FeaturesWriter, Record, shard_name

log = logging.getLogger(__name__)

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
DEFAULT_SHARD_ROWS = 4096

# One shard's results: (shard index, embeddings of the good files, one record per file).
ShardResult = tuple[int, np.ndarray, list[Record]]


class InputError(UserError):
    """A source argument that does not exist or holds no images."""


@dataclass(frozen=True)
class InputFile:
    """One input file and its label (ImageFolder folder name or list-file column)."""

    path: str
    label: str | None


def list_inputs(sources: Sequence[str]) -> list[InputFile]:
    """Expand folders (recursive), globs and list files into a sorted, de-duplicated list of files.

    In a folder, files directly inside get no label and files under ``FOLDER/<class>/...`` get the
    label ``<class>`` (the ImageFolder layout). Only files with image extensions are taken from
    folders; files named explicitly or in a list (``.txt``: one path per line, optionally a tab and
    a label; relative to the list's folder) are always attempted, and fail per file if unreadable.
    """
    if not sources:
        raise InputError("no sources given: name image files, folders, globs or .txt lists of paths")
    found: dict[str, str | None] = {}
    for source in sources:
        if glob.has_magic(source):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise InputError(f"glob {source!r} matches no files")
            added = sum(_add_path(Path(match), found, explicit=False) for match in matches)
        elif os.path.isdir(source):
            added = _add_folder(Path(source), found)
        elif os.path.isfile(source) and Path(source).suffix.lower() in LIST_EXTENSIONS:
            added = _add_list(Path(source), found)
        elif os.path.lexists(source):
            added = _add_path(Path(source), found, explicit=True)
        else:
            raise InputError(f"source {source!r} does not exist "
                             "(expected an image file, a folder, a glob or a .txt list)")
        if added == 0:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise InputError(f"source {source!r} contains no image files (extensions: {extensions})")
    return [InputFile(path, found[path]) for path in sorted(found)]


def _add_path(path: Path, found: dict[str, str | None], explicit: bool) -> int:
    if path.is_dir():
        return _add_folder(path, found)
    if explicit or is_image_file(path):
        found.setdefault(os.path.abspath(path), None)
        return 1
    return 0


def _add_folder(root: Path, found: dict[str, str | None]) -> int:
    images = walk_images(root)
    for path, label in images:
        found.setdefault(os.path.abspath(path), label)
    return len(images)


def _add_list(list_file: Path, found: dict[str, str | None]) -> int:
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read list file {list_file}: {err}") from err
    added = 0
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, _, label = line.rstrip("\n").partition("\t")
        full = list_file.parent / path.strip()
        found.setdefault(os.path.abspath(full), label.strip() or None)
        added += 1
    return added


def listing_sha256(items: Sequence[InputFile]) -> str:
    """Fingerprint of the input listing: a resumed run must see exactly the same files."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.path}\t{item.label}\n".encode())
    return digest.hexdigest()


def decode(item: InputFile, rule: ResizeRule, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, Record]:
    """Read and preprocess one file; never raises: failures come back as a record with an error."""
    record = Record(item.path, item.label)
    try:
        with open(item.path, "rb") as handle:
            data = handle.read()
        image = load_image(data, max_pixels)
        record.width, record.height = image.size
        return to_model_input(image, rule), record
    except UserError as err:
        record.error = str(err)
    except OSError as err:
        record.error = f"unreadable file: {err.strerror or err}"
    except Exception as err:  # a decoder bug on one odd file must not end a run over millions
        record.error = describe(err)
    return None, record


def shard_slices(n_items: int, shard_rows: int) -> list[slice]:
    return [slice(start, min(start + shard_rows, n_items)) for start in range(0, n_items, shard_rows)]


def local_shards(
    embedder: Embedder,
    items: Sequence[InputFile],
    shards: Sequence[int],
    shard_rows: int,
    batch_size: int,
    workers: int,
    progress: Callable[[int], None],
) -> Iterator[ShardResult]:
    """Embed the given shards on this machine: decode ``prefetch`` batches ahead in a thread pool."""
    rule, max_pixels = embedder.resize, embedder.max_pixels
    # Batches never cross a shard boundary, so a resumed shard is computed exactly as before.
    parts = shard_slices(len(items), shard_rows)
    plan = iter([
        (index, start, min(start + batch_size, parts[index].stop), start + batch_size >= parts[index].stop)
        for index in shards
        for start in range(parts[index].start, parts[index].stop, batch_size)
    ])
    queue: deque[tuple[int, list[Future], bool]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:

        def submit_next() -> None:
            step = next(plan, None)
            if step is not None:
                index, start, stop, last = step
                queue.append((index, [pool.submit(decode, items[i], rule, max_pixels) for i in range(start, stop)],
                              last))

        for _ in range(3):
            submit_next()
        vectors: list[np.ndarray] = []
        records: list[Record] = []
        while queue:
            index, futures, last = queue.popleft()
            submit_next()
            decoded = [future.result() for future in futures]
            pixels = [array for array, _ in decoded if array is not None]
            if pixels:
                vectors.append(embedder.embed_arrays(np.stack(pixels), batch_size))
            records += [record for _, record in decoded]
            progress(len(decoded))
            if last:
                yield index, _concat(vectors, embedder.dim), records
                vectors, records = [], []


def _concat(vectors: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)


def default_workers() -> int:
    """Decode threads: enough to keep inference fed, without crowding onnxruntime's threads."""
    return max(2, min(8, os.cpu_count() or 1))


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
    embedder = Embedder(bundle, threads=threads) if engine == "local" else None
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
