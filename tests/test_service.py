"""The BentoML service over real HTTP: a `bentoml serve` subprocess, real JPEGs, real index on disk."""

from __future__ import annotations

import base64
import io
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import servekit
from PIL import Image
from servekit import (
    API_KEY,
    CLASSES,
    MAX_REQUEST,
    files,
    ok,
    post_retrying,
)

from bench.launcher import Server

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

server, client = servekit.server, servekit.client  # the served index per backend


def jpegs(cifar10: Path, per_class: int = 2, offset: int = 0) -> list[tuple[str, Path]]:
    return [(c, cifar10 / "test" / c / f"{i:04d}.jpg") for c in CLASSES for i in range(offset, offset + per_class)]


def test_embed_files_and_base64_agree(client: httpx.Client, cifar10: Path) -> None:
    paths = [p for _, p in jpegs(cifar10, 1)[:3]]
    by_file = np.asarray(ok(client.post("/embed", files=files(paths)))["embeddings"])
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    by_b64 = np.asarray(ok(client.post("/embed", json={"images_b64": b64}))["embeddings"])
    assert by_file.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(by_file, axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(by_file, by_b64, atol=1e-6)


def test_add_search_get_classify_delete(server: Server, client: httpx.Client, cifar10: Path) -> None:
    items = jpegs(cifar10, 2)
    added = ok(client.post("/add", files=files([p for _, p in items]),
                           data={"metadata": str([{"path": p.name} for _, p in items]).replace("'", '"'),
                                 "labels": str([c for c, _ in items]).replace("'", '"')}))["ids"]
    assert len(added) == 20
    found = ok(client.post("/search", files=files([p for _, p in items[:4]]), data={"k": "3"}))["results"]
    assert [row[0]["id"] for row in found] == added[:4]
    assert found[0][0]["metadata"] == {"path": items[0][1].name} and found[0][0]["label"] == "airplane"
    by_id = ok(client.post("/search", json={"ids": [added[5]], "k": 1}))["results"]
    assert by_id[0][0]["id"] == added[5]
    item = ok(client.post("/get", json={"id": added[5]}))
    by_vector = ok(client.post("/search", json={"vectors": [item["vector"]], "k": 1}))["results"]
    assert by_vector[0][0]["id"] == added[5] and item["label"] == items[5][0]

    probe = ok(client.post("/classify", files=files([items[0][1]]), data={"k": "3"}))
    assert probe["method"] == "probe" and len(probe["predictions"][0]) == 3
    assert {p["label"] for p in probe["predictions"][0]} <= set(CLASSES)
    knn = ok(client.post("/classify", files=files([items[0][1]]), data={"method": "knn", "k": "1", "neighbours": "1"}))
    assert knn["predictions"][0][0]["label"] == "airplane"  # its own stored copy is the nearest

    assert ok(client.post("/delete", json={"ids": [added[0]]}))["deleted"] == [added[0]]
    assert client.post("/get", json={"id": added[0]}).status_code == 404
    stats = ok(client.post("/stats", json={}))
    assert stats["count"] >= 19 and stats["labelled"] >= 19 and stats["thumbnails"] >= 19
    assert stats["kind"].startswith("Milvus") == server.env["CORINFOMAX_INDEX"].endswith(".db")
    info = ok(client.post("/info", json={}))
    assert info["model"]["embedding_dim"] == 256 and info["probe"]["classes"] == CLASSES


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, "PNG")
    return buffer.getvalue()


