"""A new model for a live collection, over real HTTP on both backends (an index folder and Milvus Lite): load a
second bundle (and refuse broken ones), re-embed a collection with originals to it while clients add, delete and
search, switch, roll back, kill -9 a job midway and restart, drop. One `bentoml serve` per backend."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from servekit import CLASSES, ok, post_retrying, start_service

from bench.launcher import Server
from corinfomax.core.bundle import CARD_FILE, MODEL_FILE, VERIFY_FILE, read_card

pytestmark = pytest.mark.slow  # a server subprocess and a model export

API_KEY = "walk-key"
ITEMS = 300  # in the walked collection: its copy must take long enough to be written to and killed midway


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory, cifar10: Path) -> Path:
    """Another model: a tiny ResNet of another seed at 24 px, exported verified (it carries verify.npz)."""
    import torch

    from corinfomax.export.bundle import export_bundle
    from corinfomax.training.checkpoint import save_checkpoint
    from corinfomax.training.config import resolve
    from corinfomax.training.loss import CorInfoMaxLoss
    from corinfomax.training.models import CorInfoMaxModel

    torch.manual_seed(1)
    config = resolve("cpu", {"projector": "64-32", "epochs": 1, "image_size": 24})
    model = CorInfoMaxModel(config.backbone, config.projector, config.cifar_stem)
    root = tmp_path_factory.mktemp("second")
    save_checkpoint(root / "checkpoint.pt", {"config": config.to_dict(), "model": model.state_dict(),
                                             "loss": CorInfoMaxLoss(model.embedding_dim).state_dict(), "epoch": 1})
    return export_bundle(root / "checkpoint.pt", root / "bundle", name="second", verify_data=cifar10 / "test",
                         verify_images=16)


@pytest.fixture(scope="module", params=["index", "index.db"], ids=["folder", "milvus-lite"])
def server(request: pytest.FixtureRequest, tiny_bundle: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("walk")
    shutil.copytree(tiny_bundle, root / "models" / "tiny")
    srv = start_service(root, model=str(root / "models" / "tiny"), models=str(root / "models"), demo_dir="",
                        api_key=API_KEY, workers="2", index=str(root / request.param))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=120) as http:
        yield http


def images(cifar10: Path, count: int, offset: int = 0) -> list[Path]:
    """``count`` distinct CIFAR-10 test JPEGs, classes in turn."""
    return [cifar10 / "test" / CLASSES[i % 10] / f"{offset + i // 10:04d}.jpg" for i in range(count)]


def add(client: httpx.Client, paths: list[Path], collection: str = "walk", key: str | None = None) -> list[int]:
    data = {"collection": json.dumps(collection), **({"idempotency_key": json.dumps(key)} if key else {})}
    return ok(post_retrying(client, "/add", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths],
                            data=data))["ids"]


def top(client: httpx.Client, path: Path, collection: str = "walk") -> dict[str, Any]:
    return ok(post_retrying(client, "/search", files=[("images", (path.name, path.read_bytes(), "image/jpeg"))],
                            data={"k": "1", "collection": json.dumps(collection)}))["results"][0][0]


def collection(client: httpx.Client, name: str = "walk") -> dict[str, Any]:
    (found,) = [c for c in ok(client.post("/collections", json={}))["collections"] if c["name"] == name]
    return found


def wait_for(client: httpx.Client, job: str, seconds: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while (state := ok(client.post("/jobs", json={"job": job})))["state"] == "running":
        assert time.monotonic() < deadline, state
        time.sleep(0.3)
    return state


def broken_bundles(second: Path, models: Path) -> None:
    """Three bundles that must be refused: a bad card, a model onnxruntime cannot load, and a model whose
    verification images no longer embed as they did at export (another model's weights under this card)."""
    card = json.loads((second / CARD_FILE).read_text())
    for name, version in (("bad-card", None), ("bad-onnx", "v-onnx"), ("bad-parity", "v-parity")):
        shutil.copytree(second, models / name)
        if version is None:
            (models / name / CARD_FILE).write_text(json.dumps({**card, "format": "something-else/9"}))
            continue
        (models / name / CARD_FILE).write_text(json.dumps({**card, "version": version}))
    (models / "bad-onnx" / MODEL_FILE).write_bytes(b"not an onnx model" * 10)
    with np.load(second / VERIFY_FILE) as data:
        np.savez(models / "bad-parity" / VERIFY_FILE, pixels=data["pixels"], embeddings=data["embeddings"][::-1])


def test_models_load_checked_and_broken_ones_are_refused(server: Server, client: httpx.Client,
                                                         second_bundle: Path) -> None:
    models = Path(server.env["CORINFOMAX_MODELS"])
    for path in ("/reload_models", "/collections", "/reembed", "/jobs", "/rollback", "/drop_collection"):
        assert httpx.post(f"{server.url}{path}", json={}).status_code == 401  # management needs the key
    (tiny,) = ok(client.post("/info", json={}))["models"]
    assert tiny["memory_bytes"] > 0 and tiny["verified_images"] == 0 and "path" not in tiny
    broken_bundles(second_bundle, models)
    shutil.copytree(second_bundle, models / "second")
    answer = ok(client.post("/reload_models", json={}))
    assert [key.split("@")[0] for key in answer["loaded"]] == ["second"]
    reasons = {entry["path"]: entry["error"] for entry in answer["refused"]}
    assert set(reasons) == {"bad-card", "bad-onnx", "bad-parity"}, reasons
    assert "format" in reasons["bad-card"] and "onnxruntime cannot load" in reasons["bad-onnx"]
    assert "embed differently here than in PyTorch" in reasons["bad-parity"]
    second = next(m for m in answer["models"] if m["name"] == "second")
    assert second["verified_images"] == 8 and second["memory_bytes"] > 0
    for name in ("bad-card", "bad-onnx", "bad-parity"):
        shutil.rmtree(models / name)
    assert ok(client.post("/reload_models", json={}))["loaded"] == []  # loaded once


def test_embed_takes_a_model(client: httpx.Client, cifar10: Path) -> None:
    (path,) = images(cifar10, 1)
    upload = [("images", (path.name, path.read_bytes(), "image/jpeg"))]
    default = ok(client.post("/embed", files=upload))
    second = ok(client.post("/embed", files=upload, data={"model": '"second"'}))
    assert default["model"] != "second" and second["model"] == "second" and second["dim"] == 256
    assert not np.allclose(default["embeddings"], second["embeddings"], atol=1e-3)
    unknown = client.post("/embed", files=upload, data={"model": '"third"'})
    assert unknown.status_code == 404 and "no model 'third' is loaded" in unknown.json()["error"]


@pytest.fixture(scope="module")
def tiny(tiny_bundle: Path) -> str:
    """The first model's name (the collections start with it)."""
    return read_card(tiny_bundle).name


@pytest.fixture(scope="module")
def walk(server: Server) -> dict[int, Path]:
    """The walked collection's items as the tests acknowledged them: id -> image."""
    return {}


class Writers:
    """Clients adding (keyed), deleting and searching the collection until stopped; what was acknowledged."""

    def __init__(self, server: Server, paths: list[Path]) -> None:
        self.server, self.paths = server, paths
        self.added: dict[int, Path] = {}
        self.deleted: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.work, args=(i,)) for i in range(2)]

    def __enter__(self) -> "Writers":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def work(self, worker: int) -> None:
        mine: list[int] = []  # this client's items, each deleted by it alone
        with httpx.Client(base_url=self.server.url, headers={"X-API-Key": API_KEY}, timeout=120) as http:
            for n, path in enumerate(self.paths[worker::2]):
                if self.stop.is_set():
                    return
                (new,) = add(http, [path], key=f"writer-{worker}-{n}")
                self.added[new] = path
                found = top(http, path)  # the generation it reads is one whole generation, old or new
                if found["id"] != new:
                    self.errors.append(f"{path.parent.name}/{path.name}: top hit {found['id']}, not {new}")
                mine.append(new)
                if n % 3 == 2:
                    victim = mine.pop(0)
                    ok(post_retrying(http, "/delete", json={"ids": [victim], "collection": "walk"}))
                    self.deleted.append(victim)


