"""The service's own Prometheus metrics (beside BentoML's request counts and latencies) on ``/metrics``."""

from __future__ import annotations

import bentoml

INDEX_ITEMS = bentoml.metrics.Gauge(name="corinfomax_index_items", documentation="Items in the vector index",
                                    multiprocess_mode="livemostrecent")
MODEL_BATCH = bentoml.metrics.Histogram(
    name="corinfomax_model_batch_size", documentation="Images per model call (requests merged by the batcher)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MODEL_SECONDS = bentoml.metrics.Histogram(
    name="corinfomax_model_seconds", documentation="Seconds per model call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))


def observe_batch(rows: int, seconds: float) -> None:
    """Record one model call of the micro-batcher."""
    MODEL_BATCH.observe(rows)
    MODEL_SECONDS.observe(seconds)
