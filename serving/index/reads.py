"""The index's read requests beyond a plain top-k, on any backend's store (``backend.VectorIndex``): search with a
filter and a score threshold, recommendations from examples, and browsing in pages. What crosses the internal hop
is JSON (the filter as the client wrote it, already validated once by the public API before any image was
decoded), so each is parsed here into the typed form the store takes.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.serving.index import duplicates
from corinfomax.serving.index.backend import MAX_ID, Hit, VectorIndex, check_ids, normalise
from corinfomax.serving.index.filters import parse_filter
from corinfomax.serving.index.recommend import check_threshold, recommend

MAX_PAGE = 1000  # items in one /list page
DEFAULT_PAGE = 100
MAX_EXAMPLES = 64  # positive (or negative) examples in one recommendation
CURSOR_PREFIX = b"after:"  # a cursor is this and the last id of the page, base64url


def search(store: VectorIndex, queries: Any, k: int, labelled_only: bool = False, filter: Any = None,
           score_threshold: float | None = None) -> list[list[Hit]]:
    """Top-``k`` per query among the items ``filter`` passes, without the hits scoring below ``score_threshold``."""
    rows = store.search(queries, k, labelled_only=labelled_only, where=parse_filter(filter))
    threshold = check_threshold(score_threshold)
    return rows if threshold is None else [[hit for hit in row if hit.score >= threshold] for row in rows]


def search_folded(store: VectorIndex, queries: Any, k: int, dedup: float, labelled_only: bool = False,
                  filter: Any = None, score_threshold: float | None = None) -> list[list[tuple[Hit, list[Hit]]]]:
    """``search`` with near-identical hits (similarity >= ``dedup``) folded into the best ranked one
    (``duplicates.search_folded``); a kept hit, and each one folded into it, scores at least ``score_threshold``."""
    rows = duplicates.search_folded(store, queries, k, dedup, labelled_only=labelled_only, where=parse_filter(filter))
    threshold = check_threshold(score_threshold)
    if threshold is None:
        return rows
    return [[(kept, [hit for hit in folded if hit.score >= threshold]) for kept, folded in row
             if kept.score >= threshold] for row in rows]


def recommend_hits(store: VectorIndex, positive: list[Any], negative: list[Any] | None, strategy: str, k: int,
                   filter: Any = None, score_threshold: float | None = None) -> list[Hit]:
    """The top ``k`` items like the ``positive`` examples and unlike the ``negative`` ones (stored ids or vectors),
    examples that are stored items left out (``recommend.recommend``)."""
    pos, pos_ids = examples(store, positive, "positive")
    neg, neg_ids = examples(store, negative or [], "negative")
    where = parse_filter(filter)
    seen: dict[int, Hit] = {}

    def search_pairs(queries: np.ndarray, fetch: int) -> list[list[tuple[int, float]]]:
        rows = store.search(queries, fetch, where=where)
        seen.update((hit.id, hit) for row in rows for hit in row)
        return [[(hit.id, hit.score) for hit in row] for row in rows]

    ranked = recommend(pos, neg if len(neg) else None, k, search_pairs, store.vectors, strategy,
                       exclude={*pos_ids, *neg_ids}, score_threshold=check_threshold(score_threshold))
    return [Hit(i, score, seen[i].metadata, seen[i].label) for i, score in ranked]


def examples(store: VectorIndex, values: Any, where: str) -> tuple[np.ndarray, list[int]]:
    """Examples given as stored ids or vectors, as unit vectors ``[N, D]`` (in the order given) and the ids."""
    check_examples(values, where)
    if not values:
        return np.zeros((0, store.dim), np.float32), []
    given = [v for v in values if not isinstance(v, list)]
    ids = check_ids(given) if given else []
    stored = dict(zip(ids, store.vectors(ids))) if ids else {}
    rows = [normalise([v], store.dim, f"{where}[{i}]")[0] if isinstance(v, list) else stored[v]
            for i, v in enumerate(values)]
    return np.stack(rows), ids


def check_examples(values: Any, where: str) -> None:
    """A list of at most MAX_EXAMPLES stored ids or flat vectors (checked before it crosses to the index service:
    a client's nesting never reaches pickle)."""
    if values is None:
        return
    if not isinstance(values, list):
        raise BadInput(f"{where}: a list of stored ids or vectors, got {type(values).__name__}")
    if len(values) > MAX_EXAMPLES:
        raise BadInput(f"{where}: {len(values)} examples; the limit is {MAX_EXAMPLES}")
    for i, value in enumerate(values):
        flat = isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
        if not (flat or isinstance(value, int) and not isinstance(value, bool)):
            raise BadInput(f"{where}[{i}]: a stored item's id or a vector (a list of numbers)")


def page(store: VectorIndex, filter: Any = None, limit: Any = DEFAULT_PAGE, cursor: Any = None) -> dict[str, Any]:
    """One page of items in id order that ``filter`` passes, from ``cursor`` on, and the next page's cursor (None
    after the last)."""
    limit = check_limit(limit)
    after = decode_cursor(cursor)
    rows = store.page(after, limit + 1, parse_filter(filter))  # one more: is there a next page?
    items = [{"id": i, "label": label, "metadata": meta} for i, meta, label in rows[:limit]]
    return {"items": items, "cursor": encode_cursor(rows[limit - 1][0]) if len(rows) > limit else None}


def check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise BadInput(f"limit must be an integer from 1 to {MAX_PAGE}, got {str(limit)[:40]}")
    return limit


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(CURSOR_PREFIX + str(last_id).encode()).decode()


def decode_cursor(cursor: Any) -> int:
    """The last id of the page before (0 without a cursor); 400 for anything ``encode_cursor`` did not write."""
    if cursor is None:
        return 0
    bad = BadInput("cursor: not a cursor from /list (pass the previous answer's `cursor` unchanged, or none)")
    if not isinstance(cursor, str) or len(cursor) > 64:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor.encode())
    except (binascii.Error, ValueError):
        raise bad from None
    digits = raw[len(CURSOR_PREFIX):]
    if not raw.startswith(CURSOR_PREFIX) or not digits.isdigit() or int(digits) > MAX_ID \
            or encode_cursor(int(digits)) != cursor:
        raise bad
    return int(digits)
