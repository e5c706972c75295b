"""The one reader/writer of a features folder (docs/FORMATS.md section 3).

`corinfomax extract` writes it shard by shard; `index build`, `probe fit` and the service read it.
Every write is atomic (temporary name, then ``os.replace``) and a shard only counts once the
manifest lists it, so a killed run leaves nothing half-written that a reader could trust.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corinfomax.core.bundle import ModelCard
from corinfomax.core.errors import UserError
from corinfomax.core.files import atomic_write

FEATURES_FORMAT = "corinfomax-features/1"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
DTYPES = ("float32", "float16")

# Parquet schema of a shard's metadata; fixed so that empty and full shards read back alike.
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("label", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("shard", pa.string()),
    ("row", pa.int32()),
    ("error", pa.string()),
])


class FeaturesError(UserError):
    """A features folder that is missing, of another format or model, or cannot be written."""


@dataclass
class Record:
    """What extraction learnt about one input file (one Parquet row)."""

    path: str
    label: str | None
    width: int = -1
    height: int = -1
    error: str | None = None


# One shard's results as an engine yields them and ``FeaturesWriter.write_shard`` takes them: (shard index,
# embeddings of the good files, one record per file).
ShardResult = tuple[int, np.ndarray, list[Record]]


@dataclass
class Features:
    """All successfully embedded rows of a features folder, in shard order."""

    embeddings: np.ndarray  # float32 [N, D]
    paths: list[str]
    labels: list[str | None]
    manifest: dict[str, Any]


def shard_name(index: int) -> str:
    return f"{index:05d}"


def model_identity(card: ModelCard) -> dict[str, Any]:
    """The part of a model card that a features folder records and checks on resume."""
    return {"name": card.name, "version": card.version, "checkpoint_sha256": card.checkpoint_sha256,
            "embedding_dim": card.embedding_dim}


def _write_atomic(path: Path, write: Any) -> None:
    """`atomic_write` that turns a full disk into a message the user can act on."""
    try:
        atomic_write(path, write)
    except OSError as err:
        hint = "the disk is full; free space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "fix this"
        raise FeaturesError(
            f"cannot write {path}: {err.strerror or err}; {hint} and rerun the same command to resume "
            "(finished shards are kept)"
        ) from err


def _save_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    _write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check a features folder's manifest."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FeaturesError(f"{folder} is not a features folder: no {MANIFEST_FILE} "
                            "(create one with `corinfomax extract`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FeaturesError(f"unreadable manifest {path}: {err}") from err
    if manifest.get("format") != FEATURES_FORMAT:
        raise FeaturesError(f"{path} has format {manifest.get('format')!r}; this version reads {FEATURES_FORMAT!r}")
    return manifest


class FeaturesWriter:
    """Creates a features folder, or reopens one for resuming after checking it belongs to the same run.

    Args:
        folder: output folder (created if missing; must be empty or a features folder of this run).
        card: the model card of the bundle doing the embedding.
        dtype: ``float32`` or ``float16`` for the shard arrays.
        sources: the source arguments as given (recorded for the reader).
        listing_sha256: fingerprint of the sorted input listing; shards map to fixed slices of it.
        shard_rows: input files per shard.
        classes: sorted label names, or None.
    """

    def __init__(
        self,
        folder: str | Path,
        card: ModelCard,
        dtype: str,
        sources: Sequence[str],
        listing_sha256: str,
        shard_rows: int,
        classes: list[str] | None,
    ) -> None:
        if dtype not in DTYPES:
            raise FeaturesError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.folder = Path(folder)
        self.dtype = dtype
        wanted = {
            "format": FEATURES_FORMAT,
            "model": model_identity(card),
            "dtype": dtype,
            "sources": list(sources),
            "listing_sha256": listing_sha256,
            "shard_rows": shard_rows,
            "classes": classes,
            "shards": [],
        }
        if (self.folder / MANIFEST_FILE).exists():
            self.manifest = read_manifest(self.folder)
            self._check_same_run(wanted)
        else:
            if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
                raise FeaturesError(f"output {self.folder} exists and is not an empty folder nor a features folder; "
                                    "choose a new --out")
            try:
                (self.folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise FeaturesError(f"cannot create output folder {self.folder}: {err.strerror or err}") from err
            self.manifest = wanted
            _save_json(self.folder / MANIFEST_FILE, self.manifest)
        self.done = set(self.manifest["shards"])

    def _check_same_run(self, wanted: dict[str, Any]) -> None:
        have = self.manifest
        if have.get("model") != wanted["model"]:
            raise FeaturesError(
                f"{self.folder} holds features of model {_describe(have.get('model'))}, not of "
                f"{_describe(wanted['model'])}; features of different models cannot be mixed: choose a new --out"
            )
        for key, what in (("dtype", "--dtype"), ("shard_rows", "--shard-rows"), ("listing_sha256", "input file list")):
            if have.get(key) != wanted[key]:
                raise FeaturesError(
                    f"{self.folder} was started with a different {what} ({have.get(key)} vs {wanted[key]}); "
                    "rerun with the original sources and options, or choose a new --out"
                )

    def write_shard(self, index: int, embeddings: np.ndarray, records: Sequence[Record]) -> None:
        """Write one finished shard (``embeddings`` holds the rows of the records without an error)."""
        name = shard_name(index)
        ok = [r for r in records if r.error is None]
        if len(ok) != len(embeddings):
            raise ValueError(f"shard {name}: {len(embeddings)} embeddings for {len(ok)} good records")
        table = pa.table({
            "path": [r.path for r in records],
            "label": [r.label for r in records],
            "width": [r.width for r in records],
            "height": [r.height for r in records],
            "shard": [name] * len(records),
            "row": _rows(records),
            "error": [r.error for r in records],
        }, schema=SCHEMA)
        shards = self.folder / SHARD_DIR
        array = np.ascontiguousarray(embeddings, dtype=self.dtype)
        _write_atomic(shards / f"{name}.npy", lambda handle: np.save(handle, array))
        _write_atomic(shards / f"{name}.parquet", lambda handle: pq.write_table(table, handle))
        self.done.add(name)
        self.manifest["shards"] = sorted(self.done)
        _save_json(self.folder / MANIFEST_FILE, self.manifest)


def _rows(records: Sequence[Record]) -> list[int]:
    """Row of each record in the shard's array; -1 for failed files."""
    rows, row = [], 0
    for record in records:
        if record.error is None:
            rows.append(row)
            row += 1
        else:
            rows.append(-1)
    return rows


