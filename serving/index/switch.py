"""Changing which generation of a collection is live: a re-embed's new generation (``begin``, ``copy``,
``finish`` or ``abandon``), a ``rollback`` to the previous one, and freeing it (``drop_generation``).

Each change is one catalog document written under the collections' lock, after the storage it names exists and
before the storage it no longer names is deleted: a crash at any moment leaves the live generation intact and at
most storage that ``Collections.sweep`` removes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from concurrent.futures import Executor
from typing import Any, Callable, Sequence

from corinfomax.core.errors import NotFound
from corinfomax.serving.index.catalog import CollectionDoc, Conflict, GenerationDoc, JobDoc
from corinfomax.serving.index.collections import Collections, model_record_key
from corinfomax.serving.index.filters import metadata_field
from corinfomax.serving.index.generations import (
    COPY_BATCH,
    Decoded,
    Open,
    decode_rows,
    difference,
    remove_all,
    sync,
)

log = logging.getLogger(__name__)

MAX_LISTED = 1000  # ids a job or a refusal lists (the count is given in full)


def _copy(doc: CollectionDoc) -> CollectionDoc:
    return CollectionDoc.from_json(doc.to_json())


def listed(ids: Sequence[int]) -> str:
    shown = ", ".join(map(str, sorted(ids)[:20]))
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


def begin(collections: Collections, name: Any, model: dict[str, Any], allow_missing: bool) -> JobDoc:
    """Record a new, pending generation of ``name`` built with ``model`` (a record) and its job, then create it:
    from now on every write reaches it too."""
    with collections.lock:
        state = collections.state(name, fresh=True)
        if state.doc.job is not None:
            raise Conflict(f"a re-embed job ({state.doc.job}) is running for collection {state.doc.name!r}; "
                           "follow it with POST /jobs")
        if state.doc.previous is not None:
            raise Conflict(f"collection {state.doc.name!r} keeps its previous generation {state.doc.previous}: "
                           "roll back or drop_generation first")
        doc = _copy(state.doc)
        number, doc.next_generation = doc.next_generation, doc.next_generation + 1
        generation = GenerationDoc(model["key"], model["dim"], model["checkpoint_sha256"])
        job = JobDoc(uuid.uuid4().hex[:16], doc.name, model["key"], number, allow_missing)
        doc.pending, doc.job, doc.generations[number] = number, job.id, generation
        collections.commit(doc, {f"job/{job.id}": dataclasses.asdict(job), model_record_key(model["key"]): model})
        store = collections.layout.open(doc.name, number, generation, create=True)
        for field in state.live.stats()["indexed_fields"]:  # the new generation answers filters as fast
            store.index_field(metadata_field(field))
        collections.load(doc, {number: store})
    log.info("re-embed job %s: collection %s, generation %d with model %s", job.id, doc.name, number, job.model)
    return job


def pending(collections: Collections, job: JobDoc) -> Open:
    """The collection of a running job; Conflict when the job no longer owns its pending generation."""
    with collections.lock:
        state = collections.state(job.collection)
        if state.doc.job != job.id or state.doc.pending != job.generation:
            raise Conflict(f"job {job.id} was stopped: collection {job.collection!r} no longer builds generation "
                           f"{job.generation}")
        return state


def prepare(collections: Collections, job: JobDoc, ids: list[int], pool: Executor | None = None) -> Decoded:
    """Read the live items ``ids`` and decode their images for the job's model (no lock: the slow part)."""
    state = pending(collections, job)
    return decode_rows(state.live.stored(ids), collections.encoders(job.model), state.originals, pool=pool,
                       thumbnail_side=collections.thumbnail_side)


def copy(collections: Collections, job: JobDoc, ids: list[int], decoded: Decoded) -> list[int]:
    """Embed the prepared items of ``ids`` with the job's model, then, under the lock, write those still live
    and not there yet into the job's generation, with their metadata and label as they are now (an update may
    have come after ``prepare`` read them, and one after this write reaches the copy itself); return the ids
    that could not be embedded."""
    vectors = decoded.embed(collections.encoders(job.model))
    with collections.lock:
        state = pending(collections, job)
        target = state.store(job.generation)
        now, there = {row.id: row for row in state.live.stored(ids)}, target.existing(ids)
        keep = [i for i, row in enumerate(decoded.rows) if row.id in now and row.id not in there]
        rows = [dataclasses.replace(row, metadata=now[row.id].metadata, label=now[row.id].label)
                for row in (decoded.rows[i] for i in keep)]
        target.put_rows(rows, vectors[keep])
        return [i for i in decoded.missing if i in now]


