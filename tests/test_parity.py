"""The same JSON on both index backends, over a real `bentoml serve`: metadata at the edges of what JSON can say is
stored alike, or refused with the same 400; and a Milvus Lite file serves one service at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from servekit import run_cli, start_service

from bench.launcher import Server
from corinfomax.serving.index.backend import MAX_METADATA_DEPTH
from corinfomax.serving.index.snapshot import snapshot as take_snapshot
from corinfomax.serving.index.store import IndexStore

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports


@pytest.fixture(scope="module", params=["index", "index.db"], ids=["folder", "milvus-lite"])
def server(request: pytest.FixtureRequest, tiny_bundle: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("parity")
    srv = start_service(root, model=str(tiny_bundle), demo_dir="", index=str(root / request.param))
    yield srv, root / request.param
    srv.stop()


def nested(depth: int) -> dict[str, Any]:
    """An object nested ``depth`` levels deep (the outer object is level 1)."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# Stored as given, and answered back identically, on both backends.
STORED = {
    "int64 edges": {"max": 2**63 - 1, "min": -(2**63)},
    "floats": {"one": 1.0, "negative zero": -0.0, "huge": 1e308, "tiny": 5e-324, "pi": 3.141592653589793},
    "unicode": {"é😀 key": "ünïcödé 😀 \u202e", "\u4e2d": ["\u0301", "\U0010ffff"]},
    "NUL": {"a\u0000b": "x\u0000y"},
    "nesting at the limit": nested(MAX_METADATA_DEPTH),
    "mixed list": {"a": [1, "x", None, True, {"b": []}, 2.5]},
    "empty key": {"": 0},
}
# Refused with the same 400 (the request writes nothing), the message naming the part: a JSON body, and the
# multipart form's JSON text fields, which Python's parser reads (it takes lone surrogates, where the JSON body's
# parser refuses them).
REFUSED = {
    "2**70": ('{"vectors": [V], "metadata": [{"big": [0, 1180591620717411303424]}]}',
              'metadata[0]["big"][1]: an integer of 71 bits'),
    "-2**63-1": ('{"vectors": [V], "metadata": [{"small": -9223372036854775809}]}',
                 'metadata[0]["small"]: an integer of 64 bits'),
    "NaN": ('{"vectors": [V], "metadata": [{"x": NaN}]}', "not JSON-serialisable"),
    "Infinity": ('{"vectors": [V], "metadata": [{"x": -Infinity}]}', "not JSON-serialisable"),
    "too deep": ('{"vectors": [V], "metadata": [' + '{"a": ' * MAX_METADATA_DEPTH + "{}" + "}" * MAX_METADATA_DEPTH
                 + "]}", f"nested deeper than {MAX_METADATA_DEPTH} levels"),
    "lone surrogate in JSON": ('{"vectors": [V], "metadata": [{"s": "a\\ud800"}]}', "Invalid JSON"),
}
REFUSED_FORM = {
    "lone surrogate": ({"metadata": '[{"s": "a\\ud800"}]'}, 'metadata[0]["s"]: a string with a lone UTF-16'),
    "lone surrogate key": ({"metadata": '[{"\\udfff": 1}]'}, 'metadata[0] key "\\udfff": a string with a lone'),
    "2**64 in a form": ({"metadata": '[{"n": 18446744073709551616}]'}, 'metadata[0]["n"]: an integer of 65 bits'),
}


def vector(seed: int) -> list[float]:
    return np.random.default_rng(seed).normal(size=256).tolist()


@pytest.mark.parametrize("case", sorted(STORED))
def test_metadata_is_stored_alike(server: tuple[Server, Path], case: str) -> None:
    with httpx.Client(base_url=server[0].url, timeout=60) as http:
        added = http.post("/add", json={"vectors": [vector(1)], "metadata": [STORED[case]]})
        assert added.status_code == 200, added.text
        (item,) = added.json()["ids"]
        got = http.post("/get", json={"id": item}).json()["metadata"]
        found = http.post("/search", json={"vectors": [vector(1)], "k": 1}).json()["results"][0][0]
        http.post("/delete", json={"ids": [item]})
    assert got == STORED[case] and repr(got) == repr(STORED[case])  # -0.0 stays -0.0, 1.0 stays a float
    assert found["id"] == item and found["metadata"] == STORED[case]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_metadata_beyond_what_both_store_is_the_same_400(server: tuple[Server, Path], case: str) -> None:
    body, message = REFUSED[case]
    with httpx.Client(base_url=server[0].url, timeout=60) as http:
        count = http.post("/stats", json={}).json()["count"]
        resp = http.post("/add", content=body.replace("V", str(vector(2))),
                         headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        assert message in resp.json()["error"]
        assert http.post("/stats", json={}).json()["count"] == count


@pytest.mark.parametrize("case", sorted(REFUSED_FORM))
def test_form_metadata_beyond_what_both_store_is_the_same_400(server: tuple[Server, Path], cifar10: Path,
                                                              case: str) -> None:
    fields, message = REFUSED_FORM[case]
    image = (cifar10 / "test" / "cat" / "0000.jpg").read_bytes()
    with httpx.Client(base_url=server[0].url, timeout=60) as http:
        count = http.post("/stats", json={}).json()["count"]
        resp = http.post("/add", files=[("images", ("cat.jpg", image, "image/jpeg"))], data=fields)
        assert resp.status_code == 400 and message in resp.json()["error"], resp.text
        assert http.post("/stats", json={}).json()["count"] == count


def test_a_second_service_on_one_lite_file_refuses_to_start(server: tuple[Server, Path], tiny_bundle: Path,
                                                            tmp_path: Path) -> None:
    first, location = server
    if location.suffix != ".db":
        pytest.skip("an index folder is shared by processes through SQLite")
    with pytest.raises(RuntimeError, match=f"Milvus Lite file {location} is in use by another process"):
        start_service(tmp_path, model=str(tiny_bundle), demo_dir="", index=str(location))
    snapshot = run_cli("index", "snapshot", "--index", str(location), "--to", str(tmp_path / "snap"))
    assert snapshot.returncode == 2 and f"Milvus Lite file {location} is in use" in snapshot.stderr
    assert "Traceback" not in snapshot.stderr and not (tmp_path / "snap").exists()
    with IndexStore(tmp_path / "other", dim=256) as other:
        other.add([vector(4)])
    take_snapshot(str(tmp_path / "other"), tmp_path / "snap", progress=False)
    forced = run_cli("index", "restore", "--from", str(tmp_path / "snap"), "--index", str(location), "--force")
    assert forced.returncode == 2 and f"Milvus Lite file {location} is in use" in forced.stderr  # not replaced
    with httpx.Client(base_url=first.url, timeout=60) as http:  # the first keeps serving, reads and writes
        (item,) = http.post("/add", json={"vectors": [vector(3)]}).json()["ids"]
        assert http.post("/search", json={"vectors": [vector(3)], "k": 1}).json()["results"][0][0]["id"] == item
        assert http.get("/readyz").status_code == 200
