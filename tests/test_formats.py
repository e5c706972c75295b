"""docs/FORMATS.md agrees with what the code writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from datakit import small_folder
from docskit import section, table_keys
from trainkit import tiny_config

from corinfomax.training import run_folder, trainer
from corinfomax.training.checkpoint import load_checkpoint
from corinfomax.training.evaluate import one_cpu_thread


def test_checkpoint_keys_are_the_documented_ones(cifar10: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch of two steps, checkpointing after each: a mid-epoch checkpoint, then an epoch-end one."""
    monkeypatch.setenv("CORINFOMAX_CACHE", str(tmp_path / "cache"))
    written: list[dict[str, Any]] = []
    save = run_folder.save_checkpoint

    def keep_what_was_written(path: Path, state: dict[str, Any]) -> None:
        save(path, state)
        written.append(load_checkpoint(path))

    monkeypatch.setattr(run_folder, "save_checkpoint", keep_what_was_written)
    data = small_folder(cifar10, tmp_path / "data", per_class=7)  # 70 images: 2 steps of 32
    with one_cpu_thread():
        trainer.train(tiny_config(data, tmp_path / "run", epochs=1, checkpoint_every=1), progress=False)
    mid_epoch, epoch_end = written
    assert mid_epoch["epoch_batch"] == 1 and epoch_end["step"] == 2

    tables = table_keys(section("1. Checkpoint"))
    assert len(tables) == 2, "section 1 lists the keys of every checkpoint, then those a mid-epoch one adds"
    top_level, inside_an_epoch = tables
    assert set(epoch_end) == top_level
    assert set(mid_epoch) == top_level | inside_an_epoch


def test_table_keys_reads_first_column_names() -> None:
    text = "intro\n\n| key | content |\n| --- | --- |\n| `a` | x `not_a_key` |\n| `b`, `c` | y |\n\nmore\n\n" \
           "| key | content |\n| --- | --- |\n| `d` | z |\n"
    assert table_keys(text) == [{"a", "b", "c"}, {"d"}]
