"""A throwaway `bentoml serve` of this checkout for a test module (the service, hostile, page and
real-resolution tests start it the same way)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.launcher import Server

REPO = Path(__file__).resolve().parents[1]


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
        time.sleep(float(resp.headers["retry-after"]))
    return resp


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``corinfomax ARGS`` in a subprocess of this checkout, with ``env`` added to the environment."""
    return subprocess.run([sys.executable, "-m", "corinfomax.cli", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
