"""The catalog (``catalog``) in Milvus: the collection ``<base>_catalog``, one row per document (``key`` VARCHAR
primary key, ``value`` JSON), read at consistency level Strong, so every replica sees a change once it is
acknowledged. A change of several documents is one upsert request (one WAL entry: Milvus Lite and a collection
with one shard apply it whole); deletions follow it."""

from __future__ import annotations

from typing import Any

from pymilvus import MilvusClient

from corinfomax.serving.index.milvus_schema import answers_503, create_table, quote

MAX_DOCUMENTS = 16_384  # the catalog holds collections, jobs and models: a few hundred documents


class MilvusCatalog:
    def __init__(self, client: MilvusClient, name: str, location: str) -> None:
        self._client, self.name, self.location = client, name, location  # location: for a failure's message
        create_table(client, name, "key", "value")
        client.load_collection(name)

    @answers_503
    def get(self, key: str) -> dict[str, Any] | None:
        rows = self._client.get(self.name, ids=[key], output_fields=["value"])
        return rows[0]["value"] if rows else None

    @answers_503
    def scan(self, prefix: str) -> dict[str, dict[str, Any]]:
        rows = self._client.query(self.name, filter=f"key like {quote(prefix + '%')}", output_fields=["key", "value"],
                                  limit=MAX_DOCUMENTS)
        return {row["key"]: row["value"] for row in sorted(rows, key=lambda row: row["key"])}

    @answers_503
    def put(self, changes: dict[str, dict[str, Any] | None]) -> None:
        kept = [{"key": key, "value": value, "unused": [0.0, 0.0]}
                for key, value in changes.items() if value is not None]
        if kept:
            self._client.upsert(self.name, kept)
        gone = [key for key, value in changes.items() if value is None]
        if gone:
            self._client.delete(self.name, ids=gone)

    def close(self) -> None:
        pass  # the client belongs to the layout