def test_reembed_while_clients_write_and_search(server: Server, client: httpx.Client, cifar10: Path,
                                                walk: dict[int, Path], tiny: str) -> None:
    """Every acknowledged item is present once afterwards, and its own top hit under the new model."""
    created = ok(client.post("/create_collection", json={"name": "walk", "model": tiny, "keep_originals": True}))
    assert created["model"] == tiny and created["count"] == 0 and created["generation"] == 1
    paths = images(cifar10, ITEMS)
    for start in range(0, ITEMS, 60):
        walk.update(zip(add(client, paths[start : start + 60]), paths[start : start + 60]))
    (again,) = add(client, paths[:1])  # the same image again: its original is stored once
    assert ok(client.post("/stats", json={"collection": "walk"}))["originals_count"] == ITEMS
    ok(client.post("/delete", json={"ids": [again], "collection": "walk"}))
    stats = ok(client.post("/stats", json={"collection": "walk"}))
    assert stats["count"] == ITEMS and stats["originals_count"] == ITEMS  # still named by the first copy

    with Writers(server, images(cifar10, 200, offset=100)) as writers:
        job = ok(client.post("/reembed", json={"collection": "walk", "model": "second"}))["job"]
        assert collection(client)["job"] == job
        done = wait_for(client, job)
        time.sleep(1)  # and some writes to the new generation
    assert done["state"] == "done" and done["missing"] == [] and done["done"] == done["total"] >= ITEMS, done
    assert not writers.errors, writers.errors[:5]
    assert len(writers.added) > 3 and writers.deleted
    walk.update(writers.added)
    for gone in writers.deleted:
        del walk[gone]
    check_walk(client, walk, "second", generation=2)


