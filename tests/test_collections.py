"""Collections, generations, originals and re-embed jobs on both index backends (an index folder and Milvus Lite),
without a server: the catalog and the originals store on their own, then a collection's life through the library
(serving/index/collections.py, switch.py, reembed.py) with two stand-in models over real CIFAR-10 JPEGs."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Iterator

import pytest
from collectionkit import MODELS, add_images, encoders, ids_of, opened, record
from PIL import Image

from corinfomax.core.errors import BadInput, NotFound
from corinfomax.serving.index.catalog import CollectionDoc, Conflict, FolderCatalog, GenerationDoc, JobDoc
from corinfomax.serving.index.collections import Collections
from corinfomax.serving.index.factory import open_index, open_layout
from corinfomax.serving.index.originals import Budget, Originals, OriginalsFull, read_source
from corinfomax.serving.index.reembed import Jobs

BACKENDS = {"folder": "index", "milvus-lite": "index.db"}


@pytest.fixture(params=sorted(BACKENDS))
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / BACKENDS[request.param])


@pytest.fixture()
def jpegs(cifar10: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((cifar10 / "test" / "cat").glob("*.jpg"))[:40]]


def test_catalog_keeps_documents_in_one_change(tmp_path: Path) -> None:
    catalog = FolderCatalog(tmp_path / "catalog.sqlite")
    doc = CollectionDoc("pets", True, 1, {1: GenerationDoc("a@1", 16, "x")}, pending=2)
    catalog.put({"collection/pets": doc.to_json(), "job/j1": dataclasses.asdict(JobDoc("j1", "pets", "b@1", 2))})
    assert CollectionDoc.from_json(catalog.get("collection/pets") or {}) == doc
    assert list(catalog.scan("job/")) == ["job/j1"] and catalog.get("collection/none") is None
    with pytest.raises(TypeError):
        catalog.put({"collection/x": {"a": 1}, "job/bad": {"s": object()}})
    assert catalog.get("collection/x") is None  # the change failed as a whole
    catalog.put({"job/j1": None})
    assert catalog.scan("job/") == {}
    catalog.close()


def test_originals_are_stored_once_capped_and_freed(tmp_path: Path, jpegs: list[bytes]) -> None:
    budget = Budget(sum(map(len, jpegs[:3])))
    store = Originals(tmp_path / "originals", budget)
    first = store.put(jpegs[0])
    assert store.put(jpegs[0]) == first and first.startswith("sha256:")  # identical bytes stored once
    assert store.stats() == {"originals_bytes": len(jpegs[0]), "originals_count": 1}
    assert store.new_bytes([jpegs[0], jpegs[1], jpegs[1]]) == len(jpegs[1])
    store.put(jpegs[1])
    with pytest.raises(OriginalsFull, match="cap of .*CORINFOMAX_ORIGINALS_MAX_BYTES") as full:
        budget.check(store.new_bytes(jpegs[2:4]))
    assert full.value.status == 409
    assert read_source(first, store) == jpegs[0]
    again = Originals(tmp_path / "originals", Budget())  # counted again from the files when reopened
    assert again.stats() == store.stats() and sorted(again.sources()) == sorted(store.sources())
    store.discard(first)
    with pytest.raises(NotFound, match="gone"):
        read_source(first, store)
    assert store.stats()["originals_count"] == 1 and budget.used == len(jpegs[1])
    with pytest.raises(NotFound):
        read_source(f"file:{tmp_path / 'nope.jpg'}", None)


def top_hit(collections: Collections, name: str | None, key: str, image: bytes) -> int:
    with collections.reading(name, model=key) as store:
        return store.search(MODELS[key].embed([image]), k=1)[0][0].id


def test_a_collection_follows_its_model(location: str, jpegs: list[bytes]) -> None:
    """Re-embed while writing, refuse what cannot be embedded, switch, roll back, drop a generation: every
    acknowledged item present once, its own top hit under the live model, no id handed out twice."""
    collections, jobs = opened(location)
    first = add_images(collections, jpegs[:20])
    vector = collections.add(None, MODELS["a@1"].embed(jpegs[20:21]), model="a@1")  # no source
    assert collections.stats(None)["originals_count"] == 20
    failed = jobs.start(None, record("b@1"), background=False)
    assert failed.state == "failed" and str(vector[0]) in (failed.error or "")
    assert collections.route(None)["model"] == "a@1" and collections.doc(None).pending is None
    collections.delete(None, vector)

    added: list[int] = []

    def write_meanwhile(job: JobDoc) -> None:  # runs between the job's batches, outside its lock
        if job.state == "running" and not added:
            added.extend(add_images(collections, jpegs[21:24]))
            collections.delete(None, [first[0]])

    done = jobs.start(None, record("b@1"), background=False, progress=write_meanwhile)
    assert done.state == "done" and done.missing == [] and done.total == 20 and len(added) == 3
    expected = sorted(set(first[1:]) | set(added))
    assert ids_of(collections) == expected and collections.route(None)["model"] == "b@1"
    with pytest.raises(Conflict, match="now uses model b@1"):
        collections.reading(None, model="a@1").__enter__()
    images = dict(zip(first + added, jpegs[:20] + jpegs[21:24]))
    assert all(top_hit(collections, None, "b@1", images[i]) == i for i in expected[::4])
    with open_index(location) as store:  # what `probe fit --index` and `index migrate --from` read
        assert store.id_list().tolist() == expected and store.dim == MODELS["b@1"].dim
    later = add_images(collections, jpegs[24:26], key="b@1")
    assert min(later) > max(first + vector + added)  # ids keep counting above every id handed out

    with pytest.raises(Conflict, match="previous generation"):
        jobs.start(None, record("a@1"), background=False)
    rolled = collections_rollback(collections)
    assert rolled["model"] == "a" and ids_of(collections) == expected + later  # the previous took every write
    assert top_hit(collections, None, "a@1", jpegs[24]) == later[0]
    collections_drop_generation(collections)
    assert collections.doc(None).previous is None
    collections.delete(None, later)
    assert collections.stats(None)["originals_count"] == len(expected)  # freed with their last item
    collections.close()


def test_a_reembed_gives_items_without_a_thumbnail_one(location: str, jpegs: list[bytes]) -> None:
    collections = Collections(open_layout(location), encoders, Budget(1 << 30), thumbnail_side=16)
    collections.open(record("a@1"), keep_originals=True)
    bare = add_images(collections, jpegs[:3])  # as an index built before `index build` made thumbnails
    own = collections.add(None, MODELS["a@1"].embed(jpegs[3:4]), thumbnails=[b"own"], images=jpegs[3:4], model="a@1")
    assert Jobs(collections).start(None, record("b@1"), background=False).state == "done"
    with collections.reading(None) as store:
        for item in bare:
            with Image.open(io.BytesIO(store.thumbnail(item))) as thumbnail:
                assert thumbnail.format == "WEBP" and thumbnail.size == (16, 16)
        assert store.thumbnail(own[0]) == b"own"  # one it had is kept
    collections.close()


def collections_rollback(collections: Collections) -> dict[str, Any]:
    from corinfomax.serving.index import switch

    return switch.rollback(collections, None, allow_missing=False)


def collections_drop_generation(collections: Collections) -> dict[str, Any]:
    from corinfomax.serving.index import switch

    return switch.drop_generation(collections, None)


def test_named_collections_and_their_limits(location: str, jpegs: list[bytes]) -> None:
    collections, _ = opened(location, budget=sum(map(len, jpegs[:3])))
    assert collections.create("pets-2", record("b@1"), keep_originals=False)["dim"] == 24
    with pytest.raises(Conflict, match="exists"):
        collections.create("pets-2", record("b@1"), keep_originals=False)
    for bad in ("Pets", "", "a" * 65, "a/b", 7):
        with pytest.raises(BadInput, match="collection must be"):
            collections.create(bad, record("b@1"), keep_originals=False)
    ids = add_images(collections, jpegs[:5], "pets-2", "b@1")  # keeps no originals: no cap
    assert ids_of(collections, "pets-2") == ids and "originals_bytes" not in collections.stats("pets-2")
    with pytest.raises(NotFound, match="no collection 'cats' \\(collections: default, pets-2\\)"):
        collections.stats("cats")
    with pytest.raises(OriginalsFull):
        add_images(collections, jpegs[:5])
    with pytest.raises(BadInput, match="labels\\[0\\]"):
        collections.add(None, MODELS["a@1"].embed(jpegs[:1]), labels=[""], images=jpegs[:1], model="a@1")
    assert ids_of(collections) == [] and collections.stats(None)["originals_count"] == 0  # refused before writing
    with pytest.raises(BadInput, match="cannot be dropped"):
        collections.drop("default")
    collections.drop("pets-2")
    assert [c["name"] for c in collections.describe()] == ["default"]
    collections.close()


def test_a_job_killed_midway_resumes_and_the_live_generation_is_untouched(location: str,
                                                                          jpegs: list[bytes]) -> None:
    collections, jobs = opened(location)
    first = add_images(collections, jpegs[:30])
    job = jobs.start(None, record("b@1"), background=False, progress=crash_after_one_batch)
    assert job.state == "running"  # as a kill -9 leaves it: its generation half built
    collections.close()  # what the process held; its catalog says "running"

    again, jobs = opened(location)
    assert again.route(None)["model"] == "a@1" and ids_of(again) == first
    (resumed,) = jobs.resume(background=False)
    assert resumed.state == "done" and again.route(None)["model"] == "b@1" and ids_of(again) == first
    again.close()


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs (not even the job's failure handling)."""


