"""Helpers of the service tests: a throwaway `bentoml serve` of this checkout for a test module (the service,
hostile, page and real-resolution tests start it the same way), the served index per backend that the service and
search-feature tests share, and requests built without a server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from starlette.requests import Request

from bench.launcher import Server

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
MAX_REQUEST = 2 << 20
MAX_PIXELS = 1_000_000
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def start_service(root: Path, **settings: str) -> Server:
    """Start `bentoml serve` with its index, BentoML home and log under ``root``; each ``name=value`` becomes
    ``CORINFOMAX_<NAME>=value`` (e.g. ``model=...``, ``api_key=...``, ``demo_dir=""``)."""
    env = {**os.environ, "CORINFOMAX_INDEX": str(root / "index"), "BENTOML_HOME": str(root / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(REPO),
           **{f"CORINFOMAX_{name.upper()}": value for name, value in settings.items()}}
    return Server(env, root / "server.log").start()


def post_retrying(http: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    """POST as a well-behaved client: a 503 (the service is overloaded) is retried after its Retry-After."""
    for _ in range(20):
        resp = http.post(path, **kwargs)
        if resp.status_code != 503:
            return resp
        assert "retry-after" in resp.headers, f"a 503 without Retry-After: {resp.text}"
        time.sleep(float(resp.headers["retry-after"]))
    return resp


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``corinfomax ARGS`` in a subprocess of this checkout, with ``env`` added to the environment."""
    return subprocess.run([sys.executable, "-m", "corinfomax.cli", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def request_with_body(body: bytes, content_type: str) -> Request:
    """A Starlette request of one POST body (the parsers' input), without a server."""
    sent = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/search", "headers": headers}, receive)


def files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart ``images`` parts of JPEG files."""
    return [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def ok(resp: httpx.Response) -> Any:
    """The JSON of a 200 answer (any other fails the test with the answer's text)."""
    assert resp.status_code == 200, resp.text
    return resp.json()


def write_probe(path: Path, dim: int) -> None:
    """A random linear probe over the CIFAR-10 classes for ``dim``-dim embeddings."""
    rng = np.random.default_rng(0)
    np.savez(path, weight=rng.normal(size=(10, dim)).astype(np.float32), bias=np.zeros(10, np.float32),
             classes=np.array(CLASSES), model_sha256=np.array(""))


# Every test that talks to the server runs against both index backends: a folder (SQLite + FAISS) and a
# Milvus Lite file (the real Milvus engine, in the index worker's process).
@pytest.fixture(scope="module", params=["index", "index.db"], ids=["folder", "milvus-lite"])
def server(request: pytest.FixtureRequest, tiny_bundle: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("service")
    write_probe(root / "probe.npz", 256)
    srv = start_service(root, model=str(tiny_bundle), demo_dir="", probe=str(root / "probe.npz"), api_key=API_KEY,
                        workers="2", max_request_bytes=str(MAX_REQUEST), max_pixels=str(MAX_PIXELS),
                        index=str(root / request.param))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        yield http
