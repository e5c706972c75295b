"""Duplicates as users meet them, on both index backends: POST /duplicates and `"dedup": true` on /search over a
real `bentoml serve` of the default model, and `corinfomax index duplicates` over a whole collection. Planted
duplicates: JPEG-q50 re-encodes of real Imagewoof photos (similarity ~0.999 to their original with the default
model; distinct photos of this set stay below 0.85, so the default threshold 0.95 splits them with room)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from servekit import ok, start_service

from bench.launcher import Server
from corinfomax.cli import main
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.index.collections import Collections
from corinfomax.serving.index.factory import open_index, open_layout
from corinfomax.serving.index.originals import Budget

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "default"
COPIED = (0, 7)  # the photos that get a re-encoded copy
ALONE = 2  # a photo without one


def reencoded(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(imagewoof: Path) -> list[bytes]:
    """Two photos of each breed, then the re-encoded copies of those of COPIED (in that order)."""
    originals = [path.read_bytes() for breed in sorted((imagewoof / "val").iterdir())
                 for path in sorted(breed.glob("*.jpg"))[:2]]
    return originals + [reencoded(originals[i]) for i in COPIED]


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


@pytest.fixture(scope="module", params=["index", "index.db"], ids=["folder", "milvus-lite"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("duplicates")
    server: Server = start_service(root, model=str(MODEL), demo_dir="", workers="1", index=str(root / request.param))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http
    server.stop()


@pytest.fixture(scope="module")
def ids(client: httpx.Client, photos: list[bytes]) -> list[int]:
    """The stored ids of ``photos``, in order."""
    metadata = json.dumps([{"photo": i} for i in range(len(photos))])
    return ok(client.post("/add", files=files(photos), data={"metadata": metadata}))["ids"]


def copy_of(ids: list[int], original: int) -> int:
    return ids[-len(COPIED) + COPIED.index(original)]


@pytest.mark.slow
def test_an_image_finds_its_planted_copy_and_nothing_else(client: httpx.Client, photos: list[bytes],
                                                          ids: list[int]) -> None:
    queries = [photos[i] for i in (*COPIED, ALONE)]
    rows = ok(client.post("/duplicates", files=files(queries)))["results"]
    assert [{hit["id"] for hit in row} for row in rows] == [
        {ids[COPIED[0]], copy_of(ids, COPIED[0])}, {ids[COPIED[1]], copy_of(ids, COPIED[1])}, {ids[ALONE]}]
    first = rows[0]
    assert set(first[0]) == {"id", "score", "metadata", "label"} and first[0]["label"] is None
    assert [hit["score"] for hit in first] == sorted((hit["score"] for hit in first), reverse=True)
    assert min(hit["score"] for row in rows for hit in row) >= 0.95
    by_b64 = ok(client.post("/duplicates", json={"images_b64": [base64.b64encode(photos[ALONE]).decode()]}))
    assert [hit["id"] for hit in by_b64["results"][0]] == [ids[ALONE]]
    strict = ok(client.post("/duplicates", files=files([photos[COPIED[0]]]), data={"threshold": "0.99999"}))
    assert [hit["id"] for hit in strict["results"][0]] == [ids[COPIED[0]]]  # itself, not its lossy copy


@pytest.mark.slow
def test_an_id_query_leaves_out_the_item_itself(client: httpx.Client, ids: list[int]) -> None:
    original, copy = ids[COPIED[0]], copy_of(ids, COPIED[0])
    rows = ok(client.post("/duplicates", json={"ids": [original, ids[ALONE], copy, original], "k": 1}))["results"]
    assert [[hit["id"] for hit in row] for row in rows] == [[copy], [], [original]]  # one row per distinct id
    assert rows[0][0]["metadata"] == {"photo": len(ids) - len(COPIED)}


@pytest.mark.slow
def test_dedup_folds_the_copy_into_its_original_and_keeps_k(client: httpx.Client, photos: list[bytes],
                                                            ids: list[int]) -> None:
    original, copy = ids[COPIED[0]], copy_of(ids, COPIED[0])
    plain = ok(client.post("/search", json={"ids": [original], "k": 5}))["results"][0]
    assert {hit["id"] for hit in plain[:2]} == {original, copy} and "duplicates" not in plain[0]
    folded = ok(client.post("/search", json={"ids": [original], "k": 5, "dedup": True}))["results"][0]
    assert len(folded) == 5 and folded[0]["duplicates"] == [copy] and copy not in [hit["id"] for hit in folded]
    assert [hit["id"] for hit in folded] == [hit["id"] for hit in plain if hit["id"] != copy] + [folded[-1]["id"]]
    assert all(hit["duplicates"] == [] for hit in folded[1:])
    by_image = ok(client.post("/search", files=files([photos[COPIED[1]]]), data={"k": "3", "dedup": "true"}))
    assert by_image["results"][0][0]["duplicates"] == [copy_of(ids, COPIED[1])]
    loose = ok(client.post("/search", json={"ids": [original], "k": 3, "dedup": True, "dedup_threshold": 0.5}))
    assert sum(len(hit["duplicates"]) for hit in loose["results"][0]) > 1  # unlike photos fold at a low threshold


@pytest.mark.slow
@pytest.mark.parametrize(("route", "body", "named"), [
    ("/duplicates", {"ids": [1], "threshold": 1.5}, "threshold must be a number in (0, 1]"),
    ("/duplicates", {"ids": [1], "threshold": 0}, "threshold must be a number in (0, 1]"),
    ("/duplicates", {"ids": [1], "threshold": "high"}, "threshold"),
    ("/duplicates", {"ids": [1], "k": 0}, "k must be between 1 and 1000"),
    ("/duplicates", {"ids": [1], "vectors": [[1.0] * 256]}, "give exactly one kind of query"),
    ("/duplicates", {"ids": [1], "dedup": True}, "dedup"),
    ("/search", {"ids": [1], "dedup": True, "dedup_threshold": 2}, "dedup_threshold must be a number in (0, 1]"),
    ("/search", {"ids": [1], "dedup_threshold": 0.9}, "dedup_threshold is used only with dedup: true"),
])
def test_bad_requests_are_400s_naming_the_field(client: httpx.Client, route: str, body: dict[str, Any],
                                                named: str) -> None:
    resp = client.post(route, json=body)
    assert resp.status_code == 400 and named in resp.text, resp.text


@pytest.mark.parametrize("backend", ["index", "index.db"], ids=["folder", "milvus-lite"])
def test_the_cli_reports_the_groups_of_a_collection(backend: str, photos: list[bytes], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    vectors = Embedder(MODEL).embed_images(list(photos))
    location = str(tmp_path / backend)
    with open_index(location, dim=vectors.shape[1]) as store:
        ids = store.add(vectors)
    groups = [[ids[i], copy_of(ids, i)] for i in COPIED]
    run = ["index", "duplicates", "--index", location, "--no-progress", "--out"]
    assert main([*run, str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [group["ids"] for group in report["groups"]] == groups
    assert all(0.95 <= score <= 1 for group in report["groups"] for score in group["scores"])
    assert report["summary"] == {"index": location, "collection": "default", "threshold": 0.95, "items": len(ids),
                                 "pairs": 2, "groups": 2, "items_in_groups": 4}
    assert main([*run, str(tmp_path / "report.csv"), "--threshold", "0.99"]) == 0
    with (tmp_path / "report.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(int(row["group"]), int(row["id"])) for row in rows] == [
        (number, item) for number, group in enumerate(groups, 1) for item in group]
    np.testing.assert_allclose([float(row["score"]) for row in rows[:2]],
                               [float(vectors[COPIED[0]] @ vectors[-2])] * 2, atol=1e-5)
    capsys.readouterr()
    assert main([*run, str(tmp_path / "report.txt")]) == 2
    assert main([*run, str(tmp_path / "r.json"), "--collection", "pets"]) == 2
    assert main([*run, str(tmp_path / "r.json"), "--threshold", "1.5"]) == 2
    errors = capsys.readouterr().err
    assert "error: --out" in errors and "'pets'" in errors and "threshold must be" in errors
    assert "Traceback" not in errors and not (tmp_path / "r.json").exists()


def no_model(key: str) -> Any:
    raise AssertionError(f"vectors only: model {key} is never needed")


@pytest.mark.parametrize("backend", ["index", "index.db"], ids=["folder", "milvus-lite"])
def test_the_cli_reads_the_named_collection(backend: str, tmp_path: Path) -> None:
    record = {"key": "m@1", "name": "m", "version": "1", "dim": 16, "checkpoint_sha256": "m", "path": "/nowhere"}
    vectors = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    vectors[5] = vectors[2]
    location = str(tmp_path / backend)
    collections = Collections(open_layout(location), no_model, Budget())
    collections.open(record, keep_originals=False)
    collections.create("pets", record, keep_originals=False)
    ids = collections.add("pets", vectors, model="m@1")
    collections.add(None, vectors[:3], model="m@1")  # the default collection: no duplicates
    collections.close()
    out = tmp_path / "report.json"
    for name, groups in (("pets", [[ids[2], ids[5]]]), (None, [])):
        assert main(["index", "duplicates", "--index", location, "--out", str(out), "--no-progress",
                     *(["--collection", name] if name else [])]) == 0
        assert [group["ids"] for group in json.loads(out.read_text())["groups"]] == groups
