"""The serving subcommands end to end through `corinfomax`: extract -> index build -> probe fit, torch-free."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datakit import FEW_CLASSES, small_folder
from PIL import Image
from servekit import REPO

from corinfomax.serving.extract.features import load_features
from corinfomax.serving.index.build import parse_size
from corinfomax.serving.index.factory import open_index
from corinfomax.serving.index.store import IndexStore
from corinfomax.serving.probe import LinearProbe

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

# Runs the real entry point and fails if anything on the way imported PyTorch.
RUN_WITHOUT_TORCH = (
    "import sys, corinfomax.cli\n"
    "code = corinfomax.cli.main()\n"
    "assert 'torch' not in sys.modules, 'the serving commands imported torch'\n"
    "sys.exit(code)\n"
)


def corinfomax(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def features(cifar10: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    images = small_folder(cifar10, root / "images", 100, "test", FEW_CLASSES)
    result = corinfomax("extract", str(images), "--model", str(tiny_bundle), "--out", str(root / "features"),
                        "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "300 of 300 images embedded" in result.stdout
    return root / "features"


def test_index_build_loads_in_the_store(features: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    result = corinfomax("index", "build", "--features", str(features), "--out", str(out), "--memory-budget", "64M")
    assert result.returncode == 0, result.stderr
    assert "300 vectors, kind Flat, recall@10 vs exact 1.0000" in result.stdout
    assert "faiss.loader" not in result.stderr  # its per-instruction-set INFO lines are kept out
    loaded = load_features(features)
    with IndexStore(out) as store:
        assert store.stats()["count"] == store.stats()["labelled"] == store.stats()["thumbnails"] == 300
        hit = store.search(loaded.embeddings[7:8], k=1)[0][0]
        item = store.get(hit.id)
        assert item.metadata["path"] == loaded.paths[7] and item.label == loaded.labels[7]
        with Image.open(io.BytesIO(store.thumbnail(hit.id))) as thumbnail:  # the page shows the user's images
            assert thumbnail.format == "WEBP" and thumbnail.size == (32, 32)  # never enlarged

    again = corinfomax("index", "build", "--features", str(features), "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    bare = corinfomax("index", "build", "--features", str(features), "--out", str(tmp_path / "bare"),
                      "--thumbnail-px", "0")
    assert bare.returncode == 0, bare.stderr
    with IndexStore(tmp_path / "bare") as store:
        assert store.stats()["thumbnails"] == 0
    wrong = corinfomax("index", "build", "--features", str(features), "--out", str(tmp_path / "no"),
                       "--thumbnail-px", "999")
    assert wrong.returncode == 2 and "--thumbnail-px must be 0 (none) to 256" in wrong.stderr
    assert not (tmp_path / "no").exists()


def test_index_build_into_milvus_resumes_and_migrate_goes_both_ways(features: Path, tmp_path: Path) -> None:
    lite = tmp_path / "index.db"
    for _ in range(2):  # the rerun finds every shard's key: nothing is written twice
        built = corinfomax("index", "build", "--features", str(features), "--to", str(lite))
        assert built.returncode == 0, built.stderr
        assert f"index {lite}: 300 vectors (300 labelled), Milvus HNSW" in built.stdout
    to_folder = corinfomax("index", "migrate", "--from", str(lite), "--to", str(tmp_path / "folder"),
                           "--id-map", str(tmp_path / "ids.json"), "--no-progress")
    assert to_folder.returncode == 0, to_folder.stderr
    assert "copied 300 items" in to_folder.stdout and "100 sampled items verified" in to_folder.stdout
    ids = json.loads((tmp_path / "ids.json").read_text())
    back = corinfomax("index", "migrate", "--from", str(tmp_path / "folder"), "--to", str(tmp_path / "back.db"),
                      "--no-progress")
    assert back.returncode == 0, back.stderr
    loaded = load_features(features)
    # Before this process opens the file: Milvus Lite keeps it locked until the process ends.
    fitted = corinfomax("probe", "fit", "--index", str(lite), "--out", str(tmp_path / "probe.npz"))
    assert fitted.returncode == 0, fitted.stderr
    labels = [label for label in loaded.labels if label is not None]
    assert len(labels) == len(loaded.labels) and LinearProbe.load(tmp_path / "probe.npz").classes == sorted(set(labels))
    with open_index(lite) as first, open_index(tmp_path / "folder") as folder, open_index(tmp_path / "back.db") as last:
        assert folder.stats()["thumbnails"] == folder.stats()["labelled"] == last.stats()["labelled"] == 300
        for store in (first, folder, last):
            hit = store.search(loaded.embeddings[7:8], k=1)[0][0]
            assert hit.metadata["path"] == loaded.paths[7] and hit.label == loaded.labels[7]
        old = first.search(loaded.embeddings[7:8], k=1)[0][0].id
        assert ids[str(old)] == folder.search(loaded.embeddings[7:8], k=1)[0][0].id
    refused = corinfomax("index", "migrate", "--from", str(tmp_path / "nothing"), "--to", str(lite))
    assert refused.returncode == 2 and "not an index" in refused.stderr and "Traceback" not in refused.stderr


def test_index_build_forced_kind_reports_recall(features: Path, tmp_path: Path) -> None:
    result = corinfomax("index", "build", "--features", str(features), "--out", str(tmp_path / "hnsw"), "--kind",
                        "HNSW32")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert report["kind"] == "HNSW32" and report["recall_at_10"] >= 0.9


def test_probe_fit_into_a_bundle(features: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"  # a copy: the session's bundle must stay probe-free for other tests
    bundle.mkdir()
    (bundle / "model.json").write_text((tiny_bundle / "model.json").read_text())
    (bundle / "model.onnx").symlink_to(tiny_bundle / "model.onnx")
    result = corinfomax("probe", "fit", "--features", str(features), "--out", str(bundle), "--l2", "0.01")
    assert result.returncode == 0, result.stderr
    assert "held-out accuracy" in result.stdout
    probe = LinearProbe.load(bundle / "probe.npz")
    assert probe.classes == ["cat", "dog", "ship"]
    loaded = load_features(features)
    labels = [label for label in loaded.labels if label is not None]
    assert len(labels) == len(loaded.labels)
    assert probe.accuracy(loaded.embeddings, labels) > 1 / 3  # better than chance, even for a random model


def test_probe_fit_on_missing_features_is_a_user_error(tmp_path: Path) -> None:
    result = corinfomax("probe", "fit", "--features", str(tmp_path))
    assert result.returncode == 2 and "not a features folder" in result.stderr and "Traceback" not in result.stderr


def test_parse_size() -> None:
    assert parse_size("512M") == 512 << 20 and parse_size("1.5GB") == 3 << 29 and parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_serve_refuses_a_missing_model_before_starting(tmp_path: Path) -> None:
    result = corinfomax("serve", "--model", str(tmp_path / "nowhere"), "--index", str(tmp_path / "index"))
    assert result.returncode == 2 and "neither a bundle folder nor a BentoML model tag" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "index").exists()


def test_serve_reads_port_like_make_serve(tiny_bundle: Path) -> None:
    """PORT sets the port for `corinfomax serve` as for `make serve` (the service itself: tests/test_journey.py)."""
    result = corinfomax("serve", "--model", str(tiny_bundle), env={**os.environ, "PORT": "80x"})
    assert result.returncode == 2 and "PORT='80x' is not a port number" in result.stderr, result.stderr


def test_collection_verbs_for_a_stopped_service(tiny_bundle: Path, cifar10: Path, tmp_path: Path) -> None:
    """create, re-embed (with another model), list, roll back, drop the generation, drop: the service's verbs."""
    from corinfomax.serving.admin import Admin

    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "a")
    shutil.copytree(tiny_bundle, models / "b")  # the same weights under another version: another model
    card = json.loads((models / "b" / "model.json").read_text())
    (models / "b" / "model.json").write_text(json.dumps({**card, "version": "v2"}))
    where = ["--index", str(tmp_path / "index"), "--models", str(models), "--default-model", str(models / "a")]
    created = corinfomax("collection", "create", "pets", "--model", card["name"] + "@" + card["version"],
                         "--keep-originals", *where)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["generation"] == 1
    admin = Admin(str(tmp_path / "index"), models, None)  # add as the service would: originals kept
    jpegs = [path.read_bytes() for path in sorted((cifar10 / "test" / "dog").glob("*.jpg"))[:5]]
    embedder = admin.model(card["name"] + "@" + card["version"]).embedder
    admin.collections.add("pets", embedder.embed_images(jpegs), images=jpegs)
    admin.close()

    reembedded = corinfomax("collection", "reembed", "pets", "--model", f"{card['name']}@v2", "--no-progress", *where)
    assert reembedded.returncode == 0, reembedded.stderr
    assert json.loads(reembedded.stdout[reembedded.stdout.index("{"):])["state"] == "done"
    listed = json.loads(corinfomax("collection", "list", *where).stdout)
    assert [(c["name"], c["version"], c["generation"], c["count"]) for c in listed] == [
        ("default", card["version"], 1, 0), ("pets", "v2", 2, 5)]
    indexed = corinfomax("collection", "field-index", "pets", "--field", "metadata.year", *where)
    assert json.loads(indexed.stdout)["indexed_fields"] == ["metadata.year"], indexed.stderr
    rolled = corinfomax("collection", "rollback", "pets", *where)
    assert rolled.returncode == 0 and json.loads(rolled.stdout)["generation"] == 1, rolled.stderr
    freed = corinfomax("collection", "drop-generation", "pets", *where)
    assert freed.returncode == 0 and json.loads(freed.stdout)["dropped"] == 2, freed.stderr
    assert corinfomax("collection", "drop", "pets", *where).returncode == 0
    refused = corinfomax("collection", "drop", "default", *where)
    assert refused.returncode == 2 and "cannot be dropped" in refused.stderr and "Traceback" not in refused.stderr
