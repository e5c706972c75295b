"""Filters on an item's id, label and metadata: one grammar, parsed and validated once into a small typed tree.

``parse_filter`` turns a request's ``"filter"`` into a ``Filter`` (or refuses it with a 400 naming the bad part,
e.g. ``filter.or[2]["metadata.year"].gte: ...``). From the tree, ``Filter.matches`` evaluates one item in
Python (the reference the compilers are tested against, usable as a post-filter), and
``serving.index.filter_compile`` turns it into a parameterised SQLite WHERE clause and a Milvus expression.

The grammar (an object; several keys in one object must all hold)::

    {"label": "cat"}                        equality; also null (unlabelled)
    {"id": {"in": [3, 5, 8]}}               operators: eq, ne, in, gt, gte, lt, lte (several: all must hold)
    {"metadata.camera.iso": {"gte": 800}}   a dot path into the metadata, segments [A-Za-z0-9_-]{1,64}, <= 4
    {"metadata.taken": {"lt": "2024-06-01"}}
    {"and": [...]}, {"or": [...]}, {"not": {...}}

Semantics, the same on every backend:
- Types are JSON's and never mix: a number never equals a string or a boolean (``1`` is not ``true`` and not
  ``"1"``); a comparison holds only for a value of the literal's type. A condition on a field that is missing
  (or whose parent is not an object) is false, and ``not``/``ne`` are its exact complement, so ``{"metadata.x":
  {"ne": 1}}`` matches items without ``x``. ``null`` matches a JSON null or a missing field.
- ``gt/gte/lt/lte`` take numbers or ISO-8601 dates. Dates are compared as text, so store them in one shape per
  field: ``2024-03-05T10:00:00Z`` (UTC, ``Z``) or ``2024-03-05`` (a day). A literal is checked with
  ``datetime.fromisoformat`` and rewritten to that shape: a time in UTC (no offset means UTC; a fraction of a
  second is kept as six digits, so compare it only with values stored with one), a day as ``YYYY-MM-DD``,
  which as a bound covers the whole day (``gt``/``lte`` a day compare with the end of that day).
- Arrays and objects in metadata equal nothing (no "contains"); ``eq`` with a date string is plain text equality.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Any, Callable, Iterable, Literal

from corinfomax.core.errors import BadInput

MAX_DEPTH = 8  # nesting of filter objects (and/or elements, not)
MAX_CONDITIONS = 64  # comparisons in one filter, each value of an `in` counting one
MAX_STRING_BYTES = 1024  # per string literal, UTF-8
MAX_PATH_DEPTH = 4  # metadata.a.b.c.d
MAX_TEXT_BYTES = 512 << 10  # a filter as JSON text (a form field): 64 strings of 1 KiB, each byte escaped as \uXXXX
MAX_INT = 2**63 - 1  # literals are 64-bit on every engine (-2**63 excluded: Milvus parses 2**63, then negates)
SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A day as an upper bound: every text that starts with the day ("2024-01-01", "2024-01-01T10:00:00Z", or with
# a space) sorts below day + "~", the highest printable ASCII character, and every later day above it.
DAY_END = "~"

Scalar = None | bool | int | float | str
Op = Literal["eq", "gt", "gte", "lt", "lte"]
ORDER: dict[str, Callable[[Any, Any], bool]] = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt,
                                                "lte": operator.le}
OPERATORS = ("eq", "ne", "in", "gt", "gte", "lt", "lte")


@dataclass(frozen=True)
class Field:
    """What a condition looks at: ``id``, ``label``, or a path into the metadata."""

    kind: Literal["id", "label", "metadata"]
    path: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return ".".join((self.kind, *self.path))


@dataclass(frozen=True)
class Compare:
    """``field op value``; ``negated``: its exact complement (only in ``Filter.normal``)."""

    field: Field
    op: Op
    value: Scalar  # an order comparison's date is already its comparison text
    negated: bool = False


@dataclass(frozen=True)
class And:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    part: Node


Node = Compare | And | Or | Not


@dataclass(frozen=True)
class Filter:
    """A validated filter: ``root`` as written, ``normal`` the same with every ``not`` pushed into the leaves
    (what the compilers translate: engines with three-valued logic, such as Milvus, cannot then turn a missing
    field's "unknown" into a match or a miss that the reference does not make)."""

    root: Node
    conditions: int

    @property
    def normal(self) -> Node:
        return _push_not(self.root, False)

    def matches(self, item_id: int, label: str | None, metadata: dict[str, Any]) -> bool:
        """Whether one item passes (the reference semantics of the module docstring)."""
        return _holds(self.root, item_id, label, metadata)


def parse_filter(value: Any, where: str = "filter") -> Filter | None:
    """A request's filter (an object, or its JSON text from a form field) validated into a ``Filter``; None for
    no filter (absent, null or ``{}``). Raises BadInput naming the bad part."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        value = _from_text(value, where)
    if isinstance(value, dict) and not value:
        return None
    parser = _Parser()
    root = parser.node(value, where, 1)
    return Filter(root, parser.conditions)


def estimate_fraction(flt: Filter, sample: Iterable[tuple[int, str | None, dict[str, Any]]]) -> tuple[int, int]:
    """(matching, sampled) among ``sample`` rows of (id, label, metadata): the selectivity estimate a backend
    makes from a cached random sample of its rows to choose between scoring the few matching items exactly
    and searching wider with a post-filter (both are correct; the estimate only decides which is faster)."""
    matched = sampled = 0
    for item_id, label, metadata in sample:
        sampled += 1
        matched += flt.matches(item_id, label, metadata)
    return matched, sampled


def metadata_field(name: Any, where: str = "field") -> Field:
    """A ``metadata.<path>`` field name validated (e.g. for an expression index on the field)."""
    field = _field(name, where)
    if field.kind != "metadata":
        raise BadInput(f"{where}: give a metadata field as metadata.<path>, got {_show(name)}")
    return field


# -- parsing ------------------------------------------------------------------------------------------


def _from_text(text: str | bytes, where: str) -> Any:
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_TEXT_BYTES:
        raise BadInput(f"{where}: {size} bytes of JSON; the limit is {MAX_TEXT_BYTES}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: brackets nested deeper than the parser goes
        raise BadInput(f"{where}: not valid JSON ({str(err)[:100]})") from None


class _Parser:
    """Walks a filter once, counting conditions so that no list or object is read past the limits."""

    def __init__(self) -> None:
        self.conditions = 0

    def node(self, obj: Any, where: str, depth: int) -> Node:
        if not isinstance(obj, dict):
            raise BadInput(f"{where}: must be an object, got {_kind(obj)}")
        if depth > MAX_DEPTH:
            raise BadInput(f"{where}: filters nest at most {MAX_DEPTH} objects deep")
        if not obj:
            raise BadInput(f"{where}: empty object; give at least one condition")
        self._room(len(obj), where)  # every key holds at least one condition
        parts = [self._entry(key, value, where, depth) for key, value in obj.items()]
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def _entry(self, key: Any, value: Any, where: str, depth: int) -> Node:
        if key in ("and", "or"):
            here = f"{where}.{key}"
            if not isinstance(value, list) or not value:
                raise BadInput(f"{here}: must be a non-empty list of filter objects, got {_kind(value)}")
            self._room(len(value), here)
            parts = tuple(self.node(part, f"{here}[{i}]", depth + 1) for i, part in enumerate(value))
            return parts[0] if len(parts) == 1 else (And(parts) if key == "and" else Or(parts))
        if key == "not":
            return Not(self.node(value, f"{where}.not", depth + 1))
        field = _field(key, where)
        return self._condition(field, value, f"{where}[{_show(key)}]")

    def _condition(self, field: Field, value: Any, where: str) -> Node:
        if isinstance(value, list):
            raise BadInput(f"{where}: a list is not a value; for any of several values write {{\"in\": [...]}}")
        if not isinstance(value, dict):
            return self._compare(field, "eq", value, where)
        if not value:
            raise BadInput(f"{where}: empty operator object; use one of {', '.join(OPERATORS)}")
        self._room(len(value), where)
        parts = [self._operator(field, op, operand, where) for op, operand in value.items()]
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def _operator(self, field: Field, op: Any, operand: Any, where: str) -> Node:
        here = f"{where}.{op}" if isinstance(op, str) and op in OPERATORS else where
        if op == "in":
            if not isinstance(operand, list) or not operand:
                raise BadInput(f"{here}: must be a non-empty list of values, got {_kind(operand)}")
            self._room(len(operand), here)
            parts = tuple(self._compare(field, "eq", v, f"{here}[{i}]") for i, v in enumerate(operand))
            return parts[0] if len(parts) == 1 else Or(parts)
        if op == "ne":
            return Not(self._compare(field, "eq", operand, here))
        if op in ("eq", "gt", "gte", "lt", "lte"):
            return self._compare(field, op, operand, here)
        nested = f" (a nested field is written {field.name}.{op})" if field.kind == "metadata" else ""
        raise BadInput(f"{where}: unknown operator {_show(op)}; use {', '.join(OPERATORS)}{nested}")

    def _compare(self, field: Field, op: Op, value: Any, where: str) -> Compare:
        self._room(1, where)
        self.conditions += 1
        if op == "eq":
            return Compare(field, op, self._literal(field, value, where))
        return Compare(field, op, _bound(field, op, value, where))

    def _literal(self, field: Field, value: Any, where: str) -> Scalar:
        """A value an equality can compare ``field`` with."""
        if field.kind == "id":
            return _integer(value, where, "id is an integer")
        if field.kind == "label" and not (value is None or isinstance(value, str)):
            raise BadInput(f"{where}: a label is a string or null, got {_kind(value)}")
        if isinstance(value, str):
            return _string(value, where)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return _number(value, where)
        raise BadInput(f"{where}: must be a string, number, boolean or null, got {_kind(value)}")

    def _room(self, needed: int, where: str) -> None:
        if self.conditions + needed > MAX_CONDITIONS:
            raise BadInput(f"{where}: a filter holds at most {MAX_CONDITIONS} conditions (each value of an `in` "
                           "counts one)")


def _field(key: Any, where: str) -> Field:
    if key in ("id", "label"):
        return Field(key)
    if isinstance(key, str) and key.startswith("metadata.") and len(key) <= 9 + MAX_PATH_DEPTH * 65:
        path = tuple(key[9:].split("."))
        if len(path) <= MAX_PATH_DEPTH and all(SEGMENT.fullmatch(segment) for segment in path):
            return Field("metadata", path)
        raise BadInput(f"{where}: bad field {_show(key)}: a metadata path has 1 to {MAX_PATH_DEPTH} segments of "
                       "1 to 64 letters, digits, _ or -, joined by dots")
    raise BadInput(f"{where}: unknown key {_show(key)}; use label, id, metadata.<path>, and, or, not")


def _bound(field: Field, op: str, value: Any, where: str) -> Scalar:
    """The literal of an order comparison: an integer id, a number, or a date as comparison text."""
    if field.kind == "id":
        return _integer(value, where, "id is an integer")
    if field.kind == "label":
        raise BadInput(f"{where}: a label is text: compare it with eq, ne or in")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number(value, where)
    if isinstance(value, str):
        return _date_text(_string(value, where), op, where)
    raise BadInput(f"{where}: must be a number or an ISO-8601 date, got {_kind(value)}")


def _date_text(text: str, op: str, where: str) -> str:
    """An ISO-8601 date or time in the one shape dates are compared in (module docstring)."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        return day.isoformat() + (DAY_END if op in ("gt", "lte") else "")
    try:
        moment = datetime.fromisoformat(text)
        moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadInput(f"{where}: {_show(text)} is neither a number nor an ISO-8601 date or time") from None
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _integer(value: Any, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{where}: {what}, got {_kind(value)}")
    return int(_number(value, where))


def _number(value: int | float, where: str) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInput(f"{where}: numbers must be finite, got {value}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise BadInput(f"{where}: integers must lie within ±(2**63-1), got {str(value)[:40]}")
    return value


def _string(text: str, where: str) -> str:
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise BadInput(f"{where}: not valid Unicode (a lone surrogate)") from None
    if size > MAX_STRING_BYTES:
        raise BadInput(f"{where}: a string of {size} bytes; the limit is {MAX_STRING_BYTES}")
    if "\0" in text:  # SQLite's JSON functions end a string at NUL: it could not be compared exactly
        raise BadInput(f"{where}: strings in a filter cannot contain NUL (U+0000)")
    return text


def _kind(value: Any) -> str:
    """What a value is, for a message; never the text of a container (a form's JSON may nest as deep as Python's
    parser goes, deeper than ``json.dumps`` can then write it back)."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds[type(value)] if type(value) in kinds else _show(value)


def _show(value: Any) -> str:
    """A client's value in a message: JSON, cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


# -- the tree: negation pushed to the leaves, and the reference evaluation --------------------------------------


def _push_not(node: Node, negated: bool) -> Node:
    if isinstance(node, Not):
        return _push_not(node.part, not negated)
    if isinstance(node, (And, Or)):
        parts = tuple(_push_not(part, negated) for part in node.parts)
        # De Morgan: not (a and b) = (not a) or (not b), and the other way round
        return Or(parts) if isinstance(node, And) == negated else And(parts)
    return replace(node, negated=node.negated != negated)


_MISSING = None  # a missing field reads as null: the same for every condition


def _value(field: Field, item_id: int, label: str | None, metadata: dict[str, Any]) -> Any:
    if field.kind == "id":
        return item_id
    if field.kind == "label":
        return label
    value: Any = metadata
    for segment in field.path:
        if not isinstance(value, dict) or segment not in value:
            return _MISSING
        value = value[segment]
    return value


def _holds(node: Node, item_id: int, label: str | None, metadata: dict[str, Any]) -> bool:
    if isinstance(node, And):
        return all(_holds(part, item_id, label, metadata) for part in node.parts)
    if isinstance(node, Or):
        return any(_holds(part, item_id, label, metadata) for part in node.parts)
    if isinstance(node, Not):
        return not _holds(node.part, item_id, label, metadata)
    stored = _value(node.field, item_id, label, metadata)
    found = _same_type(stored, node.value) and (stored == node.value if node.op == "eq" else
                                                ORDER[node.op](stored, node.value))
    return found != node.negated


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_type(stored: Any, literal: Scalar) -> bool:
    """Whether ``stored`` is of ``literal``'s JSON type (bool apart from numbers, unlike Python)."""
    if literal is None:
        return stored is None
    if isinstance(literal, bool):
        return isinstance(stored, bool)
    if isinstance(literal, str):
        return isinstance(stored, str)
    return _is_number(stored)

