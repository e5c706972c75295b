"""`index snapshot` and `index restore`: a copy taken while a service writes holds every item acknowledged before it
began and answers like the original; a snapshot killed midway, or changed afterwards, is refused before anything is
restored; a Milvus Lite index goes through the folder format and back."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from collectionkit import MODELS, add_images, ids_of, opened, record
from docskit import section, table_keys
from servekit import run_cli, start_service

from corinfomax.core.errors import UserError
from corinfomax.serving.index.factory import open_index
from corinfomax.serving.index.milvus import MilvusStore
from corinfomax.serving.index.originals import read_source
from corinfomax.serving.index.restore import SnapshotInvalid, restore, verify
from corinfomax.serving.index.snapshot import MANIFEST, snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def jpegs(cifar10: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((cifar10 / "test" / "dog").glob("*.jpg"))[:16]]


def top_hits(location: str, name: str | None, key: str, images: list[bytes]) -> list[list[tuple[int, float]]]:
    collections, _ = opened(location)
    try:
        with collections.reading(name, model=key) as store:
            found = store.search(MODELS[key].embed(images), k=5)
    finally:
        collections.close()
    return [[(hit.id, round(hit.score, 5)) for hit in row] for row in found]


def test_a_folder_snapshot_restores_every_collection_generation_and_original(tmp_path: Path,
                                                                             jpegs: list[bytes]) -> None:
    location = str(tmp_path / "index")
    collections, jobs = opened(location)
    first = add_images(collections, jpegs[:10])
    assert jobs.start(None, record("b@1"), background=False).state == "done"  # live g2, previous g1 kept
    collections.create("pets", record("b@1"), keep_originals=True)
    pets = add_images(collections, jpegs[10:16], "pets", "b@1")
    manifest = snapshot(location, tmp_path / "snap", progress=False)  # the collections are open, as in a service
    collections.close()

    assert manifest["collections"]["default"]["live"] == 2
    assert {n: g["count"] for n, g in manifest["collections"]["default"]["generations"].items()} == {"1": 10, "2": 10}
    assert manifest["missing_originals"] == [] and (tmp_path / "snap" / MANIFEST).is_file()
    assert not [entry for entry in manifest["files"] if entry["path"].endswith(("-wal", "-shm"))]  # one file each
    assert set(manifest) in table_keys(section("5. Index"))  # docs/FORMATS.md section 5d lists every field
    restored = str(tmp_path / "restored")
    assert restore(tmp_path / "snap", restored, progress=False)["items"] == 16
    again, _ = opened(restored)
    assert ids_of(again) == first and ids_of(again, "pets") == pets
    state = again.state("pets")
    assert state.originals is not None
    assert [read_source(row.source or "", state.originals) for row in state.live.stored(pets)] == jpegs[10:16]
    again.close()
    for name, key, images in ((None, "b@1", jpegs[:10]), ("pets", "b@1", jpegs[10:16])):
        assert top_hits(restored, name, key, images) == top_hits(location, name, key, images)


def test_a_changed_or_partial_snapshot_is_refused_before_the_target_is_touched(tmp_path: Path,
                                                                               jpegs: list[bytes]) -> None:
    location = str(tmp_path / "index")
    collections, _ = opened(location)
    add_images(collections, jpegs[:4])
    collections.close()
    snapshot(location, tmp_path / "snap", progress=False)
    with pytest.raises(UserError, match="not an empty folder"):
        snapshot(location, tmp_path / "snap", progress=False)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty: .*--force"):
        restore(tmp_path / "snap", str(target), progress=False)

    for name, damage, message in (
        ("flipped", lambda snap: flip_a_byte(snap / "index.sqlite"), "index.sqlite does not match its sha256"),
        ("grown", lambda snap: (snap / "catalog.sqlite").open("ab").write(b"x"), "catalog.sqlite has \\d+ bytes"),
        ("gone", lambda snap: next(snap.rglob("??/??/*")).unlink(), "collections/default/originals/.* is missing"),
        ("partial", lambda snap: (snap / MANIFEST).unlink(), "no manifest.json: .*did not finish"),
        ("escaping", lambda snap: add_entry(snap, "../outside"), "not a file of the snapshot"),
    ):
        copy = tmp_path / name
        shutil.copytree(tmp_path / "snap", copy)
        damage(copy)
        with pytest.raises(SnapshotInvalid, match=message):
            restore(copy, str(target), force=True, progress=False)
        assert [p.name for p in target.iterdir()] == ["keep.txt"]  # refused before anything was written
    restore(tmp_path / "snap", str(target), force=True, progress=False)
    assert not (target / "keep.txt").exists() and verify(tmp_path / "snap")["files"]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def add_entry(snap: Path, path: str) -> None:
    manifest = json.loads((snap / MANIFEST).read_text())
    manifest["files"].append({"path": path, "bytes": 1, "sha256": "0" * 64})
    (snap / MANIFEST).write_text(json.dumps(manifest))


def test_a_milvus_lite_index_round_trips_through_the_folder_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8))
    metadata = [{"n": i, "text": "é😀\u0000", "deep": {"a": [1.5, None, True]}} for i in range(30)]
    labels = [None if i % 3 else f"class{i % 2}" for i in range(30)]
    lite = str(tmp_path / "index.db")
    with MilvusStore(lite, dim=8, model_sha256="m") as store:
        ids = store.add(vectors, metadata, labels, [b"\xff\xd8thumb" if i % 2 else None for i in range(30)])
        store.delete(ids[:2])
        before = store.search(vectors, k=5)
    manifest = snapshot(lite, tmp_path / "snap", progress=False)
    assert manifest["backend"] == "milvus" and manifest["collections"]["default"]["generations"]["1"]["count"] == 28
    restore(tmp_path / "snap", str(tmp_path / "folder"), progress=False)
    with open_index(str(tmp_path / "folder")) as folder:  # the snapshot keeps Milvus' ids
        assert folder.id_list().tolist() == sorted(ids[2:])
    with pytest.raises(UserError, match="exists: .*--force"):
        restore(tmp_path / "snap", lite, progress=False)
    back = str(tmp_path / "back.db")
    restore(tmp_path / "snap", back, id_map=tmp_path / "ids.json", progress=False)
    new_id = {int(old): new for old, new in json.loads((tmp_path / "ids.json").read_text()).items()}
    with MilvusStore(back) as store:
        assert store.count() == 28 and store.thumbnail(new_id[ids[3]]) == b"\xff\xd8thumb"
        for old in ids[2:]:
            item = store.get(new_id[old])
            assert item.metadata == metadata[ids.index(old)] and item.label == labels[ids.index(old)]
        after = store.search(vectors, k=5)
    assert [[(new_id[h.id], round(h.score, 5)) for h in row] for row in before] == \
        [[(h.id, round(h.score, 5)) for h in row] for row in after]


# -- against a real service ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_snapshot_under_write_load_holds_every_acknowledged_item(tiny_bundle: Path, tmp_path: Path) -> None:
    for root in ("one", "two"):
        (tmp_path / root).mkdir()
    server = start_service(tmp_path / "one", model=str(tiny_bundle), demo_dir="", workers="2")
    acknowledged: list[tuple[float, int, list[float]]] = []  # (when the answer came, id, vector)
    stop, errors = threading.Event(), []

    def write() -> None:
        rng = np.random.default_rng(1)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                vectors = rng.normal(size=(4, 256))
                resp = http.post("/add", json={"vectors": vectors.tolist(), "metadata": [{"w": 1}] * 4})
                if resp.status_code != 200:
                    errors.append(resp.text)
                    return
                now = time.time()
                acknowledged.extend((now, i, v.tolist()) for i, v in zip(resp.json()["ids"], vectors))

    writer = threading.Thread(target=write)
    try:
        writer.start()
        while len(acknowledged) < 40:
            time.sleep(0.05)
        began = time.time()
        taken = run_cli("index", "snapshot", "--index", str(tmp_path / "one" / "index"),
                           "--to", str(tmp_path / "snap"), "--no-progress")
        ended = time.time()
        stop.set()
        writer.join()
    finally:
        stop.set()
        server.stop()
    assert taken.returncode == 0 and not errors, taken.stderr + "".join(errors)
    before = [(i, v) for when, i, v in acknowledged if when < began]
    assert any(began <= when < ended for when, _, _ in acknowledged)  # the service wrote while it was taken
    assert run_cli("index", "restore", "--from", str(tmp_path / "snap"), "--index",
                      str(tmp_path / "two" / "index"), "--no-progress").returncode == 0
    restored = start_service(tmp_path / "two", model=str(tiny_bundle), demo_dir="")
    try:
        with httpx.Client(base_url=restored.url, timeout=60) as http:
            found = http.post("/search", json={"vectors": [v for _, v in before], "k": 1}).json()["results"]
            count = http.post("/stats", json={}).json()["count"]
    finally:
        restored.stop()
    assert [row[0]["id"] for row in found] == [i for i, _ in before]
    assert all(row[0]["metadata"] == {"w": 1} and row[0]["score"] > 0.9999 for row in found)
    assert len(before) <= count <= len(acknowledged)


@pytest.mark.slow
def test_a_snapshot_killed_midway_is_refused(tmp_path: Path, jpegs: list[bytes]) -> None:
    location = str(tmp_path / "index")
    collections, _ = opened(location)
    add_images(collections, jpegs[:4])
    collections.close()
    # The snapshot stops after its first generation's FAISS files, then is killed as a crash would kill it.
    script = ("import sys, time\n"
              "from corinfomax.serving.index import snapshot\n"
              "copy = snapshot._copy_faiss\n"
              "def stall(*args):\n"
              "    copy(*args)\n"
              "    print('copied', flush=True)\n"
              "    time.sleep(600)\n"
              "snapshot._copy_faiss = stall\n"
              "snapshot.snapshot(sys.argv[1], sys.argv[2], progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, location, str(tmp_path / "snap")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "copied\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "snap" / "index.sqlite").is_file()  # part of it was written
    refused = run_cli("index", "restore", "--from", str(tmp_path / "snap"), "--index", str(tmp_path / "back"))
    assert refused.returncode == 2 and "no manifest.json" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "back").exists()
