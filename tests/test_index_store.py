"""The index backends on real engines: IndexStore (SQLite + FAISS, the format of docs/FORMATS.md section 5) and
MilvusStore on Milvus Lite. Tests taking the parametrised ``store`` (or ``backend``) run against both."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np
import pytest
from PIL import Image

from corinfomax.core.errors import BadInput, ImageError, ImageTooLarge, NotFound
from corinfomax.core.thumbnails import MAX_BYTES, make_thumbnail
from corinfomax.serving.index import kinds, store_faiss
from corinfomax.serving.index.backend import IndexMismatch, VectorIndex
from corinfomax.serving.index.factory import open_index
from corinfomax.serving.index.filters import parse_filter
from corinfomax.serving.index.kinds import choose_kind
from corinfomax.serving.index.milvus import MilvusStore
from corinfomax.serving.index.store import IndexStore
from corinfomax.serving.index.store_faiss import FAISS_FILE, FAISS_META, FaissCache
from corinfomax.serving.index.store_sqlite import DB_FILE

DIM = 16


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


BACKENDS = {"folder": "index", "milvus-lite": "index.db"}  # CORINFOMAX_INDEX of each backend, under tmp_path


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture()
def store(tmp_path: Path, backend: str) -> Iterator[VectorIndex]:
    with open_index(tmp_path / BACKENDS[backend], dim=DIM, model_sha256="m1") as opened:
        yield opened


def test_add_get_search_finds_itself_first(store: VectorIndex) -> None:
    vectors = unit(50)
    ids = store.add(vectors * 3.0, [{"n": i} for i in range(50)], ["odd" if i % 2 else None for i in range(50)])
    assert ids == sorted(set(ids)) and len(ids) == 50 and 0 < ids[0] and ids[-1] < 2**63
    item = store.get(ids[7])
    assert item.metadata == {"n": 7} and item.label == "odd"
    np.testing.assert_allclose(np.linalg.norm(item.vector), 1.0, rtol=1e-5)  # stored normalised
    hits = store.search(vectors[:5], k=3)
    assert [h[0].id for h in hits] == ids[:5]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5) and hits[0][0].score >= hits[0][1].score
    assert len(store.search(vectors[:1], k=1000)[0]) == 50  # k larger than the index: everything
    assert store.stats()["count"] == 50 and store.stats()["labelled"] == 25


def test_delete_and_ids_never_reused(store: VectorIndex) -> None:
    vectors = unit(10)
    ids = store.add(vectors)
    with pytest.raises(NotFound, match="999999"):
        store.delete([ids[0], 999999])
    assert store.count() == 10  # all-or-nothing
    assert store.delete([ids[0], ids[1]]) == ids[:2]
    with pytest.raises(NotFound):
        store.get(ids[0])
    assert all(h.id not in ids[:2] for h in store.search(vectors[0], k=10)[0])
    assert store.add(unit(1, seed=5))[0] > max(ids)


BAD_VECTORS = [
    (np.ones((2, DIM + 1)), "shape"),
    (np.full((1, DIM), np.nan), "NaN"),
    (np.zeros((0, DIM)), "empty"),
    (np.zeros((1, DIM)), "zero"),
    ([["a"] * DIM], "numbers"),
]


def test_bad_vectors_are_refused(store: VectorIndex) -> None:
    for vectors, message in BAD_VECTORS:  # one store per backend: a Milvus collection takes a second to make
        with pytest.raises(BadInput, match=message):
            store.add(vectors)
        with pytest.raises(BadInput, match=message):
            store.search(vectors, k=1)
    assert store.count() == 0


def test_bad_parameters_are_refused(store: VectorIndex) -> None:
    store.add(unit(3))
    for k in (0, -1, 10**6, 2.5, True):
        with pytest.raises(BadInput, match="k must"):
            store.search(unit(1), k=k)  # type: ignore[arg-type]  # a float k is one of the refusals tested
    with pytest.raises(BadInput, match="metadata"):
        store.add(unit(1), metadata=["not a dict"])  # type: ignore[list-item]  # refusing it is the point
    with pytest.raises(BadInput, match="metadata"):
        store.add(unit(1), metadata=[{"x": float("nan")}])
    with pytest.raises(BadInput, match="labels"):
        store.add(unit(1), labels=[3])  # type: ignore[list-item]  # refusing it is the point
    with pytest.raises(BadInput, match="2 vectors"):
        store.add(unit(2), metadata=[{}])
    with pytest.raises(BadInput, match="ids"):
        store.delete([])
    with pytest.raises(BadInput, match="integers"):
        store.delete(["1"])  # type: ignore[list-item]  # refusing it is the point
    assert store.count() == 3


def test_refuses_other_dim_or_model(tmp_path: Path, backend: str) -> None:
    location = tmp_path / BACKENDS[backend]
    open_index(location, dim=DIM, model_sha256="m1").close()
    with pytest.raises(IndexMismatch, match="16-dim"):
        open_index(location, dim=32)
    with pytest.raises(IndexMismatch, match="built with model m1, not m2; its vectors are not comparable"):
        open_index(location, dim=DIM, model_sha256="m2")
    with pytest.raises(BadInput, match="give the embedding dim"):
        open_index(tmp_path / "missing" / BACKENDS[backend])


def test_cache_rebuilt_when_missing_corrupt_or_stale(tmp_path: Path) -> None:
    folder = tmp_path / "ix"
    vectors = unit(40)
    with IndexStore(folder, dim=DIM) as store:
        ids = store.add(vectors, labels=["a"] * 40)
    meta = json.loads((folder / FAISS_META).read_text())
    assert meta["generation"] == 1 and meta["count"] == 40 and meta["kind"] == "Flat"

    def reopened_finds_all() -> None:
        with IndexStore(folder, dim=DIM) as again:
            assert [h[0].id for h in again.search(vectors, k=1)] == ids
            assert again.stats()["faiss_ntotal"] == 40

    (folder / FAISS_FILE).unlink()
    reopened_finds_all()
    (folder / FAISS_FILE).write_bytes(b"garbage" * 100)
    reopened_finds_all()
    # Same size, other bytes inside the vectors: FAISS would load it; the checksum in faiss.json refuses it.
    data = bytearray((folder / FAISS_FILE).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x7f" * 64
    (folder / FAISS_FILE).write_bytes(bytes(data))
    reopened_finds_all()
    # A crash after the SQLite commit but before the cache was saved: the cache is one generation behind.
    crashed = IndexStore(folder, dim=DIM)
    extra = crashed.add(unit(1, seed=9))  # never closed, cache not saved
    with IndexStore(folder, dim=DIM) as again:
        assert again.search(unit(1, seed=9), k=1)[0][0].id == extra[0]
    crashed._db.close()


def test_writes_visible_to_another_handle_and_after_reopening(tmp_path: Path, backend: str) -> None:
    writer = open_index(tmp_path / BACKENDS[backend], dim=DIM)
    reader = open_index(tmp_path / BACKENDS[backend], dim=DIM)
    assert reader.search(unit(1), k=1) == [[]]
    ids = writer.add(unit(5))
    assert reader.search(unit(5), k=1)[0][0].id == ids[0]
    writer.delete([ids[0]])
    assert reader.search(unit(5)[:1], k=1)[0][0].id != ids[0]
    writer.close()
    reader.close()
    with open_index(tmp_path / BACKENDS[backend]) as again:  # Milvus: a reopened collection must be loaded first
        assert again.count() == 4 and again.search(unit(5)[1:2], k=1)[0][0].id == ids[1]


def test_sqlite_is_the_format_of_the_contract(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index", dim=DIM, model_sha256="m1")
    store.add(unit(2), [{"path": "a.jpg"}, {}], ["cat", None])
    db = sqlite3.connect(store.folder / DB_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = db.execute("SELECT id, length(vector), metadata, label FROM items ORDER BY id").fetchall()
    assert rows == [(1, DIM * 4, '{"path": "a.jpg"}', "cat"), (2, DIM * 4, "{}", None)]
    info = dict(db.execute("SELECT key, value FROM info"))
    assert info == {"embedding_dim": str(DIM), "model_sha256": "m1", "generation": "1"}
    db.close()
    store.close()


def test_labelled_and_labelled_only_search(store: VectorIndex) -> None:
    vectors = unit(30)
    labels = [None if i < 10 else ("x" if i % 2 else "y") for i in range(30)]
    ids = store.add(vectors, labels=labels)
    labelled = store.labelled()
    assert labelled.vectors.shape == (20, DIM) and labelled.classes == ["x", "y"]
    assert labelled.ids.tolist() == ids[10:] and labelled.labels == labels[10:]
    np.testing.assert_allclose(labelled.vectors.astype(np.float64), vectors[10:], atol=1e-6)
    hits = store.search(vectors[:10], k=5, labelled_only=True)
    assert all(h.label is not None for row in hits for h in row) and all(len(row) == 5 for row in hits)


def test_choose_kind_by_size_and_memory() -> None:
    assert choose_kind(1000, 256, 1 << 30) == "Flat"
    assert choose_kind(500_000, 256, 8 << 30) == "HNSW32"
    assert choose_kind(5_000_000, 256, 8 << 30).endswith(",Flat")
    assert choose_kind(5_000_000, 256, 1 << 30).startswith("IVF") and ",PQ" in choose_kind(5_000_000, 256, 1 << 30)
    with pytest.raises(BadInput, match="memory budget"):
        choose_kind(10**9, 256, 1 << 20)


def test_candidates_fall_back_from_hnsw_to_ivf_then_exact() -> None:
    assert kinds.candidates(1000, 256, 1 << 30) == ["Flat"]
    assert kinds.candidates(1_000_000, 256, 8 << 30) == ["HNSW32", "IVF4096,Flat", "Flat"]
    assert kinds.candidates(5_000_000, 256, 8 << 30) == [choose_kind(5_000_000, 256, 8 << 30), "Flat"]
    compressed = kinds.candidates(5_000_000, 256, 1 << 30)
    assert len(compressed) == 1 and ",PQ" in compressed[0]  # the raw vectors do not fit: nothing to fall to


@pytest.mark.parametrize("kind", ["IVF16,Flat", "HNSW32"])
def test_rebuild_approximate_kinds(tmp_path: Path, kind: str) -> None:
    vectors = unit(3000, dim=32)
    with IndexStore(tmp_path / "ix", dim=32) as store:
        added = store.add_many((vectors[i : i + 1000], None, None) for i in range(0, 3000, 1000))
        assert added == 3000 and store.stats()["kind"] == "Flat"
        figures = store.rebuild(kind=kind)
        assert figures["kind"] == kind and figures["count"] == 3000 and figures["recall_at_10"] >= 0.9
        assert [h[0].id for h in store.search(vectors[:20], k=1)] == list(range(1, 21))
        first = parse_filter({"id": {"lte": 50}})  # few pass: scored exactly, their vectors read back from FAISS
        assert [h[0].id for h in store.search(vectors[:20], k=1, where=first)] == list(range(1, 21))
        store.delete([1, 1500])
        assert store.search(vectors[0], k=3)[0][0].id != 1
        assert store.stats()["pending_deletes"] == (0 if kind.startswith("IVF") else 2)  # HNSW only hides them
        kept = [i for i in range(1, 3001, 7) if i not in (1, 1500)]  # each item after a deleted one too
        assert [h[0].id for h in store.search(vectors[[i - 1 for i in kept]], k=1)] == kept
        ids = store.add(unit(1, seed=7, dim=32))
        assert store.search(unit(1, seed=7, dim=32), k=1)[0][0].id == ids[0]
    with IndexStore(tmp_path / "ix", dim=32) as again:  # the index survives a reopen, HNSW's deleted ids too
        assert again.stats()["kind"] == kind and again.stats()["count"] == 2999
        assert again.stats()["pending_deletes"] == (0 if kind.startswith("IVF") else 2)
        assert [h[0].id for h in again.search(vectors[[i - 1 for i in kept]], k=1)] == kept
    with pytest.raises(BadInput, match="needs at least"):
        IndexStore(tmp_path / "small", dim=32).rebuild(kind="IVF64,Flat")


def test_an_ivf_cache_saved_inside_an_id_map_is_refilled(tmp_path: Path) -> None:
    """Earlier versions kept an IVF index inside an IndexIDMap2, whose ids shifted after a delete, and saved it
    so: such a file is refilled from SQLite when opened."""
    vectors = unit(3000, dim=32)
    with IndexStore(tmp_path / "ix", dim=32) as store:
        store.add(vectors)
        store.rebuild(kind="IVF16,Flat")
        store.delete([1, 1500])
    trained = faiss.index_factory(32, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(vectors)
    old = faiss.IndexIDMap2(trained)
    old.add_with_ids(vectors, np.arange(1, 3001))
    old.remove_ids(faiss.IDSelectorBatch(np.array([1, 1500])))  # as the old layout did: later ids off by one
    data = faiss.serialize_index(old).tobytes()
    (tmp_path / "ix" / FAISS_FILE).write_bytes(data)
    meta = json.loads((tmp_path / "ix" / FAISS_META).read_text())
    (tmp_path / "ix" / FAISS_META).write_text(json.dumps({**meta, "sha256": hashlib.sha256(data).hexdigest()}))
    with IndexStore(tmp_path / "ix", dim=32) as again:
        assert [h[0].id for h in again.search(vectors[1500:1510], k=1)] == list(range(1501, 1511))
        assert again.stats()["kind"] == "IVF16,Flat"


def test_chosen_kind_that_misses_the_recall_target_falls_back_to_exact(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kinds, "FLAT_MAX", 10)  # so the chooser picks HNSW32 for a small index
    monkeypatch.setattr(kinds, "RECALL_TARGET", 1.01)  # unreachable: HNSW32, then IVF4,Flat, then exact Flat
    with IndexStore(tmp_path / "ix", dim=DIM) as ix:
        ix.add_many([(unit(300), None, None)], rebuild=False)
        figures = ix.rebuild()
        assert figures["kind"] == "Flat" and figures["recall_at_10"] == 1.0
        assert ix.rebuild("HNSW32")["kind"] == "HNSW32"  # an explicit kind is kept as asked


def test_items_deleted_from_hnsw_are_skipped_inside_the_search(tmp_path: Path) -> None:
    """HNSW cannot remove: its deleted ids are skipped by the search itself, so k hits still come back, and
    after a rebuild (no deletes pending) the next delete of as many ids hides those ids, not the earlier ones."""
    vectors = unit(3000, dim=32)
    with IndexStore(tmp_path / "ix", dim=32) as store:
        store.add(vectors)
        store.rebuild(kind="HNSW32")
        store.delete([5])
        (hits,) = store.search(vectors[4], k=10)  # item 5's own vector
        assert len(hits) == 10 and 5 not in [hit.id for hit in hits]
        store.rebuild(kind="HNSW32")
        store.delete([6])
        assert store.stats()["pending_deletes"] == 1
        found = store.search(vectors[[4, 5, 6]], k=10)
        assert [len(row) for row in found] == [10] * 3 and 6 not in {hit.id for row in found for hit in row}
        assert found[2][0].id == 7


def hold_builds(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """From now on a FAISS build waits until the returned event is set (so a test writes beside it)."""
    release, build = threading.Event(), FaissCache._build_best

    def held(self: FaissCache, *args: Any) -> Any:
        assert release.wait(60), "the test never let the build go on"
        return build(self, *args)

    monkeypatch.setattr(FaissCache, "_build_best", held)
    return release


def test_an_exact_index_that_outgrows_flat_is_rebuilt_beside_the_writes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Grown by writes past FLAT_MAX, the exact index is rebuilt in the background; the adds and deletes made
    while the build ran are in the index that replaces it, which the store saves when it closes."""
    monkeypatch.setattr(kinds, "FLAT_MAX", 500)
    vectors = unit(1200, dim=32)
    with IndexStore(tmp_path / "ix", dim=32) as store:
        store.add(vectors[:500])
        release = hold_builds(monkeypatch)
        store.add(vectors[500:501])  # 501 > FLAT_MAX: the build starts, and waits
        for start in range(501, 1200, 7):  # 100 writes: more than are replayed under the lock, so rounds run
            store.add(vectors[start : min(start + 7, 1200)])
        store.delete([1, 600])
        assert store.stats()["kind"] == "Flat" and store.search(vectors[700], k=1)[0][0].id == 701  # answered
        release.set()
        store.wait_for_build(60)
        stats = store.stats()
        assert stats["kind"] == "HNSW32" and stats["count"] == stats["faiss_ntotal"] - stats["pending_deletes"]
        kept = [i for i in range(1, 1201) if i not in (1, 600)]
        assert [hits[0].id for hits in store.search(vectors[[i - 1 for i in kept]], k=1)] == kept
    with IndexStore(tmp_path / "ix", dim=32) as again:  # saved at close, deleted ids and all
        assert again.stats()["kind"] == "HNSW32" and again.stats()["count"] == 1198
        assert again.stats()["pending_deletes"] == 2 and not again.building()
        assert [hits[0].id for hits in again.search(vectors[[i - 1 for i in kept]], k=1)] == kept


