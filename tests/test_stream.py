"""The streaming data path (training/stream.py): reduced-size JPEG decode, the automatic cache/stream choice,
unreadable files skipped and counted, sharding and resume, and every preset taking real training steps.

Real files throughout: Imagewoof JPEGs through symlinks, larger JPEGs made from them with PIL, CIFAR-10 PNGs."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from datakit import small_folder
from PIL import Image
from trainkit import tiny_config

from corinfomax.core.images import load_image
from corinfomax.training import batches, trainer
from corinfomax.training.augment import Crops, view_specs
from corinfomax.training.checkpoint import load_checkpoint
from corinfomax.training.config import IMAGENET_MEAN, IMAGENET_STD, PRESETS, resolve
from corinfomax.training.distributed import Dist
from corinfomax.training.evaluate import one_cpu_thread as one_thread
from corinfomax.training.stream import DRAFT_FACTOR, ViewDataset, list_image_files
from corinfomax.training.trainer import train


@pytest.fixture(autouse=True)
def _private_cache_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CORINFOMAX_CACHE", str(tmp_path / "cache"))
    with one_thread():
        yield


def woof_folder(imagewoof: Path, dest: Path, per_class: int, classes: int = 10, side: int | None = None) -> Path:
    """An ImageFolder of the first Imagewoof train images: symlinks, or re-encoded with the shorter side at
    ``side`` px (a JPEG, as a camera would write it)."""
    for class_dir in sorted((imagewoof / "train").iterdir())[:classes]:
        (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            if side is None:
                (dest / class_dir.name / image.name).symlink_to(image.resolve())
            else:
                with Image.open(image) as source:
                    scale = side / min(source.size)
                    big = source.convert("RGB").resize((round(source.width * scale), round(source.height * scale)),
                                                       Image.Resampling.BICUBIC)
                big.save(dest / class_dir.name / image.name, quality=90)
    return dest


@pytest.fixture(scope="module")
def woof(imagewoof: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 Imagewoof photos (4 classes x 10), 160 px shorter side."""
    return woof_folder(imagewoof, tmp_path_factory.mktemp("woof"), per_class=10, classes=4)


def stream_config(data: Path, out: Path, **overrides):
    """The tiny test recipe at 72 px, above the cache limit (64), so it streams the files."""
    return tiny_config(data, out, **{"image_size": 72, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                     "cifar_stem": False, "batch_size": 16, **overrides})


