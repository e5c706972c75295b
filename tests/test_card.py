"""The model card's account of the training data: the data actually used, and whose normalisation statistics."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corinfomax.export.card import build_card, dataset_name, normalisation
from corinfomax.training.config import resolve


def config(preset: str, **overrides: Any) -> dict[str, Any]:
    """A resolved config as a checkpoint holds it (JSON types: lists, not tuples)."""
    return json.loads(json.dumps(resolve(preset, overrides).to_dict()))


@pytest.mark.parametrize(("preset", "overrides", "expected"), [
    ("cpu", dict(data="/home/me/photos"), "photos"),  # the cpu preset's cifar10 does not hold for photos
    ("cpu", dict(data="/data/holiday/train"), "holiday"),  # a split folder: its parent names the data
    ("cpu", dict(data="../shared/datasets/cifar10/train"), "cifar10"),  # the preset's dataset itself
    ("cpu", dict(data="/data/CIFAR-10"), "cifar10"),
    ("cpu", dict(data="/data/holiday", dataset_name="Holiday 2024"), "Holiday 2024"),  # given: kept
    ("photo", dict(data="/data/woof/val"), "woof"),
    ("cpu", dict(data=""), None),  # nothing recorded: no guess
])
def test_dataset_is_the_data_actually_used(preset: str, overrides: dict[str, Any], expected: str | None) -> None:
    assert dataset_name(config(preset, **overrides)) == expected


def test_normalisation_says_whose_statistics() -> None:
    assert normalisation(config("cpu", data="/p")) == \
        "the cpu preset's CIFAR-10 mean and std, not computed from the training data"
    assert normalisation(config("photo", data="/p")) == \
        "the photo preset's ImageNet mean and std, not computed from the training data"
    assert normalisation(config("cifar100", data="/p")).startswith("the cifar100 preset's CIFAR-100 mean and std")
    given = config("cpu", data="/p", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert normalisation(given) == "the mean and std given for this run (--mean, --std)"


def test_card_of_photos_trained_with_the_cpu_preset() -> None:
    card = build_card({"config": config("cpu", data="/home/me/photos"), "epoch": 3}, name="m", version="v",
                      precision="fp32", embedding_dim=256, checkpoint_sha256="0" * 64, opset=18)
    assert card.training["dataset"] == "photos" and card.training["data"] == "/home/me/photos"
    assert card.intended_use is not None
    assert "(photos)" in card.intended_use and "cifar" not in card.intended_use.lower()
    assert "not computed from the training data" in card.training["normalisation"]
