"""Re-embed jobs: build a new generation of a collection with another model in the background, then switch
(``switch``), while the live generation keeps answering reads and taking writes.

A job snapshots the live ids, then copies them in id order, a batch at a time: reading each item's source and
embedding it with the new model outside the collections' lock, writing it under the lock if it is still live.
Writes made meanwhile reach the new generation directly (``Collections.add``/``delete``), and a final comparison
(``switch.catch_up``, then ``switch.finish`` under the lock) makes it equal to the live one before the switch.
Progress is kept in the catalog every few seconds; after a kill -9 the job resumes from its last recorded id
(copying is idempotent) or, when its model is gone, is recorded as failed and its generation deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from corinfomax.core.errors import UserError
from corinfomax.serving.index import switch
from corinfomax.serving.index.catalog import JobDoc, job_doc
from corinfomax.serving.index.collections import Collections
from corinfomax.serving.index.generations import COPY_BATCH
from corinfomax.serving.index.priority import lower_priority

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 3.0  # how often a running job records and logs its progress
JOIN_SECONDS = 60.0  # how long cancelling waits for a job's thread
DECODE_THREADS = 2  # a job's image decoders: with the model's one thread, about what `extract` uses per core
Progress = Callable[[JobDoc], None]


class Jobs:
    """The re-embed jobs of one ``Collections``: started by ``start``, resumed by ``resume``, each in a thread (or in
    the caller, ``run``: the CLI's)."""

    def __init__(self, collections: Collections) -> None:
        self.collections = collections
        self._running: dict[str, JobDoc] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stopped: set[str] = set()
        self._lock = threading.Lock()

    def start(self, name: Any, model: dict[str, Any], allow_missing: bool = False, background: bool = True,
              progress: Progress | None = None) -> JobDoc:
        """Begin a job building a generation of ``name`` with ``model`` (an accepted model's record)."""
        job = switch.begin(self.collections, name, model, allow_missing)
        return self._launch(job, background, progress)

    def _launch(self, job: JobDoc, background: bool, progress: Progress | None) -> JobDoc:
        with self._lock:
            self._running[job.id] = job
        if not background:
            return self.run(job, progress)
        thread = threading.Thread(target=self._background, args=(job,), name=f"reembed-{job.id}", daemon=True)
        with self._lock:
            self._threads[job.id] = thread
        thread.start()
        return job

    def resume(self, background: bool = True, progress: Progress | None = None) -> list[JobDoc]:
        """Continue the jobs a stopped process left running (or record them failed when their model is gone)."""
        resumed = []
        for data in self.collections.catalog.scan("job/").values():
            job = JobDoc(**data)
            if job.state != "running" or job.id in self._running:
                continue
            try:
                self.collections.encoders(job.model)
            except Exception as err:  # the model's bundle was removed or no longer loads
                switch.abandon(self.collections, job, f"cannot resume: model {job.model} is not available ({err})")
                continue
            log.info("re-embed job %s: resuming after item %d", job.id, job.cursor)
            resumed.append(self._launch(job, background, progress))
        return resumed

    def _background(self, job: JobDoc) -> None:
        lower_priority()
        self.run(job)

    def run(self, job: JobDoc, progress: Progress | None = None) -> JobDoc:
        """The job's work: copy, compare, switch; any failure records the job failed and deletes its generation."""
        try:
            job = self._copy(job, progress)
            if not self._stop(job):
                switch.catch_up(self.collections, job, lambda: self._stop(job))
            if not self._stop(job):
                job = switch.finish(self.collections, job)
        except UserError as err:
            job = switch.abandon(self.collections, job, str(err)) if not self._stop(job) else job
        except Exception as err:  # a fault (a store failing, a bug): the live generation is untouched
            log.exception("re-embed job %s failed", job.id)
            job = switch.abandon(self.collections, job, f"{type(err).__name__}: {err}")
        finally:
            with self._lock:
                self._running.pop(job.id, None)
                self._threads.pop(job.id, None)
        if progress is not None:
            progress(job)
        return job

    def _copy(self, job: JobDoc, progress: Progress | None) -> JobDoc:
        ids = switch.pending(self.collections, job).live.id_list()
        todo = ids[ids > job.cursor].tolist()
        job = self._update(job, total=len(ids), done=len(ids) - len(todo))
        batches = [todo[start : start + COPY_BATCH] for start in range(0, len(todo), COPY_BATCH)]
        started = reported = time.monotonic()
        # The next batch is read and decoded while this one is embedded and written (as `extract` overlaps them).
        nice = lower_priority if threading.current_thread() is not threading.main_thread() else None
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="reembed-decode", initializer=nice) as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="reembed-read", initializer=nice) as ahead:
            coming = ahead.submit(switch.prepare, self.collections, job, batches[0], pool) if batches else None
            for n, batch in enumerate(batches):
                if self._stop(job) or coming is None:
                    break
                decoded = coming.result()
                coming = ahead.submit(switch.prepare, self.collections, job, batches[n + 1], pool) \
                    if n + 1 < len(batches) else None
                missing = switch.copy(self.collections, job, batch, decoded)
                job = self._update(job, done=job.done + len(batch), cursor=batch[-1],
                                   missing=(job.missing + missing)[: switch.MAX_LISTED])
                if progress is not None:
                    progress(job)
                if time.monotonic() - reported >= PROGRESS_SECONDS:
                    reported = time.monotonic()
                    self._report(job, (job.done - (len(ids) - len(todo))) / max(reported - started, 1e-9))
        self.collections.catalog.put({f"job/{job.id}": dataclasses.asdict(job)})  # where a resumed job starts
        return job

    def _report(self, job: JobDoc, rate: float) -> None:
        self.collections.catalog.put({f"job/{job.id}": dataclasses.asdict(job)})
        log.info("re-embed job %s: collection %s, %d of %d items (%.0f/s)", job.id, job.collection, job.done,
                 job.total, rate)

    def _update(self, job: JobDoc, **changes: Any) -> JobDoc:
        job = dataclasses.replace(job, **changes)
        with self._lock:
            self._running[job.id] = job
        return job

    def _stop(self, job: JobDoc) -> bool:
        return job.id in self._stopped

    def cancel(self, name: str) -> None:
        """Stop the collection's running job (it is being dropped) and wait for its thread."""
        with self._lock:
            jobs = [job for job in self._running.values() if job.collection == name]
            for job in jobs:
                self._stopped.add(job.id)
            threads = [self._threads[job.id] for job in jobs if job.id in self._threads]
        for thread in threads:
            thread.join(JOIN_SECONDS)
        for job in jobs:
            switch.abandon(self.collections, job, f"collection {name!r} was dropped")

    def get(self, job: Any) -> dict[str, Any]:
        """``/jobs``: a job's state, progress, the items it could not embed, and its error."""
        running = self._running.get(job) if isinstance(job, str) else None
        return (running or job_doc(self.collections.catalog, job)).public()

    def close(self) -> None:
        """Stop every job's thread (a restart resumes them)."""
        with self._lock:
            self._stopped.update(self._running)
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(JOIN_SECONDS)

