"""Filters (serving/index/filters.py, filter_compile.py): the same filters give the same items through the
Python reference, the SQLite WHERE clause on a real index file, and the expression on a real Milvus Lite
collection; and every bad filter is a 400 naming its part."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from corinfomax.core.errors import BadInput
from corinfomax.serving.index.filter_compile import milvus_number, milvus_string, sql_field, to_milvus, to_sql
from corinfomax.serving.index.filters import (
    MAX_CONDITIONS,
    Compare,
    Filter,
    estimate_fraction,
    metadata_field,
    parse_filter,
)
from corinfomax.serving.index.milvus import MilvusStore
from corinfomax.serving.index.store import IndexStore
from corinfomax.serving.index.store_sqlite import DB_FILE

HOSTILE = [
    'say "hi"', "C:\\dir\\", "\\", '\\"', '" or 1==1 or "', "' or ''='", "x\") or (id > 0", "line\nbreak\ttab\rcr",
    "é😀 \u202e\u200b 中文", "%_%", "]}", "metadata[\"s\"]", "x" * 1024, "\x01\x1f\x7f",
]
# (label, metadata) of items 1..N, in insertion order (both backends number a new index's items from 1).
ROWS: list[tuple[str | None, dict[str, Any]]] = [
    ("cat", {"year": 2019, "score": 0.5, "src": "web", "taken": "2023-12-31T23:59:59Z", "flag": True,
             "cam": {"iso": 100, "make": "Canon"}}),
    ("cat", {"year": 2020, "score": 1.5, "src": "phone", "taken": "2024-01-01T00:00:00Z", "flag": False,
             "cam": {"iso": 800}}),
    ("dog", {"year": 2021, "score": -2, "src": "web", "taken": "2024-01-01T12:30:00Z",
             "cam": {"iso": 3200, "make": "Nikon"}}),
    ("dog", {"year": 2022.0, "src": "scan", "taken": "2024-01-02", "flag": True}),
    (None, {"year": "2020", "src": None, "taken": "2024-01-02T00:00:00Z", "cam": "Canon"}),
    ("bird", {"year": None, "taken": 20240101, "a-b": {"0": 5}}),
    ("bird", {"a-b": [5]}),
    (None, {}),
    # one field of every JSON type: SQLite's json_extract reads true as 1 and an array as its text
    ("x", {"mixed": 1}), ("x", {"mixed": 1.0}), ("x", {"mixed": True}), ("x", {"mixed": "1"}),
    ("x", {"mixed": [1]}), ("x", {"mixed": {"a": 1}}), ("x", {"mixed": None}), ("x", {"mixed": False}),
    *[(text if len(text) <= 200 else None, {"s": text}) for text in HOSTILE],
    (None, {"s": "nul\0inside"}),  # stored, never compared with: a filter cannot hold NUL
]
N = len(ROWS)
FIRST_HOSTILE = 17

# Filters with the ids they must match (the semantics, pinned by hand).
EXPECTED: list[tuple[dict[str, Any], list[int]]] = [
    ({"label": "cat"}, [1, 2]),
    ({"label": None}, [5, 8, *(FIRST_HOSTILE + i for i, text in enumerate(HOSTILE) if len(text) > 200), N]),
    ({"label": {"in": ["dog", "bird"]}}, [3, 4, 6, 7]),
    ({"id": {"gt": 2, "lte": 5}}, [3, 4, 5]),
    ({"not": {"id": {"gte": 3}}}, [1, 2]),
    ({"metadata.year": 2020}, [2]),  # not "2020": types never mix
    ({"metadata.year": "2020"}, [5]),
    ({"metadata.year": 2022}, [4]),  # 2022.0 is the number 2022
    ({"metadata.year": {"gte": 2020, "ne": 2021}}, [2, 4]),
    ({"metadata.year": {"in": [2019, "2020"]}}, [1, 5]),
    ({"metadata.year": None}, [i for i in range(1, N + 1) if i not in (1, 2, 3, 4, 5)]),  # null or missing
    ({"metadata.cam.make": "Canon"}, [1]),  # item 5's cam is a string: the path goes nowhere
    ({"metadata.cam.iso": {"gte": 800}}, [2, 3]),
    ({"metadata.a-b.0": 5}, [6]),  # "0" names a key, never an array index
    ({"metadata.taken": {"gte": "2024-01-01"}}, [2, 3, 4, 5]),  # a day as a bound covers the whole day
    ({"metadata.taken": {"gt": "2024-01-01"}}, [4, 5]),
    ({"metadata.taken": {"lte": "2024-01-01"}}, [1, 2, 3]),
    ({"metadata.taken": {"lt": "2024-01-01"}}, [1]),
    ({"metadata.taken": {"lt": "2024-01-01T14:30:00+02:00"}}, [1, 2]),  # 12:30Z, not before itself
    ({"metadata.taken": {"lte": "2024-01-01T12:30:00"}}, [1, 2, 3]),  # no offset: UTC
    ({"metadata.mixed": 1}, [9, 10]),
    ({"metadata.mixed": True}, [11]),
    ({"metadata.mixed": "1"}, [12]),
    ({"metadata.mixed": {"gte": 0.5}}, [9, 10]),
    ({"metadata.flag": {"ne": True}}, [i for i in range(1, N + 1) if i not in (1, 4)]),
]
# More filters whose answer is whatever the reference says (combinations, negations, hostile strings).
MORE: list[dict[str, Any]] = [
    {"label": {"ne": "cat"}},
    {"label": {"in": ["dog", None]}},
    {"not": {"label": {"in": ["dog", None]}}},
    {"id": {"in": [1, 4, 99]}},
    {"metadata.year": {"ne": None}},
    {"not": {"metadata.year": {"gte": 2021}}},
    {"metadata.year": {"gt": 2020.5, "lt": 2022}},
    {"metadata.score": {"lt": 0}},
    {"not": {"metadata.cam.make": "Canon"}},
    {"not": {"metadata.taken": {"lt": "2024-01-01"}}},
    {"metadata.flag": False},
    {"or": [{"label": "dog"}, {"metadata.src": "web"}]},
    {"and": [{"label": "cat"}, {"not": {"metadata.src": "web"}}]},
    {"label": "cat", "metadata.year": {"gte": 2020}},
    {"metadata.src": {"in": ["web", "scan"]}},
    {"not": {"or": [{"metadata.src": "web"}, {"label": None}]}},
    {"metadata.mixed": {"ne": "1"}},
    {"metadata.mixed": None},
    {"not": {"metadata.mixed": None}},
    {"metadata.mixed": False},
    {"not": {"metadata.mixed": {"gte": 1}}},
    {"not": {"metadata.mixed": {"in": [1, "1"]}}},
    {"not": {"not": {"not": {"and": [{"not": {"id": {"lt": 4}}}, {"or": [{"label": "dog"}, {"id": 8}]}]}}}},
    *({"metadata.s": text} for text in HOSTILE),
    *({"metadata.s": {"ne": text}} for text in HOSTILE),
    *({"label": text} for text in HOSTILE if len(text) <= 200),
    *({"metadata.s": {"in": ["nothing", text]}} for text in HOSTILE),
]
# Where Milvus Lite's evaluator, which is Python's, differs (filter_compile's docstring): true is 1 to it,
# and an order comparison with an array or object is unknown, so its complement does not hold either.
LITE_DIFFERS = [{"metadata.mixed": 1}, {"metadata.mixed": True}, {"metadata.mixed": {"gte": 0.5}},
                {"not": {"metadata.mixed": {"gte": 1}}},
                {"not": {"metadata.mixed": {"in": [1, "1"]}}}]
ALL = [f for f, _ in EXPECTED] + MORE


def reference(flt: Filter) -> list[int]:
    return [i for i, (label, meta) in enumerate(ROWS, 1) if flt.matches(i, label, meta)]


def vectors(n: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def sqlite_items(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    """A real index folder's SQLite file, written by the folder backend."""
    folder = tmp_path_factory.mktemp("filters") / "index"
    with IndexStore(folder, dim=4) as store:
        assert store.add(vectors(N), [m for _, m in ROWS], [lab for lab, _ in ROWS]) == list(range(1, N + 1))
    db = sqlite3.connect(folder / DB_FILE)
    yield db
    db.close()


