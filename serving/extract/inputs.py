"""What extraction reads: the input listing (files, folders, globs and list files, sorted and de-duplicated),
its fingerprint, the fixed shards it is cut into, and the decode of one file. Both engines (the local one in
``extract`` and ``ray_engine``) share them, so they cut and decode the same way."""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from corinfomax.core.errors import UserError, describe
from corinfomax.core.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ResizeRule,
    is_image_file,
    model_input,
    walk_images,
)
from corinfomax.serving.extract.features import Record

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


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
        pixels, (record.width, record.height) = model_input(data, rule, max_pixels)
        return pixels, record
    except UserError as err:
        record.error = str(err)
    except OSError as err:
        record.error = f"unreadable file: {err.strerror or err}"
    except Exception as err:  # a decoder bug on one odd file must not end a run over millions
        record.error = describe(err)
    return None, record


def shard_slices(n_items: int, shard_rows: int) -> list[slice]:
    return [slice(start, min(start + shard_rows, n_items)) for start in range(0, n_items, shard_rows)]
