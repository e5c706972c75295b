"""Near-duplicates (serving/index/duplicates.py) with real FAISS, against a brute-force float64 reference."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from corinfomax.core.errors import BadInput
from corinfomax.serving.index.duplicates import duplicate_pairs, find_duplicates, fold_duplicates, search_folded
from corinfomax.serving.index.factory import open_index

DIM = 32
THRESHOLD = 0.95
MARGIN = 1e-3  # no similarity this close to the threshold: float32 kernels differ by CPU far less than this


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def turned(a: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly ``cos`` similarity to the unit vector ``a`` (float64)."""
    u = rng.normal(size=a.shape)
    u = unit(u - (u @ a) * a)
    return cos * a + np.sqrt(1 - cos**2) * u


def collection(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """300 random items, among them planted duplicates: pairs, a triple, and a chain a-b-c where a and c are
    apart (cos 0.882) but each is a duplicate of b (0.97); ids large and out of order."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.normal(size=(300, DIM)))
    for i in range(0, 40, 2):
        vectors[i + 1] = turned(vectors[i], 0.99, rng)
    vectors[51], vectors[52] = turned(vectors[50], 0.98, rng), turned(vectors[50], 0.985, rng)
    plane = unit(rng.normal(size=(2, DIM)))
    plane[1] = unit(plane[1] - (plane[1] @ plane[0]) * plane[0])
    angle = np.arccos(0.97)
    vectors[60:63] = [np.cos(t) * plane[0] + np.sin(t) * plane[1] for t in (0.0, angle, 2 * angle)]
    ids = (2**40 + rng.permutation(10_000)[:300]).astype(np.int64)
    return ids, vectors


def reference(ids: np.ndarray, vectors: np.ndarray) -> tuple[set[tuple[int, int]], list[list[int]]]:
    gram = vectors @ vectors.T
    off = gram[~np.eye(len(ids), dtype=bool)]
    assert not np.any(np.abs(off - THRESHOLD) < MARGIN)
    rows, cols = np.nonzero(np.triu(gram >= THRESHOLD, k=1))
    pairs = {(min(int(ids[r]), int(ids[c])), max(int(ids[r]), int(ids[c]))) for r, c in zip(rows, cols)}
    groups: dict[int, set[int]] = {}
    for a, b in sorted(pairs):  # merge sets: small enough to do the obvious way
        merged = groups.get(a, {a}) | groups.get(b, {b})
        for item in merged:
            groups[item] = merged
    unique = {min(group): sorted(group) for group in groups.values()}
    return pairs, [unique[key] for key in sorted(unique)]


def batches(ids: np.ndarray, vectors: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size], vectors[start : start + size].astype(np.float32)


@pytest.mark.parametrize(("batch", "query_batch"), [(300, 256), (7, 3), (64, 1000)])
def test_pairs_and_groups_match_brute_force(batch: int, query_batch: int) -> None:
    ids, vectors = collection()
    expected_pairs, expected_groups = reference(ids, vectors)
    assert len(expected_pairs) == 20 + 3 + 2 and [len(g) for g in expected_groups].count(3) == 2
    found = list(duplicate_pairs(batches(ids, vectors, batch), THRESHOLD, query_batch=query_batch))
    pairs = [tuple(sorted(p)) for chunk in found for p in zip(chunk.first.tolist(), chunk.second.tolist())]
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected_pairs  # each pair once, none missing
    assert all(np.all(chunk.scores >= THRESHOLD) for chunk in found)

    done: list[int] = []
    report = find_duplicates(batches(ids, vectors, batch), THRESHOLD, progress=done.append)
    assert sum(done) == report.items == 300 and report.pairs == len(expected_pairs)
    assert [g.ids for g in report.groups] == expected_groups  # the chain is one group, through its middle
    gram = vectors @ vectors.T
    position = {int(i): p for p, i in enumerate(ids)}
    for group in report.groups:
        for item, score in zip(group.ids, group.scores):
            others = [gram[position[item], position[o]] for o in group.ids if o != item]
            assert score == pytest.approx(max(others), abs=1e-5)


def test_identical_vectors_pair_at_threshold_one_and_nothing_else_does() -> None:
    ids, vectors = collection(1)
    vectors[5] = vectors[4]
    report = find_duplicates(batches(ids, vectors, 100), 0.999)
    assert [g.ids for g in report.groups] == [sorted([int(ids[4]), int(ids[5])])]
    assert find_duplicates(iter([]), 0.9) == find_duplicates(batches(ids[:0], vectors[:0], 10), 0.9)


def test_bad_input_is_refused() -> None:
    ids, vectors = collection()
    for threshold in (0, -0.5, 1.5, True, "0.9"):
        with pytest.raises(BadInput, match="threshold must be"):
            list(duplicate_pairs(batches(ids, vectors, 50), threshold))  # type: ignore[arg-type]  # refusing it
    with pytest.raises(BadInput, match="100 vectors but 99 ids"):
        list(duplicate_pairs([(ids[:99], vectors[:100])], 0.9))
    with pytest.raises(BadInput, match="shape"):
        list(duplicate_pairs([(ids[:2], vectors[:2]), (ids[2:4], vectors[2:4, :5])], 0.9))


def test_fold_duplicates_keeps_order_and_folds_into_the_first() -> None:
    rng = np.random.default_rng(3)
    a, b = unit(rng.normal(size=(2, DIM)))
    near_a, near_b = turned(a, 0.99, rng), turned(b, 0.99, rng)
    between = unit(a + b)  # similar to both, duplicate of neither (cos ~0.7)
    hits = ["a", "b", "near_a", "between", "near_b", "a_again"]
    folded = fold_duplicates(hits, np.stack([a, b, near_a, between, near_b, a]), THRESHOLD)
    assert folded == [("a", ["near_a", "a_again"]), ("b", ["near_b"]), ("between", [])]
    assert fold_duplicates([], np.zeros((0, DIM)), THRESHOLD) == []


@pytest.mark.parametrize("backend", ["index", "index.db"], ids=["folder", "milvus-lite"])
def test_search_folded_widens_until_k_are_kept(backend: str, tmp_path: Path) -> None:
    """30 near-copies of the query's nearest item fold into it: the first 2k results hold one kept hit, so the
    search widens (6, 24, 96 results) until k distinct ones are kept, on either backend."""
    rng = np.random.default_rng(1)
    query = unit(rng.normal(size=DIM))
    near = [turned(query, 0.9, rng)]
    near += [turned(near[0], 0.995, rng) for _ in range(29)]  # > 0.95 to the first, below it to the query
    others = [turned(query, cos, rng) for cos in (0.6, 0.5, 0.4, 0.3)]
    with open_index(str(tmp_path / backend), dim=DIM) as store:
        assert search_folded(store, query[None], 3, THRESHOLD) == [[]]  # an empty collection
        ids = store.add(np.asarray(near + others, np.float32))
        (row,) = search_folded(store, query[None], 3, THRESHOLD)
    assert [hit.id for hit, _ in row[1:]] == ids[30:32] and row[1][1] == row[2][1] == []
    assert sorted([row[0][0].id] + [hit.id for hit in row[0][1]]) == ids[:30]  # the best of them kept
    with pytest.raises(BadInput, match="threshold"):
        search_folded(store, query[None], 3, 1.5)


def test_a_milvus_failure_while_scanning_is_a_clean_error(tmp_path: Path) -> None:
    """`index duplicates` reads a Milvus collection through a generator: its failure must still be the
    IndexUnavailable the CLI prints in one line, not a pymilvus traceback."""
    from corinfomax.serving.index.backend import IndexUnavailable
    from corinfomax.serving.index.milvus import MilvusStore

    with MilvusStore(str(tmp_path / "index.db"), dim=DIM) as store:
        store.add(unit(np.random.default_rng(0).normal(size=(4, DIM))))
        store._client.drop_collection(store.collection)  # gone under the reader, as a server outage would
        with pytest.raises(IndexUnavailable, match="does not exist"):
            list(store.scan())
