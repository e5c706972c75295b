"""Recommendations from positive and negative examples, Qdrant's two strategies, on unit vectors (NumPy).

- ``average_vector``: one ordinary search with the query ``mean(pos) + (mean(pos) - mean(neg))`` (the mean of
  the positives alone when there are no negatives), normalised. Examples that cancel out (a zero query, e.g.
  a positive and its opposite) have no direction to search in: refused with a 400.
- ``best_score``: each candidate is compared with every example. If its best similarity to a positive beats
  (is strictly above) its best similarity to a negative, its score is that positive similarity, the same
  scale as /search's, so ``score_threshold`` reads the same. Otherwise it is closer to what the user does not
  want, and scores ``-2 - best_negative``, in [-3, -1]: below every candidate of the first kind (whose score
  is above -1), and lower the closer it is to a negative. (Qdrant documents ``-(best_negative ** 2)`` for this
  case; squaring puts a candidate far from everything above one that is nearer a positive when similarities
  are negative, which the shift does not.)

Candidates for ``best_score`` are the union of each positive's top-``fetch`` from the backend's search
(filters apply there). That is exact: a candidate's positive score comes from one positive, and an item
outside that positive's list scores at most the list's last score, so once the k-th best gathered score
reaches the highest such last score (or a list came back short: the index is exhausted), no unseen item
can enter the top k. Until then ``fetch`` doubles, up to ``max_fetch`` per positive (then the answer is the
best among the gathered candidates). The examples' own ids (``exclude``) are never returned.
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Literal

import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.serving.index.backend import MAX_K, check_k, normalise

# The backend's search: unit queries [Q, D] and a k -> per query (id, score) pairs, best first, at most k
# (fewer only when fewer items pass the filter).
SearchFn = Callable[[np.ndarray, int], list[list[tuple[int, float]]]]
VectorsFn = Callable[[list[int]], np.ndarray]  # stored unit vectors of ids, in that order
Strategy = Literal["average_vector", "best_score"]
STRATEGIES = ("average_vector", "best_score")
ZERO = 1e-6  # a mean of unit vectors shorter than this is cancellation noise, not a direction


def recommend(positive: np.ndarray, negative: np.ndarray | None, k: int, search: SearchFn, vectors: VectorsFn,
              strategy: str = "average_vector", exclude: Collection[int] = (),
              score_threshold: float | None = None, max_fetch: int = MAX_K) -> list[tuple[int, float]]:
    """The top ``k`` (id, score) pairs, best first, for examples given as vectors ([P, D] positives, at least
    one, and [N, D] negatives); ids in ``exclude`` (the examples that are stored items) are left out."""
    if strategy not in STRATEGIES:
        raise BadInput(f"strategy must be one of {', '.join(STRATEGIES)}, got {str(strategy)[:40]!r}")
    pos, neg = _examples(positive, negative)
    k = check_k(k)
    threshold = check_threshold(score_threshold)
    excluded = set(exclude)
    if strategy == "average_vector":
        fetch = min(k + len(excluded), max_fetch)
        row = search(average_vector(pos, neg)[None, :], fetch)[0]
        return [(i, s) for i, s in row if i not in excluded and (threshold is None or s >= threshold)][:k]
    return _best_score(pos, neg, k, search, vectors, excluded, threshold, max_fetch)


def average_vector(positive: np.ndarray, negative: np.ndarray | None = None) -> np.ndarray:
    """The unit query ``mean(pos) + (mean(pos) - mean(neg))`` (``mean(pos)`` without negatives), float32."""
    pos, neg = _examples(positive, negative)
    query = pos.mean(axis=0) if len(neg) == 0 else 2 * pos.mean(axis=0) - neg.mean(axis=0)
    norm = float(np.linalg.norm(query))
    if norm < ZERO:
        raise BadInput("the positive and negative examples cancel out (their average is the zero vector): "
                       "change the examples or use strategy best_score")
    return (query / norm).astype(np.float32)


def best_scores(candidates: np.ndarray, positive: np.ndarray, negative: np.ndarray | None = None) -> np.ndarray:
    """The best_score score (module docstring) of each candidate unit vector, float64 ``[N]``."""
    c = np.asarray(candidates, np.float64)
    best_pos = (c @ np.asarray(positive, np.float64).T).max(axis=1)
    if negative is None or len(negative) == 0:
        return best_pos
    best_neg = (c @ np.asarray(negative, np.float64).T).max(axis=1)
    return np.where(best_pos > best_neg, best_pos, -2.0 - best_neg)


def _best_score(pos: np.ndarray, neg: np.ndarray, k: int, search: SearchFn, vectors: VectorsFn,
                excluded: set[int], threshold: float | None, max_fetch: int) -> list[tuple[int, float]]:
    fetch = min(k + len(excluded), max_fetch)
    while True:
        rows = search(pos, fetch)
        ids = sorted({i for row in rows for i, _ in row} - excluded)
        scores = best_scores(vectors(ids), pos, neg) if ids else np.zeros(0)
        ranked = sorted(zip(ids, scores.tolist()), key=lambda pair: (-pair[1], pair[0]))
        if threshold is not None:
            ranked = [pair for pair in ranked if pair[1] >= threshold]
        # The most an item in no list can score: each list's last score bounds what its positive gives it.
        unseen = -math.inf if any(len(row) < fetch for row in rows) else max(row[-1][1] for row in rows)
        complete = unseen == -math.inf or len(ranked) >= k and ranked[k - 1][1] >= unseen
        if complete or fetch >= max_fetch or threshold is not None and unseen < threshold:
            return ranked[:k]
        fetch = min(2 * fetch, max_fetch)


def _examples(positive: np.ndarray, negative: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Positives (at least one) and negatives as float64 unit rows of one dimension."""
    if positive is None or len(positive) == 0:
        raise BadInput("positive: give at least one example")
    pos = normalise(positive, np.shape(positive)[-1], "positive examples").astype(np.float64)
    if negative is None or len(negative) == 0:
        return pos, np.zeros((0, pos.shape[1]))
    return pos, normalise(negative, pos.shape[1], "negative examples").astype(np.float64)


def check_threshold(value: object) -> float | None:
    """A score threshold: None or a finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"score_threshold must be a finite number, got {str(value)[:40]}")
    return float(value)
