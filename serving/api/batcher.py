"""Merge concurrent requests' images into one model call, inside one service worker.

Why not BentoML's ``batchable`` API: that needs a second service, so every embed crossed a process
boundary (uint8 arrays serialised both ways) and its dispatcher added tens of ms of waiting per call
on a busy machine (docs/RESULTS.md "Serving"). Here batching is greedy: when the model is idle a
request runs at once (batch-1 latency at low load); while it runs, new arrivals queue and the next
call takes all of them, up to ``max_batch`` rows. So batches grow with load and never wait for a timer
unless ``wait_ms`` asks for it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

Model = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Pending:
    """One request's rows waiting for the model, and when (perf_counter) they were queued and their call ran."""

    pixels: np.ndarray
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    seconds: float = 0.0


class MicroBatcher:
    """``await batcher(pixels)`` -> the model's rows for those pixels, computed in a shared batch.

    Args:
        model: ``[N, ...] -> [N, D]``, run in one dedicated thread (the event loop stays free to
            accept and decode the next requests while it runs).
        max_batch: most rows per model call (one request larger than this runs alone).
        wait_ms: extra time to wait for more requests before a call that is not full (0: none).
        on_batch: called with ``(rows, seconds)`` after each model call, e.g. for metrics.
        on_request: called in each request's own context with ``(seconds queued, seconds of its model call)``.
    """

    def __init__(self, model: Model, max_batch: int, wait_ms: float = 0.0,
                 on_batch: Optional[Callable[[int, float], None]] = None,
                 on_request: Optional[Callable[[float, float], None]] = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.wait_s, self.on_batch = model, max_batch, wait_ms / 1000, on_batch
        self.on_request = on_request
        self._pending: list[_Pending] = []
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="model")

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run_forever())
        item = _Pending(pixels, loop.create_future())
        self._pending.append(item)
        assert self._wake is not None
        self._wake.set()
        out = await item.future
        if self.on_request is not None:
            self.on_request(item.started - item.queued, item.seconds)
        return out

    def _take(self) -> list[_Pending]:
        """Pending requests (skipping cancelled ones) up to ``max_batch`` rows; at least one."""
        taken: list[_Pending] = []
        rows = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # the client went away
                self._pending.pop(0)
                continue
            if taken and rows + len(item.pixels) > self.max_batch:
                break
            taken.append(self._pending.pop(0))
            rows += len(item.pixels)
        return taken

    def _pending_rows(self) -> int:
        return sum(len(item.pixels) for item in self._pending if not item.future.done())

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.wait_s and self._pending_rows() < self.max_batch:
                await asyncio.sleep(self.wait_s)
            while taken := self._take():
                batch = np.concatenate([item.pixels for item in taken]) if len(taken) > 1 else taken[0].pixels
                started = time.perf_counter()
                try:
                    out = await loop.run_in_executor(self._thread, self.model, batch)
                except Exception as err:  # every waiting request gets the model's error
                    for item in taken:
                        if not item.future.done():
                            item.future.set_exception(err)
                    continue
                seconds = time.perf_counter() - started
                if self.on_batch is not None:
                    self.on_batch(len(batch), seconds)
                start = 0
                for item in taken:
                    item.started, item.seconds = started, seconds
                    if not item.future.done():
                        item.future.set_result(out[start : start + len(item.pixels)])
                    start += len(item.pixels)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