def crash_after_one_batch(job: JobDoc) -> None:
    if job.done >= 10:
        raise Crash


@pytest.fixture(autouse=True)
def _crash_is_caught(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A Crash inside a job ends the job's run as a kill would: its state stays as last recorded."""
    original = Jobs.run

    def run(self: Jobs, job: JobDoc, progress: Any = None) -> JobDoc:
        try:
            return original(self, job, progress)
        except Crash:
            self._running.clear()
            return dataclasses.replace(job, state="running")

    monkeypatch.setattr(Jobs, "run", run)
    yield


def test_updates_and_field_indexes_reach_every_generation(location: str, jpegs: list[bytes]) -> None:
    from corinfomax.serving.index.filters import metadata_field

    collections, jobs = opened(location)
    ids = add_images(collections, jpegs[:6])
    collections.index_field(None, metadata_field("metadata.n"))
    assert jobs.start(None, record("b@1"), background=False).state == "done"
    fields = [] if location.endswith(".db") else ["metadata.n"]  # Milvus Lite indexes no JSON paths
    assert collections.stats(None)["indexed_fields"] == fields  # the new generation got the index too
    collections.update(None, ids[0], {"n": 99}, "cat", set_label=True)
    collections_rollback(collections)  # the previous generation took the update as well
    with collections.reading(None) as store:
        item = store.get(ids[0])
    assert (item.label, item.metadata) == ("cat", {"n": 99})
    with pytest.raises(NotFound):
        collections.update(None, 10**9, None, "x", set_label=True)
    collections.close()


def test_an_update_racing_a_reembed_copy_reaches_the_new_generation(location: str, jpegs: list[bytes],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from corinfomax.serving.index import switch

    collections, jobs = opened(location)
    ids = add_images(collections, jpegs[:6])
    copy = switch.copy

    def racing(*args: Any) -> list[int]:  # the update lands after the batch was read, before it is written
        collections.update(None, ids[0], {"n": "late"}, "dog", set_label=True)
        return copy(*args)

    monkeypatch.setattr(switch, "copy", racing)
    assert jobs.start(None, record("b@1"), background=False).state == "done"
    with collections.reading(None) as store:
        item = store.get(ids[0])
    assert (item.label, item.metadata) == ("dog", {"n": "late"})
    collections.close()


def test_an_update_racing_a_reembed_copy_survives_a_kill(location: str, jpegs: list[bytes],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The update lands between the copy's read and its write, then the process dies before the switch: the
    resumed job's switch still serves the updated item (nothing but the stores and the catalog survive)."""
    from corinfomax.serving.index import switch

    collections, jobs = opened(location)
    ids = add_images(collections, jpegs[:30])
    copy = switch.copy

    def racing(*args: Any) -> list[int]:
        collections.update(None, ids[0], {"n": "late"}, "dog", set_label=True)
        return copy(*args)

    monkeypatch.setattr(switch, "copy", racing)
    assert jobs.start(None, record("b@1"), background=False, progress=crash_after_one_batch).state == "running"
    collections.close()
    monkeypatch.setattr(switch, "copy", copy)

    again, jobs = opened(location)
    (resumed,) = jobs.resume(background=False)
    assert resumed.state == "done" and again.route(None)["model"] == "b@1"
    with again.reading(None) as store:
        item = store.get(ids[0])
    assert (item.label, item.metadata) == ("dog", {"n": "late"})
    again.close()
