"""Backpressure: a worker answers 503 with ``Retry-After`` at once when a new request would wait longer than
``CORINFOMAX_MAX_QUEUE_MS``, instead of queueing it behind the others.

The expected wait of a new request is the work already admitted and not yet answered, plus its own, at the pace
this worker answers while it is busy: ``(in_flight + 1) x seconds per answer``; a request is refused when that
mean is over half the bound (``HEADROOM``), which keeps the slow tail within it. The pace is the busy time over
the answers of about the last 20 answers (both sums decay by ``PACE_MEMORY`` per answer), counted only while
requests are in flight (an idle worker's pauses are not its speed), so it follows what the worker does now (a
bigger model, bigger requests, a busier machine). It is a ratio of sums, not a mean of intervals, because answers
come in bursts: the batcher answers every request of one model call at once, then none until the next call
ends. (A mean of intervals with each one capped at a few times the mean so far, tried first, fell towards zero
under bursts of more than four answers, and the gate then admitted everything: 64 clients of 16 images waited
~1 s, twice the bound, on a quiet machine.) One interval counts for at most the bound itself, so a single stall
(a cold start, a stalled core) cannot hold the pace above it for long. A worker with nothing in flight always
admits (a request slower than the bound alone must still be served), and so does one that has not answered
anything yet.

The check runs before the body is read, so a refusal costs the worker almost nothing: the body is drained
(keeping the connection open for the client's retry) and ``{"error"}`` is answered with status 503.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import bentoml

from corinfomax.serving.api.http import Receive, Scope, Send, send_error

REFUSED = bentoml.metrics.Counter(
    name="corinfomax_admission_refused", documentation="Requests answered 503 because the expected wait was over "
    "CORINFOMAX_MAX_QUEUE_MS", labelnames=["endpoint"])
# The gate keeps the mean expected wait within 1/HEADROOM of the bound, so that the slow tail stays within it: at
# saturation, p99 waits ran up to ~2x the median (bench/serve_backpressure.py --sweep, 1 to 64 clients).
HEADROOM = 2.0
# How much of the busy time and answers so far count at each new answer: about the last 20 answers, a few model
# calls' worth of bursts, so a lasting slowdown is followed within a few calls.
PACE_MEMORY = 0.95


class Admission:
    """The admission decision of one worker: ``admit`` before a request, ``done`` once it is answered."""

    def __init__(self, max_wait_s: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.max_wait_s, self.clock = max_wait_s, clock
        self.in_flight = 0
        self.pace_s: Optional[float] = None  # seconds per answer while busy; None until the first answer
        self._busy_s = 0.0  # decaying sums of busy time and of answers: pace_s = _busy_s / _answers
        self._answers = 0.0
        self._last = 0.0  # when the last answer was given, or the worker became busy

    def expected_wait(self) -> float:
        """Seconds until a request admitted now would be answered."""
        return (self.in_flight + 1) * (self.pace_s or 0.0)

    def admit(self) -> bool:
        """Admit (and count) a request, or refuse it."""
        if self.in_flight and self.pace_s is not None and HEADROOM * self.expected_wait() > self.max_wait_s:
            return False
        if self.in_flight == 0:
            self._last = self.clock()
        self.in_flight += 1
        return True

    def done(self) -> None:
        """An admitted request has been answered."""
        now = self.clock()
        interval, self._last = min(now - self._last, self.max_wait_s), now
        self._busy_s = PACE_MEMORY * self._busy_s + interval
        self._answers = PACE_MEMORY * self._answers + 1
        self.pace_s = self._busy_s / self._answers
        self.in_flight -= 1

    def retry_after(self) -> int:
        """Whole seconds a refused client should wait (the header's unit), at least 1."""
        return max(1, math.ceil(self.expected_wait() - self.max_wait_s / HEADROOM))


class AdmissionGate:
    """ASGI middleware: ``Admission`` in front of the requests to ``routes`` (path -> endpoint name)."""

    def __init__(self, app: Any, routes: dict[str, str], max_wait_ms: float) -> None:
        self.app, self.routes = app, routes
        self.admission = Admission(max_wait_ms / 1000)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or self.admission.max_wait_s <= 0:
            await self.app(scope, receive, send)
            return
        if not self.admission.admit():
            await self._refuse(endpoint, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.done()

    async def _refuse(self, endpoint: str, receive: Receive, send: Send) -> None:
        REFUSED.labels(endpoint=endpoint).inc()
        wait_ms = self.admission.expected_wait() * 1000
        limit_ms = self.admission.max_wait_s * 1000
        retry = self.admission.retry_after()
        while (await receive()).get("more_body", False):  # the guard outside bounds its size and time
            pass
        await send_error(send, 503, f"overloaded: a request now would wait about {wait_ms:.0f} ms, and the limit is "
                         f"{limit_ms:.0f} ms for the slowest (CORINFOMAX_MAX_QUEUE_MS); retry in {retry} s",
                         [(b"retry-after", str(retry).encode())])
