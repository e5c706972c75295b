"""`corinfomax extract`: output format, labels, bad files, resume after SIGKILL, refusals, full disk."""

from __future__ import annotations

import errno
import io
import json
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datakit import FEW_CLASSES, small_folder
from PIL import Image

from corinfomax.core.errors import BundleError
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.extract.extract import extract
from corinfomax.serving.extract.features import FeaturesError, failures, load_features, read_manifest
from corinfomax.serving.extract.inputs import InputError, list_inputs

pytestmark = pytest.mark.slow  # every test extracts with an exported bundle (tiny_bundle); one runs the CLI twice
REPO = Path(__file__).resolve().parents[1]
def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def make_bad_folder(cifar10: Path, root: Path) -> dict[str, str | None]:
    """Real images in awkward modes plus broken files; returns file name -> expected error fragment (None: ok)."""
    root.mkdir()
    good = (cifar10 / "test" / "cat" / "0000.jpg").read_bytes()
    (root / "good.jpg").write_bytes(good)
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "notes.jpg").write_text("this is not an image\n")
    (root / "empty.png").write_bytes(b"")
    (root / "huge.png").write_bytes(_png_with_declared_size(50_000, 50_000))
    Image.new("CMYK", (40, 30), (0, 128, 0, 0)).save(root / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 30, dtype=np.uint16) * 50).reshape(30, 40)).save(root / "deep16.png")
    palette = Image.new("P", (40, 30))
    palette.putpalette([i % 256 for i in range(768)])
    palette.save(root / "palette.png", transparency=0)
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(root / "rgba.png")
    Image.new("L", (40, 30), 90).save(root / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.new("RGB", (40, 20), (0, 0, 255)).save(root / "rotated.jpg", exif=exif)
    (root / "self.jpg").symlink_to(root / "self.jpg")
    (root / "loop").symlink_to(root)  # a folder link loop: the walk must end
    (root / "README.md").write_text("not an image, ignored in folders\n")
    return {
        "good.jpg": None, "cmyk.jpg": None, "deep16.png": None, "palette.png": None, "rgba.png": None,
        "gray.png": None, "rotated.jpg": None, "truncated.jpg": "truncated", "notes.jpg": "not a decodable image",
        "empty.png": "empty", "huge.png": "exceeds", "self.jpg": "unreadable file",
    }


@pytest.fixture(scope="module")
def images(cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_folder(cifar10, tmp_path_factory.mktemp("images") / "set", 40, "test", FEW_CLASSES)


def test_extract_writes_the_documented_format(tiny_bundle: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    summary = extract([str(images)], tiny_bundle, out, shard_rows=50, batch_size=32, show_progress=False)
    assert summary["images"] == 120 and summary["failed_now"] == 0 and summary["shards_written"] == 3

    manifest = read_manifest(out)
    card = json.loads((tiny_bundle / "model.json").read_text())
    assert manifest["format"] == "corinfomax-features/1"
    assert manifest["model"]["checkpoint_sha256"] == card["checkpoint_sha256"]
    assert manifest["shards"] == ["00000", "00001", "00002"] and manifest["classes"] == list(FEW_CLASSES)
    table = pq.read_table(out / "shards" / "00001.parquet")
    assert table.column_names == ["path", "label", "width", "height", "shard", "row", "error"]
    assert table["row"].to_pylist() == list(range(50)) and set(table["width"].to_pylist()) == {32}
    assert np.load(out / "shards" / "00002.npy").shape == (20, card["embedding_dim"])

    features = load_features(out)
    assert features.embeddings.dtype == np.float32 and features.embeddings.shape == (120, card["embedding_dim"])
    np.testing.assert_allclose(np.linalg.norm(features.embeddings, axis=1), 1.0, atol=1e-5)
    assert features.labels == [name for name in FEW_CLASSES for _ in range(40)]
    assert features.paths[0] == str(images / "cat" / "0000.jpg")
    # Same vectors as the service's own path (decode + embed one by one).
    expected = Embedder(tiny_bundle).embed_images([features.paths[0], features.paths[-1]])
    np.testing.assert_allclose(features.embeddings[[0, -1]], expected, atol=1e-5)


def test_float16_output_and_list_file_with_labels(tiny_bundle: Path, images: Path, tmp_path: Path) -> None:
    listing = tmp_path / "files.txt"
    dog, ship = images / "dog" / "0001.jpg", images / "ship" / "0002.jpg"
    listing.write_text(f"# two files\n{dog}\tanimal\n\n{ship}\tvehicle\n")
    out = tmp_path / "features"
    extract([str(listing)], tiny_bundle, out, dtype="float16", show_progress=False)
    assert np.load(out / "shards" / "00000.npy").dtype == np.float16
    features = load_features(out)
    assert features.embeddings.dtype == np.float32 and features.labels == ["animal", "vehicle"]
    assert read_manifest(out)["classes"] == ["animal", "vehicle"]


def test_bad_files_are_skipped_and_listed(tiny_bundle: Path, cifar10: Path, tmp_path: Path) -> None:
    expected = make_bad_folder(cifar10, tmp_path / "bad")
    out = tmp_path / "features"
    summary = extract([str(tmp_path / "bad")], tiny_bundle, out, show_progress=False)
    assert summary["images"] == len(expected)  # README.md ignored; the folder loop walked once
    errors = {Path(path).name: error for path, error in failures(out)}
    for name, fragment in expected.items():
        if fragment is None:
            assert name not in errors, errors.get(name)
        else:
            assert fragment in errors[name].lower(), (name, errors[name])
    features = load_features(out)
    assert len(features.paths) == sum(v is None for v in expected.values())
    assert np.isfinite(features.embeddings).all()
    table = pq.read_table(out / "shards" / "00000.parquet").to_pylist()
    rotated = next(row for row in table if row["path"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (20, 40)  # EXIF orientation applied


def test_two_runs_over_bad_files_give_identical_bytes(tiny_bundle: Path, cifar10: Path, tmp_path: Path) -> None:
    """Error texts land in the Parquet files: they must not carry per-run details such as memory addresses."""
    make_bad_folder(cifar10, tmp_path / "bad")
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        extract([str(tmp_path / "bad")], tiny_bundle, out, show_progress=False)
    errors = dict(failures(first))
    assert "cannot identify image file" in errors[str(tmp_path / "bad" / "notes.jpg")]
    assert not any(" at 0x" in error for error in errors.values()), errors
    assert folder_bytes(first) == folder_bytes(second)


def _cli(*args: str) -> list[str]:
    """The `corinfomax` entry point (not `python -m`, under which UserError would be a second class)."""
    return [sys.executable, "-c", "import sys, corinfomax.cli; sys.exit(corinfomax.cli.main())", *args]


def test_killed_run_resumes_to_identical_output(tiny_bundle: Path, cifar10: Path, tmp_path: Path) -> None:
    images = small_folder(cifar10, tmp_path / "images", 100, "test", FEW_CLASSES)
    command = ["extract", str(images), "--model", str(tiny_bundle), "--shard-rows", "25", "--batch-size", "5",
               "--workers", "1", "--threads", "1", "--no-progress"]
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    subprocess.run(_cli(*command, "--out", str(clean)), cwd=REPO, check=True, capture_output=True)

    process = subprocess.Popen(_cli(*command, "--out", str(resumed)), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        manifest = resumed / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = read_manifest(resumed)["shards"]
    assert 0 < len(done) < 12, f"kill came too late to test resuming ({len(done)} shards done)"

    result = subprocess.run(_cli(*command, "--out", str(resumed)), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "shards already done" in result.stderr
    assert folder_bytes(resumed) == folder_bytes(clean)


def test_output_of_another_model_is_refused(tiny_bundle: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    extract([str(images / "cat")], tiny_bundle, out, show_progress=False)
    before = folder_bytes(out)
    other = tmp_path / "other_bundle"
    other.mkdir()
    card = json.loads((tiny_bundle / "model.json").read_text())
    card["checkpoint_sha256"] = "0" * 64
    (other / "model.json").write_text(json.dumps(card))
    (other / "model.onnx").symlink_to(tiny_bundle / "model.onnx")
    with pytest.raises(FeaturesError, match="different models"):
        extract([str(images / "cat")], other, out, show_progress=False)
    with pytest.raises(FeaturesError, match="dtype"):
        extract([str(images / "cat")], tiny_bundle, out, dtype="float16", show_progress=False)
    with pytest.raises(FeaturesError, match="input file list"):
        extract([str(images / "dog")], tiny_bundle, out, show_progress=False)
    assert folder_bytes(out) == before


def test_bad_sources_give_clear_errors(tmp_path: Path, tiny_bundle: Path, images: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        list_inputs([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="contains no image files"):
        list_inputs([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="matches no files"):
        list_inputs([str(tmp_path / "*.png")])
    assert len(list_inputs([str(images / "cat" / "*.jpg"), str(images / "cat")])) == 40  # de-duplicated
    with pytest.raises(BundleError, match="not a model bundle"):
        extract([str(images / "cat")], tmp_path / "empty", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("someone's file")
    with pytest.raises(FeaturesError, match="not an empty folder"):
        extract([str(images / "cat")], tiny_bundle, busy, show_progress=False)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_cli_error_exits_2_without_traceback(tiny_bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run(_cli("extract", str(tmp_path / "nope"), "--model", str(tiny_bundle), "--out",
                                 str(tmp_path / "out")), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_full_disk_keeps_finished_shards(tiny_bundle: Path, images: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk cannot be produced here without root, so the second shard's write raises ENOSPC."""
    real_save, calls = np.save, []

    def save_then_fill_disk(handle, array: np.ndarray) -> None:
        calls.append(handle)
        if len(calls) == 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(handle, array)

    out = tmp_path / "features"
    monkeypatch.setattr(np, "save", save_then_fill_disk)
    with pytest.raises(FeaturesError, match="disk is full"):
        extract([str(images)], tiny_bundle, out, shard_rows=50, show_progress=False)
    assert read_manifest(out)["shards"] == ["00000"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.npy", "00000.parquet"]
    monkeypatch.setattr(np, "save", real_save)
    summary = extract([str(images)], tiny_bundle, out, shard_rows=50, show_progress=False)
    assert summary["shards_skipped"] == 1 and len(load_features(out).paths) == 120