@pytest.fixture(scope="module")
def milvus_items(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusStore]:
    """One Milvus Lite collection for the module (making one takes a second)."""
    with MilvusStore(str(tmp_path_factory.mktemp("filters") / "index.db"), dim=4) as store:
        assert store.add(vectors(N), [m for _, m in ROWS], [lab for lab, _ in ROWS]) == list(range(1, N + 1))
        yield store


def sqlite_ids(db: sqlite3.Connection, flt: Filter) -> list[int]:
    where, params = to_sql(flt)
    return [row[0] for row in db.execute(f"SELECT id FROM items WHERE {where} ORDER BY id", params)]


def milvus_ids(store: MilvusStore, flt: Filter) -> list[int]:
    return sorted(int(row["id"]) for row in store._client.query(store.collection, filter=to_milvus(flt),
                                                                output_fields=["id"]))


def parsed(value: Any) -> Filter:
    flt = parse_filter(value)
    assert flt is not None
    return flt


@pytest.mark.parametrize(("value", "ids"), EXPECTED, ids=[json.dumps(f)[:60] for f, _ in EXPECTED])
def test_reference_semantics(value: dict[str, Any], ids: list[int]) -> None:
    assert reference(parsed(value)) == ids


def test_sqlite_answers_like_the_reference(sqlite_items: sqlite3.Connection) -> None:
    for value in ALL:
        flt = parsed(value)
        assert sqlite_ids(sqlite_items, flt) == reference(flt), value


