"""`corinfomax collection ...`: the service's collection verbs for a stopped service, on the same library code
(``serving.index.collections``, ``switch``, ``reembed``) and the same checks of the models (``serving.models``).

A re-embed here runs in the foreground with a progress bar, with every core for its model; a job the service left
running (a kill -9) is resumed by ``reembed`` of that collection.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from corinfomax.core.bundle import read_card
from corinfomax.core.errors import BundleError, UserError
from corinfomax.core.images import DEFAULT_MAX_PIXELS
from corinfomax.core.thumbnails import DEFAULT_SIDE
from corinfomax.serving.index import switch
from corinfomax.serving.index.catalog import DEFAULT, JobDoc, job_doc
from corinfomax.serving.index.collections import Collections
from corinfomax.serving.index.factory import open_layout
from corinfomax.serving.index.originals import DEFAULT_MAX_BYTES, Budget
from corinfomax.serving.index.reembed import Jobs
from corinfomax.serving.models import LoadedModel, card_record, is_bundle, load_embedder, load_model, model_key, resolve

log = logging.getLogger(__name__)


class Admin:
    """The collections at ``location``, with the bundles of ``models`` (a folder) to name models from."""

    def __init__(self, location: str, models: Path | None, default_bundle: Path | None,
                 max_bytes: int = DEFAULT_MAX_BYTES, keep_originals: bool = True,
                 thumbnail_side: int = DEFAULT_SIDE) -> None:
        self.models = models
        self.collections = Collections(open_layout(location), self._encoder, Budget(max_bytes), thumbnail_side)
        self._embedders: dict[str, Any] = {}
        default = None
        if self.collections.catalog.get(f"collection/{DEFAULT}") is None:
            if default_bundle is None:
                raise UserError(f"{location} has no collections yet: give --default-model, the bundle its index "
                                "was built with")
            default = card_record(read_card(default_bundle), default_bundle)
        self.collections.open(default, keep_originals)
        self.jobs = Jobs(self.collections)

    def _encoder(self, key: str) -> Any:
        if key not in self._embedders:
            record = self.collections.model_records().get(key)
            if record is None:
                raise BundleError(f"model {key} is not known to this index (accepted by no service or command)")
            self._embedders[key] = load_embedder(record, threads=None)
        return self._embedders[key]

    def model(self, name: str) -> LoadedModel:
        """The bundle of the models folder that ``name`` (name or name@version) names: loaded, verified, warmed."""
        bundles = {model_key(read_card(path)): path for path in self._bundles()}
        key = resolve(name, bundles)
        loaded = load_model(bundles[key], threads=None, max_pixels=DEFAULT_MAX_PIXELS)
        self.collections.record_models([loaded.record()])
        self._embedders[key] = loaded.embedder
        return loaded

    def _bundles(self) -> Iterator[Path]:
        if self.models is None or not self.models.is_dir():
            raise UserError(f"models folder {self.models} does not exist: give --models DIR")
        for path in sorted(self.models.iterdir()):
            if is_bundle(path):
                try:
                    read_card(path)
                except BundleError as err:
                    log.warning("skipping %s: %s", path, err)
                    continue
                yield path

    def reembed(self, name: str, model: str | None, allow_missing: bool, progress: bool = True) -> JobDoc:
        """Re-embed ``name`` with ``model`` in the foreground (or resume the job a stopped service left)."""
        doc = self.collections.doc(name)
        bar = tqdm(desc=f"re-embed {doc.name}", unit="item", disable=not progress)

        def show(job: JobDoc) -> None:
            bar.total = job.total
            bar.update(job.done - bar.n)

        try:
            if doc.job is not None:
                log.info("resuming job %s that the service left running", doc.job)
                resumed = [job for job in self.jobs.resume(background=False, progress=show)
                           if job.collection == doc.name]
                return resumed[0] if resumed else job_doc(self.collections.catalog, doc.job)
            if model is None:
                raise UserError("give --model, the model to re-embed with")
            return self.jobs.start(name, self.model(model).record(), allow_missing, background=False, progress=show)
        finally:
            bar.close()

    def rollback(self, name: str, allow_missing: bool) -> dict[str, Any]:
        return switch.rollback(self.collections, name, allow_missing)

    def drop_generation(self, name: str) -> dict[str, Any]:
        return switch.drop_generation(self.collections, name)

    def create(self, name: str, model: str, keep_originals: bool) -> dict[str, Any]:
        return self.collections.create(name, self.model(model).record(), keep_originals)

    def drop(self, name: str) -> None:
        self.collections.drop(name)

    def close(self) -> None:
        self.collections.close()