def _describe(model: Any) -> str:
    if not isinstance(model, dict):
        return repr(model)
    sha = str(model.get("checkpoint_sha256") or "?")[:12]
    return f"{model.get('name')}:{model.get('version')} (checkpoint {sha})"


def iter_shards(folder: str | Path) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """Yield ``(embeddings float32 [rows, D], metadata table)`` for every finished shard, in order."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name in manifest["shards"]:
        npy, parquet = folder / SHARD_DIR / f"{name}.npy", folder / SHARD_DIR / f"{name}.parquet"
        try:
            embeddings = np.load(npy, allow_pickle=False).astype(np.float32, copy=False)
            table = pq.read_table(parquet)
        except (OSError, ValueError) as err:
            raise FeaturesError(f"shard {name} of {folder} is unreadable ({err}); "
                                "delete the folder and extract again") from err
        yield embeddings, table


def load_features(folder: str | Path) -> Features:
    """Read every successfully embedded row of a features folder into memory."""
    manifest = read_manifest(folder)
    arrays: list[np.ndarray] = []
    paths: list[str] = []
    labels: list[str | None] = []
    for embeddings, table in iter_shards(folder):
        good = table.filter(pc.greater_equal(table["row"], 0)).sort_by("row")
        arrays.append(embeddings)
        paths += good["path"].to_pylist()
        labels += good["label"].to_pylist()
    dim = int(manifest["model"]["embedding_dim"])
    embeddings = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
    return Features(embeddings, paths, labels, manifest)


def failures(folder: str | Path) -> list[tuple[str, str]]:
    """``(path, error)`` of every input file that could not be embedded."""
    out: list[tuple[str, str]] = []
    for _, table in iter_shards(folder):
        for path, error in zip(table["path"].to_pylist(), table["error"].to_pylist()):
            if error is not None:
                out.append((path, error))
    return out