def test_milvus_lite_answers_like_the_reference(milvus_items: MilvusStore) -> None:
    for value in ALL:
        flt = parsed(value)
        if value in LITE_DIFFERS:  # so that the docstring's list stays true
            assert milvus_ids(milvus_items, flt) != reference(flt), value
        else:
            assert milvus_ids(milvus_items, flt) == reference(flt), value


def test_hostile_strings_match_only_themselves(sqlite_items: sqlite3.Connection, milvus_items: MilvusStore) -> None:
    """A client string stays a literal: `" or 1==1 or "` finds the one item that holds it, nothing more."""
    for i, text in enumerate(HOSTILE):
        flt = parsed({"metadata.s": text})
        assert sqlite_ids(sqlite_items, flt) == milvus_ids(milvus_items, flt) == [FIRST_HOSTILE + i], text
    assert milvus_string('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert [milvus_number(v) for v in (-5, 2**63 - 1, 1e-05, 1.5e300, 2.0)] == [
        "-5", "9223372036854775807", "1e-05", "1.5e+300", "2.0"]


def test_sql_reads_fields_as_an_expression_index_does(sqlite_items: sqlite3.Connection) -> None:
    """An expression index made on ``sql_field``'s text serves the filter (SQLite matches expressions as text)."""
    year = sql_field(metadata_field("metadata.year"))
    sqlite_items.execute(f"CREATE INDEX IF NOT EXISTS items_year ON items({year})")
    where, params = to_sql(parsed({"metadata.year": {"gte": 2020}}))
    plan = " ".join(str(row) for row in sqlite_items.execute(f"EXPLAIN QUERY PLAN SELECT id FROM items WHERE {where}",
                                                             params))
    assert "items_year" in plan
    sqlite_items.execute("DROP INDEX items_year")


def test_a_field_index_made_by_an_earlier_version_is_remade(tmp_path: Path) -> None:
    """An index on an earlier reading of a field serves no filter today: opening the store remakes it."""
    folder = tmp_path / "index"
    with IndexStore(folder, dim=4) as store:
        store.add(vectors(3), [{"year": 2020}, {"year": 2021}, {"year": "2022"}])
    with sqlite3.connect(folder / DB_FILE) as db:
        db.execute("""CREATE INDEX "field:metadata.year" ON items(json_extract(metadata, '$."year"'))""")
    where, params = to_sql(parsed({"metadata.year": {"gte": 2021}}))
    with IndexStore(folder, dim=4) as store:
        assert store.stats()["indexed_fields"] == ["metadata.year"]
        with sqlite3.connect(folder / DB_FILE) as db:
            plan = str(db.execute(f"EXPLAIN QUERY PLAN SELECT id FROM items WHERE {where}", params).fetchall())
            assert "field:metadata.year" in plan
            assert [row[0] for row in db.execute(f"SELECT id FROM items WHERE {where}", params)] == [2]


