"""`--engine ray` on a local Ray instance: same output format and rows as the local engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from datakit import FEW_CLASSES, small_folder

from corinfomax.serving.extract.extract import extract
from corinfomax.serving.extract.features import failures, load_features, read_manifest

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_engine_matches_local_engine(tiny_bundle: Path, cifar10: Path, tmp_path: Path) -> None:
    images = small_folder(cifar10, tmp_path / "images", 70, "test", FEW_CLASSES)
    (images / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    options: dict[str, Any] = {"shard_rows": 64, "batch_size": 32, "show_progress": False}
    local, distributed = tmp_path / "local", tmp_path / "ray"
    extract([str(images)], tiny_bundle, local, **options)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        summary = extract([str(images)], tiny_bundle, distributed, engine="ray", threads=1, **options)
    finally:
        ray.shutdown()

    assert summary["images"] == 211 and summary["failed_now"] == 1 and summary["shards_written"] == 4
    assert read_manifest(distributed) == read_manifest(local)
    for name in ("00000", "00003"):
        assert pq.read_table(distributed / "shards" / f"{name}.parquet").equals(
            pq.read_table(local / "shards" / f"{name}.parquet"))
    assert [path for path, _ in failures(distributed)] == [str(images / "cat" / "broken.jpg")]
    a, b = load_features(local), load_features(distributed)
    assert a.paths == b.paths and a.labels == b.labels
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