def _bad_requests(jpeg: bytes) -> list[tuple[str, str, dict[str, Any], int]]:
    vec = [0.1] * 256
    return [
        ("zero-byte image", "/embed", {"files": [("images", ("a.jpg", b"", "image/jpeg"))]}, 400),
        ("non-image bytes", "/embed", {"files": [("images", ("a.jpg", b"hello world" * 10, "image/jpeg"))]}, 400),
        ("truncated jpeg", "/embed", {"files": [("images", ("a.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"))]}, 400),
        ("huge pixel count", "/embed", {"files": [("images", ("a.png", _png((1200, 1000)), "image/png"))]}, 413),
        ("wrong json shape", "/search", {"json": {"vectors": "abc"}}, 400),
        ("not json", "/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ("wrong dimension", "/search", {"json": {"vectors": [[0.1, 0.2]]}}, 400),
        ("NaN vector", "/add", {"content": b'{"vectors": [[NaN' + b", 0.1" * 255 + b"]]}",
                                "headers": {"content-type": "application/json"}}, 400),
        ("zero vector", "/add", {"json": {"vectors": [[0.0] * 256]}}, 400),
        ("k = 0", "/search", {"json": {"vectors": [vec], "k": 0}}, 400),
        ("k huge", "/search", {"json": {"vectors": [vec], "k": 10**7}}, 400),
        ("unknown id get", "/get", {"json": {"id": 10**9}}, 404),
        ("unknown id delete", "/delete", {"json": {"ids": [10**9]}}, 404),
        ("unknown id search", "/search", {"json": {"ids": [10**9]}}, 404),
        ("empty batch", "/embed", {"json": {}}, 400),
        ("empty vectors", "/add", {"json": {"vectors": []}}, 400),
        ("empty ids", "/delete", {"json": {"ids": []}}, 400),
        ("two query kinds", "/search", {"json": {"vectors": [vec], "ids": [1]}}, 400),
        ("oversized request", "/embed", {"content": b"x" * (MAX_REQUEST + 1),
                                         "headers": {"content-type": "application/json"}}, 413),
        ("bad base64", "/embed", {"json": {"images_b64": ["not base64!"]}}, 400),
        ("URL that fails", "/embed", {"json": {"urls": ["http://no-such-host.invalid/a.jpg"]}}, 400),
        ("private URL", "/embed", {"json": {"urls": ["http://127.0.0.1:9/a.jpg"]}}, 400),
        ("metadata not an object", "/add", {"json": {"vectors": [vec], "metadata": [5]}}, 400),
        ("unknown classify method", "/classify", {"json": {"images_b64": [base64.b64encode(jpeg).decode()],
                                                           "method": "magic"}}, 400),
        ("too many images", "/embed", {"json": {"images_b64": [base64.b64encode(jpeg).decode()] * 65}}, 400),
    ]


def test_bad_input_answers_4xx_and_server_stays_up(client: httpx.Client, cifar10: Path) -> None:
    jpeg = (cifar10 / "test" / "cat" / "0001.jpg").read_bytes()
    failures = []
    for name, path, kwargs, status in _bad_requests(jpeg):
        resp = client.post(path, **kwargs)
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        message = body.get("error") if isinstance(body, dict) else body
        if resp.status_code != status or not message:
            failures.append(f"{name}: {resp.status_code} {resp.text[:200]}")
    assert not failures, "\n".join(failures)
    assert client.get("/livez").status_code == 200


def test_api_key_required(server: Server) -> None:
    assert httpx.post(f"{server.url}/stats", json={}).status_code == 401
    assert httpx.post(f"{server.url}/stats", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{server.url}/stats", json={}, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # probes stay open


def test_metrics_report_index_size_and_latency(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    assert "corinfomax_index_items" in text and "bentoml_service_request_duration_seconds" in text


def test_metrics_time_each_stage_of_a_request(client: httpx.Client, cifar10: Path) -> None:
    """Every request to an API is timed stage by stage (serving/api/metrics.py), under bounded labels."""
    paths = [p for _, p in jpegs(cifar10, 1)[:2]]
    ok(client.post("/embed", files=files(paths)))
    ok(client.post("/search", files=files(paths[:1]), data={"k": "2"}))
    text = client.get("/metrics").text
    counted = {(endpoint, stage) for endpoint, stage, count in re.findall(
        r'corinfomax_stage_seconds_count{endpoint="(\w+)",stage="(\w+)"} (\S+)', text) if float(count) > 0}
    assert {("embed", stage) for stage in ("parse", "decode", "queue", "inference", "respond")} <= counted
    assert ("search", "index") in counted  # /embed reaches the index only to refresh its routes (<= 1/s)
    assert {endpoint for endpoint, _ in counted} <= {"embed", "search", "classify", "add", "delete", "get", "stats",
                                                     "info"}


def test_eight_concurrent_clients(server: Server, cifar10: Path) -> None:
    errors: list[str] = []

    def work(worker: int) -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as http:
            for round_ in range(3):
                path = cifar10 / "test" / CLASSES[worker] / f"{10 + round_:04d}.jpg"
                resp = post_retrying(http, "/add", files=files([path]), data={"labels": f'["{CLASSES[worker]}"]'})
                if resp.status_code != 200:
                    errors.append(f"add {resp.status_code} {resp.text[:200]}")
                    continue
                new_id = resp.json()["ids"][0]
                hits = post_retrying(http, "/search", files=files([path]), data={"k": "1"})
                if hits.status_code != 200 or hits.json()["results"][0][0]["id"] != new_id:
                    errors.append(f"search {hits.status_code} {hits.text[:200]}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_restart_keeps_everything_and_kill9_keeps_acknowledged_adds(server: Server, client: httpx.Client) -> None:
    before = ok(client.post("/stats", json={}))["count"]
    server.stop()
    server.start()
    assert ok(client.post("/stats", json={}))["count"] == before
    rng = np.random.default_rng(1)
    acknowledged: list[tuple[int, list[float]]] = []
    stop = threading.Event()

    def add_forever() -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=10) as http:
            while not stop.is_set():
                vector = rng.normal(size=256).tolist()
                try:
                    resp = http.post("/add", json={"vectors": [vector], "metadata": [{"n": len(acknowledged)}]})
                except httpx.HTTPError:
                    return
                if resp.status_code == 200:
                    acknowledged.append((resp.json()["ids"][0], vector))

    adder = threading.Thread(target=add_forever)
    adder.start()
    time.sleep(3)
    server.stop(signal.SIGKILL)
    stop.set()
    adder.join()
    assert len(acknowledged) > 5
    server.start()
    stats = ok(client.post("/stats", json={}))
    assert stats["count"] >= before + len(acknowledged)
    for item_id, _ in acknowledged:
        assert ok(client.post("/get", json={"id": item_id}))["id"] == item_id
    last_id, last_vector = acknowledged[-1]
    assert ok(client.post("/search", json={"vectors": [last_vector], "k": 1}))["results"][0][0]["id"] == last_id


def test_micro_batcher_merges_concurrent_requests_and_keeps_their_rows() -> None:
    """Requests arriving while the model runs share its next call; each gets back its own rows."""
    import asyncio

    from corinfomax.serving.api.batcher import MicroBatcher

    calls: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        time.sleep(0.05)
        if (batch < 0).any():
            raise ValueError("negative input")
        return batch * 10

    async def scenario() -> tuple[list[np.ndarray], BaseException]:
        batcher = MicroBatcher(model, max_batch=4)
        first = asyncio.ensure_future(batcher(np.array([[0]])))
        await asyncio.sleep(0.01)  # the first call is running; these queue behind it
        rest = [batcher(np.array([[i], [i + 100]])) for i in (1, 2, 3)]
        results = await asyncio.gather(first, *rest)
        with pytest.raises(ValueError, match="negative") as failed:
            await batcher(np.array([[-1]]))
        batcher.close()
        return results, failed.value

    results, error = asyncio.run(scenario())
    assert calls == [1, 4, 2, 1]  # alone, then two requests (4 rows), then the third, then the failing one
    assert [r[:, 0].tolist() for r in results] == [[0], [10, 1010], [20, 1020], [30, 1030]]
    assert isinstance(error, ValueError)
