"""The service's own Prometheus metrics (beside BentoML's request counts and latencies) on ``/metrics``: the index
size, the model's batches, and where each request's time goes, stage by stage.

Stages of one request (``corinfomax_stage_seconds{endpoint, stage}``), each a histogram, so a dashboard (or
``bench/serve_load.py``, which prints the mean of each per request) shows which one a regression is in:

- ``parse``: from the request's arrival in the service to its handler's start: reading the body, parsing it
  (forms, JSON), validating the fields;
- ``decode``: the images' decode and resize (``inputs``);
- ``queue``: waiting for the model, behind other requests' batches (``batcher``);
- ``inference``: the model call that embedded the request's images (shared with the requests of its batch);
- ``index``: the calls to ``IndexOwner`` (``envelope.call``);
- ``respond``: from the handler's return to the answer's last byte: serialising and sending.

Label sets are bounded: ``endpoint`` is one of the service's API names (any other path is not timed) and
``stage`` one of the six above. Timings reach a request's record through a context variable set by
``StageTimer``, an ASGI middleware; outside a request (tests, benches) recording does nothing.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any, Awaitable, Callable, Optional

import bentoml

STAGES = ("parse", "decode", "queue", "inference", "index", "respond")

INDEX_ITEMS = bentoml.metrics.Gauge(name="corinfomax_index_items", documentation="Items in the vector index",
                                    multiprocess_mode="livemostrecent")
MODEL_BATCH = bentoml.metrics.Histogram(
    name="corinfomax_model_batch_size", documentation="Images per model call (requests merged by the batcher)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MODEL_SECONDS = bentoml.metrics.Histogram(
    name="corinfomax_model_seconds", documentation="Seconds per model call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
STAGE_SECONDS = bentoml.metrics.Histogram(
    name="corinfomax_stage_seconds", documentation="Seconds one request spent in each stage of its path",
    labelnames=["endpoint", "stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))


def observe_batch(rows: int, seconds: float) -> None:
    """Record one model call of the micro-batcher."""
    MODEL_BATCH.observe(rows)
    MODEL_SECONDS.observe(seconds)


class RequestStages:
    """The stage times of one request, observed together when its answer has been sent."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.handler_done: Optional[float] = None

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def observe(self) -> None:
        for stage, seconds in self.seconds.items():
            STAGE_SECONDS.labels(endpoint=self.endpoint, stage=stage).observe(seconds)


_current: contextvars.ContextVar[Optional[RequestStages]] = contextvars.ContextVar("corinfomax_stages", default=None)


def record(stage: str, seconds: float) -> None:
    """Add ``seconds`` to ``stage`` of the request being handled (nothing outside a request)."""
    stages = _current.get()
    if stages is not None:
        stages.add(stage, seconds)


class timed:
    """``with timed("decode"): ...`` records the block's duration in the current request's stage."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        record(self.stage, time.perf_counter() - self.started)


def model_wait(queued: float, inference: float) -> None:
    """The batcher's report for one request: seconds waiting for the model, and in the call that embedded it."""
    record("queue", queued)
    record("inference", inference)


def handler_started() -> None:
    """Called as an API's handler starts: what came before it since the request arrived was ``parse``."""
    stages = _current.get()
    if stages is not None:
        stages.add("parse", time.perf_counter() - stages.started)


def handler_finished() -> None:
    """Called as an API's handler returns: what follows until the last byte is sent is ``respond``."""
    stages = _current.get()
    if stages is not None:
        stages.handler_done = time.perf_counter()


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class StageTimer:
    """ASGI middleware: gives each request to one of ``routes`` (path -> endpoint name) a ``RequestStages`` and
    observes it once the answer's last byte is sent."""

    def __init__(self, app: Any, routes: dict[str, str]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        stages = RequestStages(endpoint)

        async def timing_send(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                if stages.handler_done is not None:
                    stages.add("respond", time.perf_counter() - stages.handler_done)
                stages.observe()

        token = _current.set(stages)
        try:
            await self.app(scope, receive, timing_send)
        finally:
            _current.reset(token)
