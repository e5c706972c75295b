"""Real resolution end to end (issue 11 item 4): a tiny ImageNet-stem model trained at 128 px on Imagewoof
photos, exported, served by a real `bentoml serve` and run through the batch extractor. The card is the one
source of truth for preprocessing: the served embeddings equal the extractor's and a float64 PyTorch
reference fed pixels made by the card's declared rule, computed here without the project's image code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch
from datakit import small_folder
from PIL import Image, ImageOps
from servekit import ok, start_service
from trainkit import tiny_config

from corinfomax.export.bundle import export_bundle
from corinfomax.serving.extract.extract import extract
from corinfomax.serving.extract.features import load_features
from corinfomax.training.checkpoint import load_checkpoint, load_model
from corinfomax.training.config import IMAGENET_MEAN, IMAGENET_STD
from corinfomax.training.evaluate import one_cpu_thread
from corinfomax.training.trainer import train

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
BREEDS = ("beagle", "samoyed", "shih_tzu")


@pytest.fixture(scope="module")
def run(imagewoof: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of tiny_resnet with the ImageNet stem at 128 px on 40 Imagewoof training photos."""
    root = tmp_path_factory.mktemp("realres")
    data = small_folder(imagewoof, root / "data", per_class=4)
    config = tiny_config(data, root / "run", image_size=SIZE, cifar_stem=False, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, batch_size=16, epochs=1, val_data=str(imagewoof / "val"))
    os.environ.setdefault("CORINFOMAX_CACHE", str(root / "cache"))
    with one_cpu_thread():
        train(config, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def bundle(run: Path, imagewoof: Path) -> Path:
    return export_bundle(run, run.parent / "bundle", precision="fp32", verify_data=imagewoof / "val",
                         verify_images=16)


@pytest.fixture(scope="module")
def photos(imagewoof: Path) -> list[Path]:
    """Two validation photos per breed, at their real size (160 px shorter side, up to ~255 px long side)."""
    return [path for breed in BREEDS for path in sorted((imagewoof / "val" / breed).iterdir())[:2]]


@pytest.fixture(scope="module")
def client(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("serve")
    server = start_service(root, model=str(bundle), demo_dir="", workers="1")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            yield http
    finally:
        server.stop()


def card_pixels(path: Path, card: dict[str, Any], shorter_side: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] by the card's declared rule: shorter side to ``resize.shorter_side`` (bicubic), centre crop
    to ``size``; written from the card's fields alone, not with the project's image code."""
    (height, width), rule = card["input"]["size"], card["input"]["resize"]
    assert rule["interpolation"] == "bicubic" and card["input"]["crop"] == "center"
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    scale = (shorter_side or rule["shorter_side"]) / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def reference(run: Path, card: dict[str, Any], pixels: np.ndarray) -> np.ndarray:
    """The checkpoint's backbone in float64 on the card's normalisation: L2-normalised embeddings."""
    state = load_checkpoint(run)
    backbone = load_model(state, run).backbone.double().eval()
    mean, std = (torch.tensor(card["input"][k], dtype=torch.float64).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255 - mean) / std
    with torch.no_grad():
        features = backbone(x)
    return torch.nn.functional.normalize(features, dim=1).numpy()


def test_card_declares_the_real_resolution_rule(bundle: Path) -> None:
    card = json.loads((bundle / "model.json").read_text())
    assert card["input"]["size"] == [SIZE, SIZE] and card["input"]["crop"] == "center"
    assert card["input"]["resize"] == {"shorter_side": round(SIZE / 0.875), "interpolation": "bicubic"}
    assert "128x128" in card["intended_use"] and "reduced" not in card["intended_use"]
    np.testing.assert_allclose(card["input"]["mean"], IMAGENET_MEAN)
    np.testing.assert_allclose(card["input"]["std"], IMAGENET_STD)
    assert card["cifar_stem"] is False and card["parity"]["verified"] is True


def test_service_and_extractor_embed_photos_by_the_card(run: Path, bundle: Path, photos: list[Path],
                                                        client: httpx.Client, tmp_path: Path) -> None:
    card = json.loads((bundle / "model.json").read_text())
    info = ok(client.post("/info", json={}))["model"]
    assert info["input"] == card["input"]
    served = np.asarray(ok(client.post("/embed", files=[("images", (p.name, p.read_bytes(), "image/jpeg"))
                                                         for p in photos]))["embeddings"], dtype=np.float64)

    folder = tmp_path / "photos"
    for path in photos:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / path.parent.name / path.name).symlink_to(path)
    extract([str(folder)], bundle, tmp_path / "features", show_progress=False)
    features = load_features(tmp_path / "features")
    assert [Path(p).name for p in features.paths] == [p.name for p in photos]
    np.testing.assert_allclose(served, features.embeddings, atol=1e-5)

    # What was applied is what the card declares: the float64 reference on card-made pixels matches to float32
    # rounding, while a plausible other rule (shorter side to 128, no margin for the crop) is 10x further off.
    # (Distances, not cosines: a two-step model maps every photo close to one direction.)
    declared = reference(run, card, np.stack([card_pixels(p, card) for p in photos]))
    other = reference(run, card, np.stack([card_pixels(p, card, shorter_side=SIZE) for p in photos]))
    off_declared, off_other = (np.linalg.norm(served - r, axis=1) for r in (declared, other))
    assert off_declared.max() < 1e-4, off_declared
    assert off_other.min() > 10 * off_declared.max(), (off_other, off_declared)


def test_search_finds_each_photo_among_the_others(photos: list[Path], client: httpx.Client) -> None:
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    ids = ok(client.post("/add", files=files, data={"labels": json.dumps([p.parent.name for p in photos])}))["ids"]
    results = ok(client.post("/search", files=files, data={"k": "3"}))["results"]
    for photo, item_id, hits in zip(photos, ids, results):
        assert hits[0]["id"] == item_id and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["label"] == photo.parent.name and len(hits) == 3


def test_big_photos_are_decoded_at_reduced_size_by_one_rule(run: Path, bundle: Path, photos: list[Path],
                                                             client: httpx.Client, tmp_path: Path) -> None:
    """3000-px photos: the service and the extractor decode them the same way (at reduced size, so the resize
    starts from at least the card's shorter side), and land where the full decode does, far closer to it than
    to any other photo."""
    big = []
    for path in photos[::2]:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        scale = 3000 / max(image.size)
        big.append(tmp_path / "big" / path.parent.name / path.name)
        big[-1].parent.mkdir(parents=True, exist_ok=True)
        image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC).save(
            big[-1], quality=90)
    served = np.asarray(ok(client.post("/embed", files=[("images", (p.name, p.read_bytes(), "image/jpeg"))
                                                         for p in big]))["embeddings"], dtype=np.float64)
    extract([str(tmp_path / "big")], bundle, tmp_path / "features", show_progress=False)
    features = load_features(tmp_path / "features")
    assert [Path(p).name for p in features.paths] == [p.name for p in big]
    np.testing.assert_allclose(served, features.embeddings, atol=1e-5)
    card = json.loads((bundle / "model.json").read_text())
    full = reference(run, card, np.stack([card_pixels(p, card) for p in big]))
    off = np.linalg.norm(served - full, axis=1)
    apart = min(np.linalg.norm(full[i] - full[j]) for i in range(len(big)) for j in range(i + 1, len(big)))
    assert off.max() < apart / 4, (off, apart)