def test_an_exact_index_opened_past_flat_max_is_rebuilt_in_the_background(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kinds, "FLAT_MAX", 500)
    vectors = unit(800, dim=32)
    with IndexStore(tmp_path / "ix", dim=32) as store:  # written by a version without background builds, say
        store.add_many([(vectors, None, None)], rebuild=False)
    with IndexStore(tmp_path / "ix", dim=32) as again:
        again.wait_for_build(60)
        assert again.stats()["kind"] == "HNSW32"
        assert [hits[0].id for hits in again.search(vectors, k=1)] == list(range(1, 801))


def test_an_hnsw_graph_a_fifth_deleted_is_rebuilt_without_them(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_faiss, "VACUUM_MIN", 100)
    vectors = unit(2000, dim=32)
    with IndexStore(tmp_path / "ix", dim=32) as store:
        store.add(vectors)
        store.rebuild(kind="HNSW32")
        store.delete(list(range(1, 400)))  # 399 of 2,000: not yet a fifth
        assert store.stats()["pending_deletes"] == 399 and not store.building()
        store.delete([400, 401])  # now past it: rebuilt in the background, still as the kind asked for
        store.delete([402])  # while it builds, or after: hidden either way
        store.wait_for_build(60)
        stats = store.stats()
        assert stats["kind"] == "HNSW32" and stats["faiss_ntotal"] - stats["pending_deletes"] == 1598
        assert stats["faiss_ntotal"] <= 1599  # the deleted items left the graph
        kept = list(range(403, 2001))
        assert [hits[0].id for hits in store.search(vectors[[i - 1 for i in kept]], k=1)] == kept


