"""Recommendations (serving/index/recommend.py) against a brute-force NumPy reference over every item."""

from __future__ import annotations

import numpy as np
import pytest

from corinfomax.core.errors import BadInput
from corinfomax.serving.index.recommend import SearchFn, average_vector, best_scores, recommend

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def data(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (50 centres), so that examples have close neighbours as real embeddings do."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(50, DIM)))
    return unit(centres[rng.integers(0, 50, n)] + 0.5 * unit(rng.normal(size=(n, DIM))))


class Exact:
    """An exact search over ``stored`` (ids are row numbers), optionally over ``allowed`` ids only; counts calls."""

    def __init__(self, stored: np.ndarray, allowed: np.ndarray | None = None) -> None:
        self.stored, self.calls = stored, 0
        self.allowed = np.arange(len(stored)) if allowed is None else allowed

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        self.calls += 1
        scores = np.asarray(queries, np.float64) @ self.stored[self.allowed].T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(int(self.allowed[j]), float(row[j])) for j in cols] for row, cols in zip(scores, order)]

    def vectors(self, ids: list[int]) -> np.ndarray:
        return self.stored[ids]


# recommend() takes examples as float32 unit vectors, as the index stores them: its scores differ from this
# float64 reference by float32 rounding of unit vectors (~1e-7 per dot product), so answers are compared by
# the reference scores of the ids they rank, which makes two near-equal items trading places no failure.
SLACK = 1e-6


def brute_force(stored: np.ndarray, scores: np.ndarray, k: int, exclude: set[int],
                allowed: np.ndarray | None = None, threshold: float | None = None) -> list[float]:
    """The reference scores of the top k (ids in ``allowed`` and not in ``exclude``), best first."""
    ids = [i for i in (range(len(stored)) if allowed is None else allowed.tolist()) if i not in exclude]
    return sorted((float(scores[i]) for i in ids if threshold is None or scores[i] >= threshold), reverse=True)[:k]


def ranked_like(got: list[tuple[int, float]], scores: np.ndarray, expected: list[float]) -> bool:
    return [float(scores[i]) for i, _ in got] == pytest.approx(expected, abs=SLACK) and \
        [s for _, s in got] == pytest.approx([scores[i] for i, _ in got], abs=SLACK)


def test_best_score_equals_scoring_every_item() -> None:
    stored = data()
    exact = Exact(stored)
    for pos_ids, neg_ids in [([3], []), ([3, 700], [12]), ([5, 6, 7], [8, 9])]:
        scores = best_scores(stored, stored[pos_ids], stored[neg_ids])
        got = recommend(stored[pos_ids], stored[neg_ids], 10, exact.search, exact.vectors, "best_score",
                        exclude={*pos_ids, *neg_ids})
        assert ranked_like(got, scores, brute_force(stored, scores, 10, {*pos_ids, *neg_ids}))
        assert not {i for i, _ in got} & {*pos_ids, *neg_ids}


def test_best_score_widens_when_negatives_demote_the_nearest() -> None:
    """The positive's nearest neighbour as the negative demotes about half of the positive's neighbours (those
    nearer the negative): the first candidates are not enough, the search is repeated wider, and the answer
    is still exact."""
    stored = data(seed=1)
    nearest = int(np.argsort(-(stored @ stored[10]))[1])
    positive, negative = stored[[10]], stored[[nearest]]
    exact = Exact(stored)
    got = recommend(positive, negative, 20, exact.search, exact.vectors, "best_score", exclude={10, nearest})
    scores = best_scores(stored, positive, negative)
    assert ranked_like(got, scores, brute_force(stored, scores, 20, {10, nearest}))
    assert exact.calls > 1 and all(s > -1 for _, s in got)  # all 20 are closer to the positive


def test_candidates_closer_to_a_negative_rank_below_the_rest() -> None:
    stored = data(n=30, seed=3)  # small: every item is gathered, including those nearer the negative
    exact = Exact(stored)
    got = recommend(stored[[0]], stored[[1]], 30, exact.search, exact.vectors, "best_score", exclude={0, 1})
    assert len(got) == 28 and [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    pos, neg = stored[2:] @ stored[0], stored[2:] @ stored[1]
    expected = {i + 2: (p if p > n else -2 - n) for i, (p, n) in enumerate(zip(pos, neg))}
    assert dict(got) == pytest.approx(expected, abs=SLACK)
    assert any(s <= -1 for _, s in got) and any(s > -1 for _, s in got)


def test_filtered_search_and_score_threshold() -> None:
    stored = data(seed=4)
    even = np.arange(0, len(stored), 2)
    exact = Exact(stored, allowed=even)  # a filter applied by the backend's search
    pos, neg = stored[[4, 8]], stored[[6]]
    for strategy in ("best_score", "average_vector"):
        scores = best_scores(stored, pos, neg) if strategy == "best_score" else stored @ average_vector(pos, neg)
        got = recommend(pos, neg, 15, exact.search, exact.vectors, strategy, exclude={4, 6, 8},
                        score_threshold=0.8)
        assert ranked_like(got, scores, brute_force(stored, scores, 15, {4, 6, 8}, even, 0.8))
        assert all(i % 2 == 0 and s >= 0.8 for i, s in got)


def test_average_vector() -> None:
    e = np.eye(3)
    np.testing.assert_allclose(average_vector(e[:1], e[1:2]), np.array([2, -1, 0]) / np.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(average_vector(e[:2]), np.array([1, 1, 0]) / np.sqrt(2), rtol=1e-6)
    stored = data(seed=5)
    exact = Exact(stored)
    got = recommend(stored[[1, 2]], stored[[3]], 10, exact.search, exact.vectors, exclude={1, 2, 3})
    scores = stored @ average_vector(stored[[1, 2]], stored[[3]])
    assert ranked_like(got, scores, brute_force(stored, scores, 10, {1, 2, 3}))
    with pytest.raises(BadInput, match="cancel out"):
        average_vector(np.stack([e[0], -e[0]]))
    with pytest.raises(BadInput, match="cancel out"):
        average_vector(np.stack([e[0], -e[0], e[1]]), np.stack([e[1]] * 5 + [-e[1]]))  # 2 (0, 1/3) = (0, 4/6)


def test_bad_requests_are_refused() -> None:
    stored = data(n=20)
    exact = Exact(stored)
    search: SearchFn = exact.search
    with pytest.raises(BadInput, match="at least one"):
        recommend(np.zeros((0, DIM)), None, 5, search, exact.vectors)
    with pytest.raises(BadInput, match="strategy must be"):
        recommend(stored[:1], None, 5, search, exact.vectors, "sum_scores")
    with pytest.raises(BadInput, match="shape"):
        recommend(stored[:1], np.ones((1, DIM + 1)), 5, search, exact.vectors)
    with pytest.raises(BadInput, match="k must"):
        recommend(stored[:1], None, 0, search, exact.vectors)
    with pytest.raises(BadInput, match="score_threshold"):
        recommend(stored[:1], None, 5, search, exact.vectors, score_threshold=float("nan"))
