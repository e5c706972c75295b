"""Named collections over one index location, each an alias for its live generation (``Collections``).

What it guarantees, whatever the backend (``layout``):
- A request reads one generation: the live one when it started (``reading``). A switch replaces which one is
  live in one catalog change, so each request sees the old or the new generation, never a mix; a request
  embedded with a model that is no longer the collection's is refused as stale (``StaleRoute``) and retried.
- Every write goes to the live generation first (its ids are the ids), then, with the same ids, to the
  other generations (one being built by a re-embed job, one kept for a rollback); so when a job's copy is
  done, the new generation holds every acknowledged item once, and a rollback loses nothing.
- Originals are stored before the item commit and deleted after the last item naming them is gone.
All writes and changes of state take one lock (one index service process owns an embedded index or a Milvus
Lite file); reads take it only to find their generation.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from corinfomax.core.errors import BadInput, NotFound
from corinfomax.serving.index.backend import check_ids, check_key, check_rows, check_thumbnails, normalise
from corinfomax.serving.index.catalog import (
    DEFAULT,
    CollectionDoc,
    Conflict,
    GenerationDoc,
    StaleRoute,
    check_name,
)
from corinfomax.serving.index.filters import Field
from corinfomax.serving.index.generations import Encoders, Handle, Open, encode_rows, rows_of
from corinfomax.serving.index.layout import Layout
from corinfomax.serving.index.originals import SHA, Budget, Originals

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0  # a Milvus server's catalog, as other replicas change it, is re-read at most this often


def model_record_key(key: str) -> str:
    return f"model/{key}"


class Collections:
    """The collections at one index location; ``encoders`` embeds stored items with a model (fanned-out adds,
    re-embeds), ``budget`` caps the originals; a re-embed gives items without a thumbnail one of
    ``thumbnail_side`` px (0: none)."""

    def __init__(self, layout: Layout, encoders: Encoders, budget: Budget, thumbnail_side: int = 0) -> None:
        self.layout, self.catalog, self.encoders, self.budget = layout, layout.catalog, encoders, budget
        self.thumbnail_side = thumbnail_side
        self.lock = threading.RLock()
        self._open: dict[str, Open] = {}
        self._read_at = 0.0

    # -- opening, listing ---------------------------------------------------------------------------

    def open(self, default_model: dict[str, Any] | None, keep_originals: bool) -> None:
        """Open every collection; on the first open of a location, register (or create) ``default`` with the model
        it was built with (``default_model``: a model record, as ``serving.models.card_record``)."""
        with self.lock:
            if self.catalog.get(f"collection/{DEFAULT}") is None:
                if default_model is None:
                    raise BadInput(f"{self.layout.location} has no catalog yet: name the model it was built with")
                generation = GenerationDoc(default_model["key"], default_model["dim"],
                                           default_model["checkpoint_sha256"])
                doc = CollectionDoc(DEFAULT, keep_originals, 1, {1: generation})
                store = self.layout.open(DEFAULT, 1, generation, create=True)  # a legacy index of another model: 4xx
                self.commit(doc, {model_record_key(default_model["key"]): default_model})
                self.load(doc, {1: store})
            for data in self.catalog.scan("collection/").values():
                doc = CollectionDoc.from_json(data)
                if doc.name not in self._open:
                    self.load(doc)
                self.layout.published(doc)
            self._read_at = time.monotonic()

    def load(self, doc: CollectionDoc, stores: dict[int, Any] | None = None) -> Open:
        """Open ``doc``'s generations (keeping the stores already open in ``stores`` or in memory)."""
        known = self._open.get(doc.name)
        handles = {}
        for number in (doc.live, *doc.others()):
            if known is not None and number in known.handles:
                handles[number] = known.handles[number]
            else:
                store = (stores or {}).get(number) or self.layout.open(doc.name, number, doc.generations[number],
                                                                       create=False)
                handles[number] = Handle(store)
        originals = known.originals if known is not None else None
        if doc.keep_originals and originals is None:
            originals = Originals(self.layout.originals_folder(doc.name), self.budget)
        self._open[doc.name] = opened = Open(doc, handles, originals)
        return opened

    def state(self, name: Any, fresh: bool = False) -> Open:
        """The open collection ``name``; on a shared index (a Milvus server), as the catalog says now."""
        name = DEFAULT if name is None else check_name(name)
        if self.layout.shared and (fresh or time.monotonic() - self._read_at > REFRESH_SECONDS):
            self._refresh()
        if name not in self._open:
            raise NotFound(f"no collection {name!r} (collections: {', '.join(sorted(self._open))})")
        return self._open[name]

    def _refresh(self) -> None:
        docs = {CollectionDoc.from_json(data).name: CollectionDoc.from_json(data)
                for data in self.catalog.scan("collection/").values()}
        for name in set(self._open) - set(docs):
            self._open.pop(name)
        for doc in docs.values():
            if generations_changed(self._open.get(doc.name), doc):
                self.load(doc)
            else:
                self._open[doc.name].doc = doc
        self._read_at = time.monotonic()

    def commit(self, doc: CollectionDoc, also: dict[str, Any] | None = None) -> None:
        """Record ``doc`` (and ``also``) in one catalog change, then publish it (Milvus: the alias)."""
        self.catalog.put({f"collection/{doc.name}": doc.to_json(), **(also or {})})
        self.layout.published(doc)

    def route(self, name: Any) -> dict[str, Any]:
        """What an API worker needs to serve a collection: its live model, dimension and generation."""
        with self.lock:
            doc = self.state(name).doc
        generation = doc.generations[doc.live]
        return {"name": doc.name, "model": generation.model, "dim": generation.dim, "generation": doc.live,
                "keep_originals": doc.keep_originals}

    def routes(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            if self.layout.shared:
                self._refresh()
            names = sorted(self._open)
        return {name: self.route(name) for name in names}

    def describe(self) -> list[dict[str, Any]]:
        """``/collections``: every collection with its live model, size and generation."""
        return [self.entry(name) for name in self.routes()]

    def entry(self, name: Any) -> dict[str, Any]:
        """One collection as ``/collections`` lists it (and as its management answers show it)."""
        route = self.route(name)
        with self.reading(name) as store:
            count = store.count()
        model, _, version = route["model"].partition("@")
        doc = self._open[route["name"]].doc
        return {"name": route["name"], "model": model, "version": version, "count": count, "dim": route["dim"],
                "generation": route["generation"], "keep_originals": route["keep_originals"],
                **({"job": doc.job} if doc.job else {})}

    # -- reads --------------------------------------------------------------------------------------

    @contextmanager
    def reading(self, name: Any, model: str | None = None) -> Iterator[Any]:
        """The live generation of ``name`` for one request (``model``: the model its query was embedded with)."""
        with self.lock:
            state = self.state(name)
            check_model(state.doc, model)
            handle = state.handles[state.doc.live]
            store = handle.enter()
        try:
            yield store
        finally:
            handle.exit()

    def stats(self, name: Any) -> dict[str, Any]:
        with self.reading(name) as store:
            stats = store.stats()
        originals = self._open[DEFAULT if name is None else name].originals
        return {**stats, **(originals.stats() if originals is not None else {})}

    # -- writes -------------------------------------------------------------------------------------

    def add(self, name: Any, vectors: Any, metadata: Sequence[dict[str, Any]] | None = None,
            labels: Sequence[str | None] | None = None, thumbnails: Sequence[bytes | None] | None = None,
            key: str | None = None, *, images: Sequence[bytes] | None = None,
            sources: Sequence[str | None] | None = None, model: str | None = None) -> list[int]:
        """Add to the live generation, then to the others with the same ids. ``images``: the added images' bytes
        (kept when the collection keeps originals; embedded for generations of other models); ``model``: the
        model ``vectors`` were embedded with (stale if no longer the collection's)."""
        key = check_key(key)
        with self.lock:
            state = self.state(name, fresh=True)
            doc = state.doc
            check_model(doc, model)
            live = state.live
            vectors = normalise(vectors, live.dim)
            check_rows(vectors, metadata, labels)  # before any original is stored: a refused add leaves none
            check_thumbnails(thumbnails, len(vectors))
            if images is not None and state.originals is not None:
                self.budget.check(state.originals.new_bytes(list(images)))
                sources = [state.originals.put(data) for data in images]
            ids = self.layout.allocate(doc, len(vectors), key)
            if ids is None:
                new = live.add(vectors, metadata, labels, thumbnails, key, sources)
            else:
                new = live.add_at(ids, vectors, metadata, labels, thumbnails, key, sources)
            rows = rows_of(new, metadata, labels, thumbnails, sources)
            raw = dict(zip(new, images)) if images is not None else None
            for number in doc.others():
                self._fan_out(state, number, rows, vectors, key, raw)
        return new

    def _fan_out(self, state: Open, number: int, rows: list[Any], vectors: Any, key: str | None,
                 images: dict[int, bytes] | None) -> None:
        """Write an add the live generation took into generation ``number`` too (embedded with its model). An
        item it cannot embed, or a failure here, is repaired or listed when that generation becomes live."""
        generation, store = state.doc.generations[number], state.store(number)
        try:
            if generation.model == state.doc.model:
                good, new_vectors = rows, vectors
            else:
                good, new_vectors, _ = encode_rows(rows, self.encoders(generation.model), state.originals, images)
            if good:
                store.add_at([r.id for r in good], new_vectors, [r.metadata for r in good], [r.label for r in good],
                             [r.thumbnail for r in good], key, [r.source for r in good])
        except Exception as err:  # the add is committed in the live generation: never fail it for this
            log.warning("collection %s: generation %d missed an add (%s); the switch repairs it", state.doc.name,
                        number, err)

    def delete(self, name: Any, ids: Sequence[int], key: str | None = None) -> list[int]:
        """Delete from the live generation (all must exist there), then from the others; free unused originals."""
        with self.lock:
            state = self.state(name, fresh=True)
            live = state.live
            kept = {row.source for row in live.stored(check_ids(ids)) if row.source and row.source.startswith(SHA)} \
                if state.originals is not None else set()
            deleted = live.delete(ids, key)
            for number in state.doc.others():
                try:
                    state.store(number).remove(deleted)
                except Exception as err:  # committed in the live generation: the switch repairs the others
                    log.warning("collection %s: generation %d missed a delete (%s)", state.doc.name, number, err)
            self.release(state, kept)
        return deleted

    def update(self, name: Any, item_id: int, metadata: dict[str, Any] | None = None, label: str | None = None,
               set_label: bool = False) -> None:
        """Replace an item's metadata and/or label in the live generation (NotFound if it has no such item), then in
        the others, like a delete; nothing is embedded again."""
        with self.lock:
            state = self.state(name, fresh=True)
            if not state.live.update(item_id, metadata, label, set_label):
                raise NotFound(f"no item with id {item_id}")
            for number in state.doc.others():
                try:
                    state.store(number).update(item_id, metadata, label, set_label)
                except Exception as err:  # committed in the live generation: never fail it for this
                    log.warning("collection %s: generation %d missed an update (%s)", state.doc.name, number, err)
                    with contextlib.suppress(Exception):  # without the stale copy, a switch there copies it anew
                        state.store(number).remove([item_id])

    def index_field(self, name: Any, field: Field) -> dict[str, Any]:
        """Index a metadata field for filters in every generation of the collection; the field and the live
        generation's indexed fields (none on Milvus Lite)."""
        with self.lock:
            state = self.state(name, fresh=True)
            for handle in state.handles.values():
                handle.store.index_field(field)
            return {"field": field.name, "indexed_fields": state.live.stats()["indexed_fields"]}

    def release(self, state: Open, sources: set[str]) -> None:
        """Delete the originals of ``sources`` that no generation references any more (under the lock)."""
        if state.originals is None:
            return
        for source in sorted(sources):
            if not state.referenced(source):
                state.originals.discard(source)

    # -- collections --------------------------------------------------------------------------------

    def create(self, name: Any, model: dict[str, Any], keep_originals: bool) -> dict[str, Any]:
        """A new, empty collection bound to ``model`` (an accepted model's record)."""
        name = check_name(name)
        with self.lock:
            if self.layout.shared:
                self._refresh()
            if name in self._open:
                raise Conflict(f"collection {name!r} exists already")
            generation = GenerationDoc(model["key"], model["dim"], model["checkpoint_sha256"])
            doc = CollectionDoc(name, keep_originals, 1, {1: generation}, explicit_ids=True)
            self.catalog.put({f"collection/{name}": doc.to_json()})  # first: a crash leaves no unnamed storage
            store = self.layout.open(name, 1, generation, create=True)
            self.load(doc, {1: store})
            self.layout.published(doc)
        return self.entry(name)

    def drop(self, name: Any) -> None:
        """Drop a collection, every generation and its originals (a running job is cancelled by the caller)."""
        name = check_name(name)
        if name == DEFAULT:
            raise BadInput("the default collection cannot be dropped (requests without `collection` use it)")
        with self.lock:
            state = self.state(name, fresh=True)
            self.catalog.put({f"collection/{name}": None})
            del self._open[name]
        for number, handle in state.handles.items():
            handle.retire()
            self.layout.drop(name, number, handle.store)
        if state.originals is not None:
            state.originals.drop()
        self.layout.drop_collection(name)

    def doc(self, name: Any) -> CollectionDoc:
        """The collection's catalog document as this process holds it (a copy is not made: read only)."""
        with self.lock:
            return self.state(name).doc

    def sweep(self) -> None:
        """Delete storage and originals the catalog no longer names (left by a crash mid-change)."""
        with self.lock:
            docs = {name: state.doc for name, state in self._open.items()}
            self.layout.sweep(docs)
            states = list(self._open.values())
        for state in states:
            if state.originals is None:
                continue
            for source in state.originals.sources():
                with self.lock:  # adds store originals under this lock: none can be between its put and commit
                    self.release(state, {source})

    def record_models(self, records: list[dict[str, Any]]) -> None:
        """Remember the models an API worker accepted, for the other processes."""
        self.catalog.put({model_record_key(record["key"]): record for record in records})

    def model_records(self) -> dict[str, dict[str, Any]]:
        return {record["key"]: record for record in self.catalog.scan("model/").values()}

    def close(self) -> None:
        with self.lock:
            for state in self._open.values():
                for handle in state.handles.values():
                    handle.store.close()
            self._open.clear()
            self.layout.close()


def check_model(doc: CollectionDoc, model: str | None) -> None:
    """Refuse a request whose query was embedded with another model than the collection's live one."""
    if model is not None and model != doc.model:
        raise StaleRoute(f"collection {doc.name!r} now uses model {doc.model}, not {model}; retry")


def generations_changed(known: Open | None, doc: CollectionDoc) -> bool:
    """Whether ``doc`` names generations that ``known`` (the open collection) does not hold."""
    return known is None or set(known.handles) != {doc.live, *doc.others()}
