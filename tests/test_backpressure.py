"""Backpressure over real HTTP: a `bentoml serve` with a small queue bound, many more clients than it can answer
within it. Refusals are 503s with Retry-After that arrive before any work is done, accepted requests wait
about the bound (not the whole crowd ahead of them), nothing times out and memory stays flat.

The assertions compare quantities measured in the same run (the server's own pace, an unloaded request),
never absolute speeds: the machine may be a loaded 2-core CI runner."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
from servekit import start_service

from bench.launcher import Server
from bench.loadgen import image_shots, percentile, run_load

pytestmark = pytest.mark.slow  # a server subprocess

BOUND_MS = 100
CLIENTS = 64
PER_REQUEST = 8


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("backpressure")
    # One image per model call: the model is the bottleneck, 64 clients of 8 images are several times what
    # the worker answers within the bound.
    srv = start_service(root, model=str(tiny_bundle), demo_dir="", workers="1", access_log="0", batch_size="1",
                        max_queue_ms=str(BOUND_MS))
    yield srv
    srv.stop()


def rss(server: Server) -> int:
    assert server.proc is not None
    root = psutil.Process(server.proc.pid)
    return sum(proc.memory_info().rss for proc in [root, *root.children(recursive=True)])


def test_overload_is_refused_at_once_and_accepted_requests_wait_about_the_bound(server: Server,
                                                                                cifar10: Path) -> None:
    jpegs = [path.read_bytes() for path in sorted((cifar10 / "test" / "cat").iterdir())[:64]]
    shots = image_shots("/embed", jpegs, PER_REQUEST)
    alone = run_load(server.url, shots, 1, 3)  # warm-up, and one client's latency on this machine now
    before = rss(server)
    crowd = run_load(server.url, shots, CLIENTS, 8)
    grown = rss(server) - before

    assert not crowd.errors, crowd.errors[:3]  # no timeout, no dropped connection, no other 5xx
    assert set(crowd.statuses) == {200, 503}, set(crowd.statuses)
    accepted, refused = crowd.ok(), crowd.with_status(503)
    retry = {value for value, status in zip(crowd.retry_after, crowd.statuses) if status == 503}
    assert all(value is not None and value.isdigit() and int(value) >= 1 for value in retry), retry
    # Refusals are answered before any work: faster than the requests that were served.
    assert statistics.median(refused) < statistics.median(accepted)
    # Accepted requests wait about the bound, not behind all 64 clients: without the gate each would wait for
    # the whole crowd, CLIENTS x the server's time per request (measured here, from what it served).
    pace_ms = crowd.seconds * 1000 / len(accepted)
    limit = 2 * BOUND_MS + 4 * pace_ms + 5 * statistics.median(alone.ok())
    assert CLIENTS * pace_ms > 2 * limit, "the crowd did not overload the server: the test proves nothing"
    assert percentile(accepted, 99) < limit, (percentile(accepted, 99), limit, pace_ms)
    assert grown < 64 << 20, f"the server grew by {grown >> 20} MiB under overload"


def test_a_refusal_names_the_limit_and_the_service_answers_again_after(server: Server, cifar10: Path) -> None:
    jpegs = [path.read_bytes() for path in sorted((cifar10 / "test" / "dog").iterdir())[:8]]
    crowd = run_load(server.url, image_shots("/embed", jpegs, PER_REQUEST), CLIENTS, 3)
    assert 503 in crowd.bodies, set(crowd.statuses)
    error = json.loads(crowd.bodies[503])["error"]
    assert "CORINFOMAX_MAX_QUEUE_MS" in error and f"limit is {BOUND_MS} ms" in error
    files = [("images", (f"{i}.jpg", jpeg, "image/jpeg")) for i, jpeg in enumerate(jpegs)]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        resp = http.post("/embed", files=files)  # the crowd is gone: admitted
        assert resp.status_code == 200, resp.text
        assert http.post("/info", json={}).json()["limits"]["max_queue_ms"] == BOUND_MS
    assert "Traceback" not in server.log.read_text()