def test_a_background_build_is_dropped_when_another_process_wrote(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A write from another handle (another process) while the build runs: the build cannot be brought up to
    date, so it is dropped, and the next write past the threshold builds again from what is stored."""
    monkeypatch.setattr(kinds, "FLAT_MAX", 500)
    vectors = unit(600, dim=32)
    with IndexStore(tmp_path / "ix", dim=32) as store:
        store.add(vectors[:500])
        release = hold_builds(monkeypatch)
        store.add(vectors[500:501])
        with IndexStore(tmp_path / "ix", dim=32) as other:  # its own open starts (and its close drops) a build
            other.add(vectors[501:502])
        assert store.search(vectors[501], k=1)[0][0].id == 502  # reloaded from SQLite: the build is stale now
        release.set()
        store.wait_for_build(60)
        assert store.stats()["kind"] == "Flat"
        store.add(vectors[502:600])
        store.wait_for_build(60)
        assert store.stats()["kind"] == "HNSW32"
        assert [hits[0].id for hits in store.search(vectors, k=1)] == list(range(1, 601))


def test_an_exact_index_asked_for_stays_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kinds, "FLAT_MAX", 100)
    with IndexStore(tmp_path / "ix", dim=DIM) as ix:
        ix.add_many([(unit(300), None, None)], rebuild=False)
        ix.rebuild("Flat")
        ix.add(unit(400, seed=1))  # past FLAT_MAX and twice the size it was built at
        ix.wait_for_build(60)
        assert ix.stats()["kind"] == "Flat"


def test_thumbnails_stored_with_their_items(store: VectorIndex, cifar10: Path) -> None:
    """Real CIFAR-10 JPEGs -> WebP thumbnails committed with the items; vectors-only adds have none."""
    sources = sorted((cifar10 / "test" / "cat").glob("*.jpg"))[:2]
    thumbs = [make_thumbnail(path.read_bytes()) for path in sources]
    assert all(0 < len(t) < 8 << 10 for t in thumbs)  # "a few KB"
    assert Image.open(io.BytesIO(thumbs[0])).size == Image.open(sources[0]).size  # 32 px: never enlarged
    ids = store.add(unit(3), thumbnails=[*thumbs, None])
    assert store.thumbnail(ids[0]) == thumbs[0] and store.stats()["thumbnails"] == 2
    with pytest.raises(NotFound, match="no thumbnail"):
        store.thumbnail(ids[2])
    with pytest.raises(NotFound, match="no item"):
        store.thumbnail(999999)
    store.delete([ids[0]])
    assert store.stats()["thumbnails"] == 1
    with pytest.raises(BadInput, match="thumbnails"):
        store.add(unit(1), thumbnails=[b"x" * (MAX_BYTES + 1)])
    with pytest.raises(BadInput, match="2 thumbnails"):
        store.add(unit(1), thumbnails=thumbs)
    assert store.count() == 2  # refused adds leave nothing behind
    with pytest.raises(ImageError):
        make_thumbnail(b"not an image")


def test_thumbnail_shrinks_large_images_to_the_side() -> None:
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((640, 320)).convert("RGB").save(buffer, "PNG")
    thumb = Image.open(io.BytesIO(make_thumbnail(buffer.getvalue(), side=128)))
    assert thumb.format == "WEBP" and thumb.size == (128, 64)
    with pytest.raises(ImageTooLarge):
        make_thumbnail(buffer.getvalue(), max_pixels=1000)


def test_a_retried_write_with_its_idempotency_key_lands_once(store: VectorIndex) -> None:
    first = store.add(unit(2), key="add-1")
    assert store.add(unit(2, seed=5), key="add-1") == first  # the retry: nothing new stored
    assert store.count() == 2
    assert store.delete(first[:1], key="del-1") == first[:1]
    assert store.delete(first[:1], key="del-1") == first[:1]  # not a NotFound: the same delete, answered again
    assert store.count() == 1
    with pytest.raises(BadInput, match="idempotency_key"):
        store.add(unit(1), key="x" * 1000)


def test_write_limits_name_themselves(store: VectorIndex) -> None:
    with pytest.raises(BadInput, match="limit is 16384"):
        store.add(unit(1), [{"blob": "x" * 20_000}])
    deep: dict = {}
    node = deep
    for _ in range(5000):  # deeper than Python's recursion limit: checked without recursion
        node["a"] = {}
        node = node["a"]
    with pytest.raises(BadInput, match="nested deeper than 32"):
        store.add(unit(1), [deep])
    with pytest.raises(BadInput, match="2\\*\\*63"):
        store.get(2**63)
    with pytest.raises(BadInput, match="2\\*\\*63"):
        store.delete([-1])
    assert store.count() == 0


def test_items_lists_everything_for_a_migration(store: VectorIndex) -> None:
    ids = store.add(unit(5), [{"n": i} for i in range(5)], ["a", None, "b", None, None],
                    [b"t0", None, None, None, b"t4"])
    store.delete([ids[1]])
    batches = list(store.items(batch=2))
    assert [len(b) for b in batches] == [2, 2]
    listed = [pair for batch in batches for pair in batch]
    assert [item.id for item, _ in listed] == [ids[0], *ids[2:]]
    assert [(item.metadata, item.label, thumb) for item, thumb in listed] == [
        ({"n": 0}, "a", b"t0"), ({"n": 2}, "b", None), ({"n": 3}, None, None), ({"n": 4}, None, b"t4")]
    np.testing.assert_allclose(listed[0][0].vector.astype(np.float64), unit(5)[0], atol=1e-6)


def test_milvus_completes_a_write_that_half_happened(tmp_path: Path) -> None:
    """No transactions in Milvus: a keyed write found in part is finished by its retry, never doubled."""
    with MilvusStore(str(tmp_path / "index.db"), dim=DIM) as store:
        first = store.add(unit(3), key="add-1")
        store._client.delete(store.collection, ids=first[1:])  # as if only one shard's rows had landed
        again = store.add(unit(3), key="add-1")
        assert store.count() == 3 and len(set(again)) == 3 and store.add(unit(1), key="add-1") == again
        # A keyed delete that recorded its ids and crashed before deleting: the retry deletes and answers.
        store._client.insert(store.writes, [{"key": "del-1", "result": again[:2], "unused": [0.0, 0.0]}])
        assert store.delete(again[:2], key="del-1") == again[:2] and store.count() == 1
