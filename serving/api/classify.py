"""From embeddings to labels, the two ways ``/classify`` offers: the linear probe, or a weighted kNN vote over
the index's labelled items."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the probe module imports SciPy, which the index service's processes never need
    from corinfomax.serving.probe import LinearProbe

# Temperature of the /classify kNN vote: 0.07, InstDisc's and DINO's value. It turns the neighbours'
# similarities into the class confidences the API returns (the top label rarely depends on it). `corinfomax eval`
# votes at 0.1 instead (training/evaluate.py), the value every reported accuracy was measured with.
KNN_TEMPERATURE = 0.07


def knn_vote(hits: list[dict[str, Any]], top: int, temperature: float = KNN_TEMPERATURE) -> list[dict[str, Any]]:
    """Weighted kNN vote: each neighbour adds ``exp(score / T)`` to its label; normalised to probabilities."""
    weights: dict[str, float] = {}
    for hit in hits:
        weights[hit["label"]] = weights.get(hit["label"], 0.0) + math.exp((hit["score"] - 1.0) / temperature)
    total = sum(weights.values()) or 1.0
    ranked = sorted(weights.items(), key=lambda kv: -kv[1])[:top]
    return [{"label": label, "probability": round(w / total, 6)} for label, w in ranked]


def probe_predictions(probe: LinearProbe, vectors: np.ndarray, top: int) -> list[list[dict[str, Any]]]:
    """The probe's ``top`` labels per embedding, most probable first."""
    probs = probe.predict_proba(vectors)
    order = np.argsort(-probs, axis=1)[:, :top]
    return [[{"label": probe.classes[j], "probability": round(float(p[j]), 6)} for j in row]
            for p, row in zip(probs, order)]