BAD: list[tuple[Any, str]] = [
    ([], "filter: must be an object, got a list"),
    ({"colour": "red"}, 'filter: unknown key "colour"; use label, id, metadata.<path>, and, or, not'),
    ({"or": [{"label": "a"}, {"label": "b"}, {"metadata.year": {"gte": "soon"}}]},
     'filter.or[2]["metadata.year"].gte: "soon" is neither a number nor an ISO-8601 date or time'),
    ({"and": [{"not": {"metadata.year": {"between": [1, 2]}}}]},
     'filter.and[0].not["metadata.year"]: unknown operator "between"; use eq, ne, in, gt, gte, lt, lte'),
    ({"metadata.cam": {"iso": 100}}, "a nested field is written metadata.cam.iso"),
    ({"metadata.tags": ["a", "b"]}, 'filter["metadata.tags"]: a list is not a value; for any of several values'),
    ({"metadata.a b": 1}, 'filter: bad field "metadata.a b": a metadata path has 1 to 4 segments'),
    ({"metadata.": 1}, "bad field"),
    ({"metadata.a..b": 1}, "bad field"),
    ({"metadata.a.b.c.d.e": 1}, "bad field"),
    ({"metadata." + "x" * 65: 1}, "bad field"),
    ({'metadata.a"]': 1}, "bad field"),
    ({"metadata": 1}, "unknown key"),
    ({"label": {"gt": "a"}}, 'filter["label"].gt: a label is text: compare it with eq, ne or in'),
    ({"label": 5}, 'filter["label"]: a label is a string or null, got 5'),
    ({"id": "5"}, 'filter["id"]: id is an integer, got a string'),
    ({"id": None}, "id is an integer, got null"),
    ({"id": {"in": [1, 2.5]}}, 'filter["id"].in[1]: id is an integer, got 2.5'),
    ({"metadata.x": {"gt": True}}, "must be a number or an ISO-8601 date, got a boolean"),
    ({"metadata.x": {"lt": None}}, "must be a number or an ISO-8601 date, got null"),
    ({"metadata.x": {"in": []}}, 'filter["metadata.x"].in: must be a non-empty list of values'),
    ({"metadata.x": {"in": [[1]]}}, 'filter["metadata.x"].in[0]: must be a string, number, boolean or null'),
    ({"metadata.x": {}}, "empty operator object"),
    ({"and": []}, "filter.and: must be a non-empty list"),
    ({"or": [{}]}, "filter.or[0]: empty object"),
    ({"not": [{"label": "a"}]}, "filter.not: must be an object, got a list"),
    ({"metadata.x": float("nan")}, "numbers must be finite"),
    ({"metadata.x": {"gte": float("inf")}}, "numbers must be finite"),
    ({"metadata.x": 2**63}, "integers must lie within"),
    ({"metadata.x": -(2**63)}, "integers must lie within"),
    ({"metadata.x": "x" * 1025}, 'filter["metadata.x"]: a string of 1025 bytes; the limit is 1024'),
    ({"metadata.x": "é" * 513}, "a string of 1026 bytes"),
    ({"metadata.x": "a\0b"}, "cannot contain NUL"),
    ({"metadata.x": "\ud800"}, "not valid Unicode"),
    ({"metadata.x": {"lt": "2024-13-01"}}, "neither a number nor an ISO-8601 date"),
    ("{not json", "filter: not valid JSON"),
    ("[" * 200_000, "filter: "),
    ('{"metadata.x": NaN}', "numbers must be finite"),
]


@pytest.mark.parametrize(("value", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_filters_are_400s_naming_the_part(value: Any, message: str) -> None:
    with pytest.raises(BadInput) as caught:
        parse_filter(value)
    assert caught.value.status == 400 and message in str(caught.value)


def test_bounds_on_depth_and_conditions() -> None:
    deep: dict[str, Any] = {"label": "a"}
    for _ in range(7):
        deep = {"not": deep}
    assert parsed(deep).conditions == 1  # 8 objects deep: allowed
    with pytest.raises(BadInput, match=r"filter(\.not){8}: filters nest at most 8 objects deep"):
        parse_filter({"not": deep})
    many = {"id": {"in": list(range(MAX_CONDITIONS))}}
    assert parsed(many).conditions == MAX_CONDITIONS
    with pytest.raises(BadInput, match=r"filter\.or\[1\]: a filter holds at most 64 conditions"):
        parse_filter({"or": [many, {"label": "a"}]})
    with pytest.raises(BadInput, match=r'filter\["id"\]\.in: a filter holds at most 64'):
        parse_filter({"id": {"in": list(range(65))}})
    started = time.perf_counter()  # a huge list or object is refused before it is read
    for value in ({"id": {"in": list(range(10**6))}}, {f"metadata.k{i}": i for i in range(10**5)},
                  {"or": [{"label": "a"}] * 10**6}):
        with pytest.raises(BadInput, match="at most 64"):
            parse_filter(value)
    assert time.perf_counter() - started < 1.0


def test_absent_or_empty_filter_is_no_filter() -> None:
    assert parse_filter(None) is None and parse_filter({}) is None and parse_filter("{}") is None
    assert parsed('{"label": "cat"}') == parsed({"label": "cat"})  # a multipart form's JSON text


def test_dates_are_rewritten_to_one_shape() -> None:
    def bound(text: str, op: str = "gte") -> Any:
        root = parsed({"metadata.t": {op: text}}).root
        assert isinstance(root, Compare)
        return root.value

    assert bound("2024-01-01T10:00:00+02:00") == "2024-01-01T08:00:00Z"
    assert bound("2024-01-01 10:00") == "2024-01-01T10:00:00Z"
    assert bound("2024-01-01T10:00:00.250Z") == "2024-01-01T10:00:00.250000Z"
    assert bound("20240101") == "2024-01-01" and bound("2024-01-01", "lte") == "2024-01-01~"
    assert parsed({"metadata.t": "2024-01-01T10:00:00+02:00"}).root == parsed(  # equality: the text as given
        {"metadata.t": {"eq": "2024-01-01T10:00:00+02:00"}}).root


def test_selectivity_estimate_from_a_sample() -> None:
    sample = [(i, label, meta) for i, (label, meta) in enumerate(ROWS, 1)]
    assert estimate_fraction(parsed({"label": "x"}), sample) == (8, N)
    assert estimate_fraction(parsed({"label": "x"}), []) == (0, 0)
