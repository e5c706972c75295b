"""`corinfomax index restore --from DIR --index LOC`: check a snapshot (``snapshot``) whole, then make it the index
at ``LOC``.

Nothing at ``LOC`` is touched before every file the manifest lists has its size and sha256; a folder without a
manifest (a snapshot interrupted before it finished) or with any file missing or changed is refused.

- An index folder: the files are copied (and checked again) into a new folder beside ``LOC``, which is then
  renamed to ``LOC``, so ``LOC`` holds the old index or the whole restored one. ``LOC`` must not exist or be an
  empty folder; ``force`` replaces an index there (stop the service that serves it first: it would keep the old,
  deleted files open).
- Milvus (a Lite file or a server): through ``migrate`` from a checked copy of the snapshot; the collection gets
  new ids (``id_map`` writes old -> new). It must not exist; ``force`` replaces a Lite file, never a server's
  collection (drop that one yourself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from corinfomax.core.errors import UserError
from corinfomax.core.files import make_temp_dir
from corinfomax.serving.index import lite_lock
from corinfomax.serving.index.catalog import DEFAULT
from corinfomax.serving.index.factory import is_milvus
from corinfomax.serving.index.migrate import migrate
from corinfomax.serving.index.snapshot import CHUNK, FORMAT, MANIFEST, VERSION

log = logging.getLogger(__name__)

SHOWN = 5  # problems named in the message of a refused snapshot


class SnapshotInvalid(UserError):
    """A folder that is not a whole, unchanged snapshot: partial (no manifest), tampered with, or of another
    format."""


def verify(folder: str | Path, progress: bool = False) -> dict[str, Any]:
    """The manifest of the snapshot in ``folder`` once every file it lists has its size and sha256."""
    folder = Path(folder)
    manifest = _manifest(folder)
    problems = []
    for entry in tqdm(manifest["files"], desc="verify", unit="file", disable=not progress):
        path = folder / _relative(entry)
        if not path.is_file():
            problems.append(f"{entry['path']} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']} has {path.stat().st_size} bytes, not {entry['bytes']}")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{entry['path']} does not match its sha256")
    if problems:
        more = f" and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise SnapshotInvalid(f"snapshot {folder} is damaged or was changed: {'; '.join(problems[:SHOWN])}{more}; "
                              "nothing was restored")
    return manifest


def restore(source: str | Path, location: str, force: bool = False, id_map: str | Path | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Restore the snapshot in ``source`` as the index at ``location`` (module docstring); return a summary."""
    manifest = verify(source, progress)
    if is_milvus(location):
        copied = _into_milvus(Path(source), manifest, location, force, id_map, progress)
    else:
        _into_folder(Path(source), manifest, Path(location), force, progress)
        copied = sum(int(gen["count"]) for entry in manifest["collections"].values()
                     for number, gen in entry["generations"].items() if int(number) == entry["live"])
    summary = {"restored": str(location), "from": str(source), "snapshot_started_at": manifest["started_at"],
               "collections": sorted(manifest["collections"]), "items": copied}
    log.info("index restore: %s", summary)
    return summary


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SnapshotInvalid(f"{folder} is not a folder: give the folder `corinfomax index snapshot --to` wrote")
    if not path.is_file():
        raise SnapshotInvalid(f"{folder} has no {MANIFEST}: it is not a snapshot, or a snapshot that did not finish "
                              "(interrupted or killed; the manifest is written last); take a new one")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, AttributeError) as err:
        raise SnapshotInvalid(f"{path} is not a snapshot manifest ({err})") from err
    if manifest.get("version") != VERSION:
        raise SnapshotInvalid(f"{path} has format version {manifest.get('version')}; this version of corinfomax "
                              f"reads version {VERSION}")
    return manifest


def _relative(entry: dict[str, Any]) -> PurePosixPath:
    """A manifest entry's path, refused when it would leave the snapshot folder."""
    path = PurePosixPath(str(entry.get("path", "")))
    if path.is_absolute() or ".." in path.parts or not path.parts or not isinstance(entry.get("bytes"), int):
        raise SnapshotInvalid(f"manifest entry {str(entry)[:200]} is not a file of the snapshot")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_checked(source: Path, manifest: dict[str, Any], dest: Path, progress: bool) -> None:
    """Copy every file of the snapshot into ``dest``, checking each copy's sha256 (the snapshot could change
    between the check and the copy) and making it durable."""
    for entry in tqdm(manifest["files"], desc="restore", unit="file", disable=not progress):
        target = dest / _relative(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / _relative(entry), target)
        with target.open("rb") as handle:
            os.fsync(handle.fileno())
        if _sha256(target) != entry["sha256"]:
            raise SnapshotInvalid(f"{entry['path']} changed while it was restored; nothing was restored")
    for folder in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _into_folder(source: Path, manifest: dict[str, Any], target: Path, force: bool, progress: bool) -> None:
    occupied = target.exists() and (not target.is_dir() or any(target.iterdir()))
    if occupied and not force:
        raise UserError(f"{target} is not empty: restore into a new location, or give --force to replace the index "
                        "there (stop the service that serves it first)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(target.parent, target.name, ".restoring")
    try:
        _copy_checked(source, manifest, staging, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = target.with_name(f".{target.name}.replaced-{secrets.token_hex(4)}")
    if occupied:
        target.rename(replaced)
    elif target.exists():
        target.rmdir()
    staging.rename(target)
    if replaced.is_dir():
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        replaced.unlink(missing_ok=True)


def _into_milvus(source: Path, manifest: dict[str, Any], location: str, force: bool, id_map: str | Path | None,
                 progress: bool) -> int:
    others = sorted(set(manifest["collections"]) - {DEFAULT})
    if others:
        raise UserError(f"the snapshot holds collections {', '.join(others)} besides {DEFAULT!r}; a Milvus index "
                        "takes the default collection only: restore into an index folder")
    _clear_milvus(location, force)
    with tempfile.TemporaryDirectory(prefix="corinfomax-restore-") as scratch:
        copy = Path(scratch) / "index"  # opening the index writes to it: the snapshot itself stays as it was
        _copy_checked(source, manifest, copy, progress)
        return int(migrate(str(copy), location, id_map=id_map, progress=progress)["copied"])


def _clear_milvus(location: str, force: bool) -> None:
    """Refuse a Milvus target that exists (``force``: remove a Lite file)."""
    if location.endswith(".db"):
        lite_lock.claim(location)  # a service that has the file open keeps it: refused, naming the file
        path = Path(location)
        if path.exists() and not force:
            raise UserError(f"{location} exists: restore into a new file, or give --force to replace it (stop the "
                            "service that serves it first)")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    from corinfomax.serving.index.milvus_schema import connection, open_client

    client = open_client(location)
    try:
        name = connection(location)[2]
        if client.has_collection(name):
            raise UserError(f"Milvus collection {name!r} exists at {location}: restore into a new collection, or "
                            "drop it first")
    finally:
        client.close()