def check_walk(client: httpx.Client, walk: dict[int, Path], model: str, generation: int) -> None:
    """The collection serves ``model``'s generation and holds exactly ``walk``, each item its own top hit."""
    now = collection(client)
    assert (now["model"], now["generation"], now["count"]) == (model, generation, len(walk)), now
    ids = sorted(walk)  # each stored vector's nearest item is itself; an id not stored is a 404
    found = ok(client.post("/search", json={"ids": ids, "k": 1, "collection": "walk"}))["results"]
    assert [row[0]["id"] for row in found] == ids
    for item_id in list(walk)[::15]:
        assert top(client, walk[item_id])["id"] == item_id


def test_rollback_then_drop_generation(client: httpx.Client, cifar10: Path, walk: dict[int, Path], tiny: str) -> None:
    (path,) = images(cifar10, 1, offset=400)
    (new,) = add(client, [path])  # after the switch: the previous generation takes it too
    walk[new] = path
    refused = client.post("/reembed", json={"collection": "walk", "model": tiny})
    assert refused.status_code == 409 and "roll back or drop_generation first" in refused.json()["error"]
    rolled = ok(client.post("/rollback", json={"collection": "walk"}))
    assert rolled["model"] == tiny and rolled["generation"] == 1 and rolled["missing"] == []
    check_walk(client, walk, tiny, generation=1)
    dropped = ok(client.post("/drop_generation", json={"collection": "walk"}))
    assert dropped["dropped"] == 2 and dropped["model"] == tiny
    refused = client.post("/rollback", json={"collection": "walk"})
    assert refused.status_code == 409 and "no previous generation" in refused.json()["error"]


def kill_midway(server: Server, client: httpx.Client) -> str:
    """Start a re-embed of the walked collection and kill -9 the whole service once a batch is copied."""
    job = ok(client.post("/reembed", json={"collection": "walk", "model": "second"}))["job"]
    deadline = time.monotonic() + 120
    while (state := ok(client.post("/jobs", json={"job": job})))["done"] < 64:
        assert state["state"] == "running" and time.monotonic() < deadline, state
        time.sleep(0.05)
    assert state["state"] == "running", state
    server.stop(signal.SIGKILL)
    return job


def test_a_job_killed_midway_fails_cleanly_or_resumes(server: Server, client: httpx.Client,
                                                      walk: dict[int, Path], tiny: str) -> None:
    """kill -9 mid-job leaves the live generation intact; after a restart the job is reported failed when its
    model is gone, and resumes to the end when it is there."""
    models = Path(server.env["CORINFOMAX_MODELS"])
    job = kill_midway(server, client)
    (models / "second").rename(models.parent / "second-away")
    server.start()
    failed = wait_for(client, job)
    assert failed["state"] == "failed" and "cannot resume: model second@" in failed["error"], failed
    check_walk(client, walk, tiny, generation=1)

    (models.parent / "second-away").rename(models / "second")
    assert [key.split("@")[0] for key in ok(client.post("/reload_models", json={}))["loaded"]] == ["second"]
    job = kill_midway(server, client)
    server.start()
    done = wait_for(client, job)
    assert done["state"] == "done" and done["missing"] == [], done
    check_walk(client, walk, "second", generation=4)


def test_dropping_a_collection_frees_it(server: Server, client: httpx.Client) -> None:
    assert ok(client.post("/drop_collection", json={"name": "walk"})) == {"dropped": "walk"}
    gone = client.post("/stats", json={"collection": "walk"})
    assert gone.status_code == 404 and gone.json() == {"error": "no collection 'walk' (collections: default)"}
    index = Path(server.env["CORINFOMAX_INDEX"])
    kept = index / "collections" / "walk" if index.suffix != ".db" else Path(f"{index}.originals") / "walk"
    assert not kept.exists()
    assert [c["name"] for c in ok(client.post("/collections", json={}))["collections"]] == ["default"]
