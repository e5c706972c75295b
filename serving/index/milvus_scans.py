"""Reads of a whole Milvus collection, batch by batch: the labelled items (kNN classification), every item (``index
migrate``), ids and vectors (``index duplicates``), stored rows (copying into another generation), ids and
sources (the originals store's references). ``MilvusStore`` inherits them; they need only its client, collection
name, dimension and whether its collection has a ``source`` field."""

from __future__ import annotations

import base64
from typing import Any, Iterator, Sequence

import numpy as np
from pymilvus import MilvusClient

from corinfomax.serving.index.backend import Item, Labelled, StoredRow, check_ids
from corinfomax.serving.index.milvus_schema import answers_503, quote

READ_BATCH = 4096
ROW_FIELDS = ["metadata", "label", "thumbnail", "write_key", "write_rows"]  # a row's fields beside id and vector


class MilvusScans:
    """The batch-by-batch reads of ``MilvusStore`` (see the module's docstring)."""

    _client: MilvusClient
    collection: str
    dim: int
    has_source: bool

    @answers_503
    def labelled(self) -> Labelled:
        """All labelled items (for kNN classification)."""
        ids: list[int] = []
        vectors: list[list[float]] = []
        labels: list[str] = []
        for batch in self._scan("label IS NOT NULL", ["vector", "label"]):
            for row in batch:
                ids.append(int(row["id"]))
                vectors.append(row["vector"])
                labels.append(row["label"])
        order = np.argsort(ids, kind="stable")
        return Labelled(np.asarray(ids, np.int64)[order],
                        np.asarray(vectors, np.float32).reshape(-1, self.dim)[order], [labels[i] for i in order])

    @answers_503
    def items(self, batch: int) -> Iterator[list[tuple[Item, bytes | None]]]:
        """Every item with its thumbnail (or None), ``batch`` at a time (for `index migrate`)."""
        for rows in self._scan("", ["vector", "metadata", "label", "thumbnail"], batch):
            yield [(row_item(row), base64.b64decode(row["thumbnail"]) if row["thumbnail"] else None) for row in rows]

    @answers_503
    def scan(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every item's (ids, unit vectors), READ_BATCH at a time in Milvus' order (for `index duplicates`)."""
        for rows in self._scan("", ["vector"]):
            yield (np.asarray([int(row["id"]) for row in rows], np.int64),
                   np.asarray([row["vector"] for row in rows], np.float32).reshape(-1, self.dim))

    def _scan(self, condition: str, fields: list[str], batch: int = READ_BATCH) -> Iterator[list[dict[str, Any]]]:
        iterator = self._client.query_iterator(self.collection, batch_size=batch, filter=condition,
                                               output_fields=["id", *fields])
        try:
            while rows := iterator.next():
                yield rows
        finally:
            iterator.close()

    @answers_503
    def stored(self, ids: Sequence[int]) -> list[StoredRow]:
        """The rows of those of ``ids`` that exist, in id order (for copying them into another generation)."""
        wanted = check_ids(ids) if len(ids) else []
        fields = ROW_FIELDS + (["source"] if self.has_source else [])
        rows = [row for start in range(0, len(wanted), READ_BATCH)
                for row in self._client.get(self.collection, ids=wanted[start : start + READ_BATCH],
                                            output_fields=fields)]
        return sorted((StoredRow(int(row["id"]), row["metadata"], row["label"],
                                 base64.b64decode(row["thumbnail"]) if row["thumbnail"] else None, row.get("source"),
                                 {"write_key": row["write_key"], "write_rows": row["write_rows"]}) for row in rows),
                      key=lambda row: row.id)

    @answers_503
    def id_list(self) -> np.ndarray:
        """Every id, ascending (Milvus returns no order: gathered, then sorted)."""
        ids = [int(row["id"]) for batch in self._scan("", []) for row in batch]
        return np.sort(np.asarray(ids, np.int64))

    @answers_503
    def sources(self) -> set[str]:
        if not self.has_source:
            return set()
        return {row["source"] for batch in self._scan("source IS NOT NULL", ["source"]) for row in batch}

    @answers_503
    def references(self, source: str) -> bool:
        return self.has_source and bool(self._client.query(self.collection, filter=f"source == {quote(source)}",
                                                           output_fields=["id"], limit=1))


def row_item(row: dict[str, Any]) -> Item:
    """An ``Item`` from a Milvus row with id, vector, metadata and label."""
    return Item(int(row["id"]), np.asarray(row["vector"], np.float32), row["metadata"], row["label"])
