"""Atomic writes leave files and folders with the modes any other tool would: 0o666/0o777 less the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from corinfomax.core.files import atomic_write_text, make_temp_dir


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_files_and_temp_dirs_follow_the_umask(mask: int, tmp_path: Path) -> None:
    previous = os.umask(mask)
    try:
        target = tmp_path / "config.json"
        atomic_write_text(target, "{}")
        atomic_write_text(target, '{"again": 1}')  # a replaced file too
        folder = make_temp_dir(tmp_path, "bundle")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert folder.name.startswith(".bundle.") and folder.is_dir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", folder.name])  # no temp left
