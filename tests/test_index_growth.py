"""A collection grown by /add past exact search (``kinds.FLAT_MAX`` items), over HTTP against a real
`bentoml serve`: the folder index builds its approximate kind in the background of the index process while
requests go on, then answers from it; Milvus Lite, which indexes by itself, answers the same."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from servekit import ok, start_service

from bench.filter_scale import mixture
from corinfomax.serving.index.kinds import FLAT_MAX

pytestmark = pytest.mark.slow  # a server subprocess

BACKENDS = {"folder": "index", "milvus-lite": "index.db"}
BATCH = 1000


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_collection_grown_by_adds_is_indexed_beside_the_requests(tiny_bundle: Path, tmp_path: Path,
                                                                   backend: str) -> None:
    rng = np.random.default_rng(0)
    vectors = mixture(rng, rng.normal(size=(200, 256)).astype(np.float32), FLAT_MAX + BATCH, 1.0)
    server = start_service(tmp_path, model=str(tiny_bundle), demo_dir="", workers="1",
                           index=str(tmp_path / BACKENDS[backend]))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            ids: list[int] = []
            for start in range(0, len(vectors), BATCH):
                ids += ok(client.post("/add", json={"vectors": vectors[start : start + BATCH].tolist()}))["ids"]
            probes = [0, FLAT_MAX // 2, len(vectors) - 1]
            deadline = time.monotonic() + 120
            while backend == "folder" and ok(client.post("/stats", json={}))["kind"] == "Flat":
                assert time.monotonic() < deadline, "no background build replaced the exact index"
                found = ok(client.post("/search", json={"vectors": vectors[probes].tolist(), "k": 1}))["results"]
                assert [row[0]["id"] for row in found] == [ids[i] for i in probes]  # answered all along
                time.sleep(0.5)
            stats = ok(client.post("/stats", json={}))
            found = ok(client.post("/search", json={"vectors": vectors[probes].tolist(), "k": 1}))["results"]
    finally:
        server.stop()
    assert stats["count"] == len(vectors) and [row[0]["id"] for row in found] == [ids[i] for i in probes]
    if backend == "folder":
        assert stats["kind"] != "Flat" and stats["recall_at_10"] >= 0.95