# --------------------------------------------------------------------------- reduced-size decode
def test_jpeg_decodes_at_reduced_size_keeping_the_shorter_side(imagewoof: Path, tmp_path: Path) -> None:
    photo = woof_folder(imagewoof, tmp_path / "big", per_class=1, classes=1, side=1200)
    path = next(photo.rglob("*.jpg"))
    full = load_image(path)
    assert min(full.size) == 1200
    draft = load_image(path, min_side=256)
    # DCT scaling by 1/4: the largest power-of-two reduction that keeps the shorter side >= 256.
    assert min(draft.size) == 300 and draft.mode == "RGB"
    assert abs(draft.width / draft.height - full.width / full.height) < 0.01
    # Same picture: the reduced decode matches the full decode shrunk to its size (8-bit, up to JPEG noise).
    shrunk = np.asarray(full.resize(draft.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(draft, dtype=np.float64) - shrunk).mean() < 4.0
    # Small enough already, or not a JPEG: decoded in full.
    assert load_image(path, min_side=1000).size == full.size
    png = tmp_path / "same.png"
    full.save(png)
    assert load_image(png, min_side=256).size == full.size


# --------------------------------------------------------------------------- the dataset
def test_views_depend_only_on_the_item_seed_and_bad_files_are_replaced(woof: Path, tmp_path: Path) -> None:
    files = list_image_files(woof, 72)
    assert len(files) == 40 and files.min_side == DRAFT_FACTOR * 72 and files.labels.tolist()[::10] == [0, 1, 2, 3]
    dataset = ViewDataset(files, Crops(view_specs(72)))
    v1, v2, label, unreadable = dataset[(5, 123)]
    assert v1.shape == v2.shape == (3, 72, 72) and v1.dtype == torch.uint8 and label == 0 and unreadable == -1
    again = dataset[(5, 123)]
    assert torch.equal(again[0], v1) and torch.equal(again[1], v2)
    assert not torch.equal(dataset[(5, 124)][0], v1)

    # A truncated JPEG passes the listing (nothing is decoded then) and fails when drawn: the next file stands in.
    truncated = files.paths[6]
    files.paths[5] = tmp_path / "truncated.jpg"
    files.paths[5].write_bytes(truncated.read_bytes()[:400])
    v1, v2, label, unreadable = dataset[(5, 123)]
    assert unreadable == 5 and label == 0
    expected = dataset.transform(load_image(truncated, min_side=files.min_side), 123)
    assert torch.equal(v1, expected[0]) and torch.equal(v2, expected[1])


def test_the_sharded_epoch_gives_each_rank_its_rows_of_the_global_batch() -> None:
    config = resolve("photo", {"batch_size": 8})
    single = list(batches._EpochSampler(50, config, Dist(), 8))
    rank0 = list(batches._EpochSampler(50, config, Dist(rank=0, world=2), 4))
    rank1 = list(batches._EpochSampler(50, config, Dist(rank=1, world=2), 4))
    assert len(single) == 48 and len(rank0) == len(rank1) == 24
    for k in range(6):  # global batch k of both ranks together is batch k of one process, with the same seeds
        assert sorted(rank0[4 * k:4 * k + 4] + rank1[4 * k:4 * k + 4]) == sorted(single[8 * k:8 * k + 8])


# --------------------------------------------------------------------------- training
def test_a_large_image_size_streams_from_the_files(woof: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger=batches.log.name):
        state = load_checkpoint(train(stream_config(woof, tmp_path / "run", epochs=1), progress=False))
    assert "image_size 72 > 64: streaming 40 files" in caplog.text and state["step"] == 2
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing decoded into the cache


@pytest.mark.parametrize("pipeline", ["stream", "cache"])
def test_a_run_killed_mid_epoch_resumes_exactly(pipeline: str, woof: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints within epochs (``checkpoint_every``): interrupted in the middle of epoch 2, the run goes on
    from the batch it reached and ends where an uninterrupted run ends (weights, loss state, epoch metrics)."""
    config = (partial(stream_config, checkpoint_every=1) if pipeline == "stream" else
              partial(tiny_config, image_size=32, batch_size=16, checkpoint_every=1))
    reference = load_checkpoint(train(config(woof, tmp_path / "straight"), progress=False))
    assert reference["step"] == 4  # 2 epochs of 2 batches

    original = trainer.train_step

    def interrupted(run, state, *args):
        if state.step == 3:  # the second batch of epoch 2; its first batch is checkpointed
            raise KeyboardInterrupt
        return original(run, state, *args)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config(woof, tmp_path / "resumed"), progress=False)
    saved = load_checkpoint(tmp_path / "resumed")
    assert (saved["epoch"], saved["epoch_batch"], saved["step"]) == (1, 1, 3)
    monkeypatch.setattr(trainer, "train_step", original)
    resumed = load_checkpoint(train(config(woof, tmp_path / "resumed"), progress=False))
    assert resumed["epoch"] == reference["epoch"] == 2 and resumed["step"] == 4 and "epoch_batch" not in resumed
    for part in ("model", "loss", "probe"):
        for key, value in reference[part].items():
            torch.testing.assert_close(resumed[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
    for key in ("loss", "attraction", "big_bang", "online_probe_acc"):
        assert resumed["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-5)


def test_unreadable_files_are_skipped_and_counted_while_streaming(woof: Path, tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    for path in sorted(woof.rglob("*.jpg"))[:16]:
        (data / path.parent.name).mkdir(parents=True, exist_ok=True)
        (data / path.parent.name / path.name).symlink_to(path.resolve())
    (data / "n02086240" / "garbage.jpg").parent.mkdir()
    (data / "n02086240" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING):
        train(stream_config(data, tmp_path / "run", epochs=1, workers=2), progress=False)
    assert "1 unreadable file(s) skipped so far" in caplog.text
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["event"] == "data" and first["images"] == 17


@pytest.mark.slow  # ResNet-18 at 224 px: ~30 s on one CPU thread
def test_imagenet100_preset_trains_on_224_px_photos(imagewoof: Path, tmp_path: Path) -> None:
    data = woof_folder(imagewoof, tmp_path / "data", per_class=4, classes=2, side=240)
    config = resolve("imagenet100", dict(data=str(data), out=str(tmp_path / "run"), batch_size=4, epochs=1,
                                         workers=1, device="cpu", log_every=1))
    assert config.image_size == 224 and config.backbone == "resnet18" and not config.cifar_stem
    state = load_checkpoint(train(config, progress=False))
    assert state["step"] == 2 and state["config"]["preset"] == "imagenet100"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


HEAVY = {"cifar10", "cifar100", "tiny-imagenet"}  # ResNet-18/50 with 4096-wide projectors: 10-50 s a step on CPU


@pytest.mark.parametrize("preset", [pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name
                                    for name in sorted(set(PRESETS) - {"imagenet100"})])
def test_every_preset_takes_a_training_step(preset: str, cifar10: Path, woof: Path, tmp_path: Path) -> None:
    streams = PRESETS[preset]["image_size"] > 64
    data = woof if streams else small_folder(cifar10, tmp_path / "data", per_class=1)
    config = resolve(preset, dict(data=str(data), out=str(tmp_path / "run"), batch_size=4, epochs=1,
                                  time_budget_min=0.0, workers=1, device="cpu"))
    state = load_checkpoint(train(config, progress=False))
    assert state["step"] == len(list(data.rglob("*.*"))) // 4 >= 2
    assert state["config"]["preset"] == preset
