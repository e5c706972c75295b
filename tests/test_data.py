"""training/data.py: folder layouts, every common image mode to RGB 32x32 uint8, the uint8 cache, bad files.

Real files throughout: CIFAR-10 images through symlinks, small synthetic images written with PIL, the cache
written to a per-test CORINFOMAX_CACHE folder (never ~/.cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datakit import small_folder
from PIL import Image

from corinfomax.core.errors import DataError
from corinfomax.core.images import scan_images
from corinfomax.training.data import decode_folder

SIZE = 32


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CORINFOMAX_CACHE", str(cache))
    return cache


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.npz")) if cache.is_dir() else []


def write_rgb(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --------------------------------------------------------------------------- layouts
def test_image_folder_gives_sorted_classes_and_labels(cifar10: Path, tmp_path: Path) -> None:
    root = small_folder(cifar10, tmp_path / "data", per_class=3)
    (root / "cat" / "more").mkdir()
    (root / "cat" / "more" / "extra.png").symlink_to(sorted((cifar10 / "train" / "cat").iterdir())[5].resolve())
    (root / ".hidden").mkdir()  # not a class
    data = decode_folder(root, SIZE, progress=False)
    classes = sorted(p.name for p in (cifar10 / "train").iterdir())
    assert data.classes == classes
    assert data.images.shape == (31, 3, SIZE, SIZE) and data.images.dtype == torch.uint8
    counts = np.bincount(data.labels.numpy(), minlength=10)
    assert counts[classes.index("cat")] == 4 and counts.sum() == 31  # class folders are searched recursively
    assert (np.diff(data.labels.numpy()) >= 0).all() and data.skipped == 0
    # A CIFAR image is already 32x32: decoding keeps its pixels exactly.
    first = sorted((cifar10 / "train" / classes[0]).iterdir())[0]
    np.testing.assert_array_equal(data.images[0].permute(1, 2, 0).numpy(), np.asarray(Image.open(first).convert("RGB")))


def test_flat_folder_is_searched_recursively_and_unlabelled(tmp_path: Path) -> None:
    write_rgb(tmp_path / "flat" / "a.png", (255, 0, 0))
    write_rgb(tmp_path / "flat" / "deeper" / "still" / "b.jpg", (0, 0, 255))
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    data = decode_folder(tmp_path / "flat", SIZE, progress=False)
    assert data.classes == [] and data.labels.tolist() == [-1, -1] and data.skipped == 0
    assert data.images[0, 0].float().mean() > 250 and data.images[1, 2].float().mean() > 240  # sorted: a, then b


def test_loose_images_beside_folders_make_the_whole_tree_unlabelled(tmp_path: Path) -> None:
    write_rgb(tmp_path / "mixed" / "top.png", (10, 10, 10))
    write_rgb(tmp_path / "mixed" / "dogs" / "d.png", (20, 20, 20))
    listing = scan_images(tmp_path / "mixed")
    assert not listing.labelled and [p.name for p in listing.paths] == ["d.png", "top.png"]


# --------------------------------------------------------------------------- image modes
def test_every_mode_decodes_to_rgb_uint8(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    root.mkdir()
    gradient = np.tile(np.linspace(0, 255, 40).round().astype(np.uint8), (30, 1))  # 30 x 40, dark -> bright
    Image.fromarray(gradient, "L").save(root / "a_gray.png")
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: composited onto white, not black
    Image.fromarray(rgba, "RGBA").save(root / "b_rgba.png")
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 1 = green
    palette.save(root / "c_palette.gif")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(root / "d_cmyk.jpg", quality=95)  # pure red in CMYK
    Image.fromarray(gradient.astype(np.uint16) * 257).save(root / "e_16bit.png")  # the same, in 16 bits
    data = decode_folder(root, SIZE, progress=False)
    assert data.images.shape == (5, 3, SIZE, SIZE) and data.images.dtype == torch.uint8 and data.skipped == 0
    gray, rgba_out, pal, cmyk, deep = (img.float() for img in data.images)
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    assert gray[0, :, -1].mean() > gray[0, :, 0].mean() + 100  # the gradient survives
    assert (rgba_out == 255).all()
    assert pal[1].mean() > 190 and pal[0].mean() < 5 and pal[2].mean() < 5
    assert cmyk[0].mean() > 240 and cmyk[1].mean() < 15 and cmyk[2].mean() < 15
    # 16 bits are scaled to 8, not clipped: the gradient survives (clipping would turn it all white).
    assert deep[0, :, 0].mean() < 40 and deep[0, :, -1].mean() > 200
    np.testing.assert_allclose(deep.numpy(), gray.numpy(), atol=1)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape: top half red, bottom half blue
    stored[:10, :, 0] = 255
    stored[10:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise -> portrait, red on the right
    path = tmp_path / "rot" / "photo.jpg"
    path.parent.mkdir()
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    image = decode_folder(path.parent, SIZE, progress=False).images[0].float()
    left, right = image[:, :, : SIZE // 2 - 2], image[:, :, SIZE // 2 + 2 :]
    assert right[0].mean() > 200 and right[2].mean() < 50
    assert left[2].mean() > 200 and left[0].mean() < 50


def test_resize_is_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 32:64] = 255  # white centre third, black sides: a centre crop is all white
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = decode_folder(tmp_path, SIZE, progress=False).images[0]
    assert image.shape == (3, SIZE, SIZE) and (image == 255).all()


# --------------------------------------------------------------------------- cache
def test_second_call_reads_the_cache_file(tmp_path: Path, cache_dir: Path) -> None:
    for i in range(3):
        write_rgb(tmp_path / "data" / f"{i}.png", (i * 50, 0, 0))
    first = decode_folder(tmp_path / "data", SIZE, progress=False)
    [cache] = cache_files(cache_dir)
    with np.load(cache) as saved:
        np.testing.assert_array_equal(saved["images"], first.images.numpy())
        labels, skipped = saved["labels"], saved["skipped"]
    # Rewrite the cache with different pixels: the next call must return them, i.e. it did not decode again.
    np.savez(cache, images=255 - first.images.numpy(), labels=labels, skipped=skipped)
    second = decode_folder(tmp_path / "data", SIZE, progress=False)
    np.testing.assert_array_equal(second.images.numpy(), 255 - first.images.numpy())
    assert cache_files(cache_dir) == [cache]
    decode_folder(tmp_path / "data", 16, progress=False)  # another size, another cache
    assert len(cache_files(cache_dir)) == 2


def test_relative_and_absolute_paths_share_one_cache(tmp_path: Path, cache_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write_rgb(tmp_path / "data" / "a.png", (9, 9, 9))
    decode_folder(tmp_path / "data", SIZE, progress=False)
    monkeypatch.chdir(tmp_path)
    decode_folder("data", SIZE, progress=False)
    assert len(cache_files(cache_dir)) == 1


def test_changed_folder_gets_a_new_cache(tmp_path: Path, cache_dir: Path) -> None:
    data = tmp_path / "data"
    for i in range(3):
        write_rgb(data / f"{i}.png", (0, i * 50, 0))
    assert len(decode_folder(data, SIZE, progress=False).images) == 3
    write_rgb(data / "3.png", (0, 0, 90))  # a new file
    assert len(decode_folder(data, SIZE, progress=False).images) == 4
    write_rgb(data / "0.png", (250, 250, 250))  # same name, new content
    stat = (data / "0.png").stat()
    os.utime(data / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = decode_folder(data, SIZE, progress=False)
    assert changed.images[0].float().mean() > 245  # the new pixels, not a stale cache
    assert len(cache_files(cache_dir)) == 3
    assert not list(cache_dir.glob("*.tmp*"))  # written atomically


def test_cache_off_writes_nothing(tmp_path: Path, cache_dir: Path) -> None:
    write_rgb(tmp_path / "data" / "a.png", (1, 2, 3))
    decode_folder(tmp_path / "data", SIZE, cache=False, progress=False)
    assert cache_files(cache_dir) == []


# --------------------------------------------------------------------------- bad input
def test_unreadable_files_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    write_rgb(data / "cls" / "good1.png", (255, 255, 255))
    write_rgb(data / "cls" / "good2.png", (0, 0, 0))
    (data / "cls" / "empty.jpg").write_bytes(b"")
    (data / "cls" / "text.png").write_text("this is not a PNG")
    good = (data / "cls" / "good1.png").read_bytes()
    (data / "cls" / "truncated.png").write_bytes(good[: len(good) // 2])
    decoded = decode_folder(data, SIZE, progress=False)
    assert decoded.skipped == 3 and len(decoded.images) == 2 and decoded.labels.tolist() == [0, 0]
    assert "text.png" in caplog.text and "empty.jpg" in caplog.text
    assert decode_folder(data, SIZE, progress=False).skipped == 3  # the count is cached too


def test_missing_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist or is not a folder"):
        decode_folder(tmp_path / "nowhere", SIZE, progress=False)
    write_rgb(tmp_path / "a_file.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"a_file.png does not exist or is not a folder"):
        decode_folder(tmp_path / "a_file.png", SIZE, progress=False)


def test_folder_without_images_is_a_data_error(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images found in .*empty \(looked for .*\.png"):
        decode_folder(tmp_path / "empty", SIZE, progress=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_text("garbage")
    with pytest.raises(DataError, match=r"none of the 1 files in .*broken could be read as an image"):
        decode_folder(tmp_path / "broken", SIZE, progress=False)
    assert cache_files(cache_dir) == []  # nothing cached for a failed folder


def test_limit_per_class(cifar10: Path, tmp_path: Path) -> None:
    root = small_folder(cifar10, tmp_path / "data", per_class=4)
    full = decode_folder(root, SIZE, progress=False)
    limited = decode_folder(root, SIZE, limit_per_class=2, progress=False)
    assert np.bincount(limited.labels.numpy()).tolist() == [2] * 10
    keep = [i for i in range(len(full.labels)) if i % 4 < 2]  # the first two of each class, in listing order
    np.testing.assert_array_equal(limited.images.numpy(), full.images.numpy()[keep])
    write_rgb(tmp_path / "flat" / "a.png", (0, 0, 0))
    write_rgb(tmp_path / "flat" / "b.png", (0, 0, 0))
    write_rgb(tmp_path / "flat" / "c.png", (0, 0, 0))
    assert len(decode_folder(tmp_path / "flat", SIZE, limit_per_class=2, progress=False).images) == 2  # whole folder