def catch_up(collections: Collections, job: JobDoc, stop: Callable[[], bool]) -> None:
    """The bulk of the final comparison, outside the lock: whatever the copy and the fanned-out writes missed
    (a crash between a write's two generations, say) is removed or copied now, the copying as ``copy`` does."""
    state = pending(collections, job)
    gone, lacking = difference(state.live, state.store(job.generation))
    remove_all(state.store(job.generation), gone)  # ids are never reused: what left the live one stays gone
    for start in range(0, len(lacking), COPY_BATCH):
        if stop():
            return
        batch = lacking[start : start + COPY_BATCH]
        copy(collections, job, batch, prepare(collections, job, batch))


def finish(collections: Collections, job: JobDoc) -> JobDoc:
    """Compare once more under the lock, then switch: the job's generation becomes live, the live one previous
    (kept for a rollback). With items that could not be embedded, fail unless the job allows them missing."""
    with collections.lock:
        state = pending(collections, job)
        old, new = state.live, state.store(job.generation)
        missing = sync(old, new, collections.encoders(job.model), state.originals)
        if missing and not job.allow_missing:
            raise Conflict(f"{len(missing)} items cannot be embedded with {job.model}: ids {listed(missing)} (added "
                           "as vectors, or their original is gone); rerun with allow_missing to leave them out")
        doc = _copy(state.doc)
        doc.previous, doc.live, doc.pending, doc.job = doc.live, job.generation, None, None
        collections.layout.switched(doc, new, old)
        job = dataclasses.replace(job, state="done", missing=sorted(missing)[:MAX_LISTED], finished_at=time.time(),
                                  done=max(job.done, job.total))
        collections.commit(doc, {f"job/{job.id}": dataclasses.asdict(job)})
        collections.load(doc)
    log.info("re-embed job %s done: collection %s now serves generation %d (model %s); %d items left out",
             job.id, doc.name, doc.live, job.model, len(missing))
    return job


def abandon(collections: Collections, job: JobDoc, error: str) -> JobDoc:
    """Record the job as failed and delete its generation (the live one never changed)."""
    job = dataclasses.replace(job, state="failed", error=error, finished_at=time.time())
    with collections.lock:
        try:
            state: Open | None = collections.state(job.collection)
        except NotFound:  # dropped meanwhile (its generations went with it)
            state = None
        changes: dict[str, Any] = {f"job/{job.id}": dataclasses.asdict(job)}
        if state is None or state.doc.job != job.id:
            collections.catalog.put(changes)
            return job
        doc = _copy(state.doc)
        doc.pending, doc.job = None, None
        doc.generations.pop(job.generation, None)
        collections.commit(doc, changes)
        handle = state.handles.get(job.generation)
        collections.load(doc)
    if handle is not None:
        handle.retire()
        collections.layout.drop(doc.name, job.generation, handle.store)
    log.warning("re-embed job %s failed: %s", job.id, error)
    return job


def rollback(collections: Collections, name: Any, allow_missing: bool) -> dict[str, Any]:
    """Make the previous generation live again at once, brought up to date first (it took every write, so only
    items it could not embed, such as vectors added since, can be lacking: refused unless ``allow_missing``)."""
    with collections.lock:
        state = collections.state(name, fresh=True)
        if state.doc.previous is None:
            raise Conflict(f"collection {state.doc.name!r} has no previous generation to roll back to")
        number = state.doc.previous
        previous = state.doc.generations[number]
        old, new = state.live, state.store(number)
        missing = sync(old, new, collections.encoders(previous.model), state.originals)
        if missing and not allow_missing:
            raise Conflict(f"{len(missing)} items cannot be embedded with {previous.model}: ids {listed(missing)}; "
                           "roll back with allow_missing to leave them out")
        doc = _copy(state.doc)
        doc.live, doc.previous = number, doc.live
        collections.layout.switched(doc, new, old)
        collections.commit(doc)
        collections.load(doc)
    log.info("collection %s rolled back to generation %d (model %s)", doc.name, doc.live, doc.model)
    return {**collections.entry(doc.name), "missing": sorted(missing)[:MAX_LISTED]}


def drop_generation(collections: Collections, name: Any) -> dict[str, Any]:
    """Free the previous generation, and the originals only it still named."""
    with collections.lock:
        state = collections.state(name, fresh=True)
        number = state.doc.previous
        if number is None:
            raise Conflict(f"collection {state.doc.name!r} has no previous generation to drop")
        handle = state.handles[number]
        sources = handle.store.sources() if state.originals is not None else set()
        doc = _copy(state.doc)
        doc.previous = None
        doc.generations.pop(number)
        collections.commit(doc)
        state = collections.load(doc)
    handle.retire()
    collections.layout.drop(doc.name, number, handle.store)
    with collections.lock:
        collections.release(state, sources)
    log.info("collection %s: generation %d dropped", doc.name, number)
    return {**collections.entry(doc.name), "dropped": number}
