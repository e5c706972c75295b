"""`bentoml serve` of this service as a child process: start it, wait until it is ready, stop it with its
workers. The tests, the benches and scripts/screenshot_page.py launch the service this way (import it as
``bench.launcher``: the tests have the repo root on their path, benches and scripts run with ``python -m``
from it). Not part of the package: the service itself never starts servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

SERVICE = "corinfomax.serving.api.service:CorInfoMax"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`bentoml serve` in its own process group, so a test can kill -9 all of it."""

    def __init__(self, env: dict[str, str], log: Path, cwd: Path | None = None,
                 command: list[str] | None = None) -> None:
        """``command`` replaces `bentoml serve SERVICE` (e.g. `corinfomax serve`, or `bentoml serve` of a Bento
        tag); it gets its port from PORT, which `corinfomax serve` reads, and BENTOML_PORT, which `bentoml serve`
        reads."""
        self.env, self.log, self.cwd, self.port = env, log, cwd, free_port()
        self.command = command or [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1"]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "Server":
        env = {**self.env, "PORT": str(self.port), "BENTOML_PORT": str(self.port)}
        self.proc = subprocess.Popen(
            self.command, cwd=self.cwd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server and all its workers (they run in sessions of their own, so a group kill
        alone would leave them orphaned after SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        workers = psutil.Process(self.proc.pid).children(recursive=True)
        os.killpg(self.proc.pid, sig)
        if sig == signal.SIGKILL:  # a crash takes every process of the service down at once
            for worker in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        for worker in alive:  # a worker that outlived its arbiter
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
