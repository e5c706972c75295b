"""Building the model card (the contract is `corinfomax.core.bundle`): from a checkpoint's state, and into the
ONNX file's metadata as well as ``model.json``."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from corinfomax.core.bundle import MODEL_FILE, InputSpec, ModelCard, card_text
from corinfomax.core.bundle import write_card as write_card_json
from corinfomax.core.images import ResizeRule
from corinfomax.training.config import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, PRESETS

METADATA_KEY = "corinfomax.card"
# Beyond 64 px (ImageNet-style models) resize to size/0.875 then centre-crop, the usual evaluation rule.
SMALL_IMAGE_MAX = 64
CROP_RATIO = 0.875
# A --data folder with one of these names is a split of a dataset (cifar10/train): the parent names the dataset.
SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "test", "images"}
# The per-channel statistics the presets normalise with, by the dataset they were measured on.
STATISTICS = {(CIFAR10_MEAN, CIFAR10_STD): "CIFAR-10", (IMAGENET_MEAN, IMAGENET_STD): "ImageNet",
              (PRESETS["cifar100"]["mean"], PRESETS["cifar100"]["std"]): "CIFAR-100"}
TRAINING_KEYS = ("preset", "projector", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
                 "alpha", "la_R", "la_mu", "R_init", "eps", "global_views", "local_views", "local_size", "crop_scale",
                 "local_scale")


def default_name(checkpoint: Path) -> str:
    """The run folder's name, lowercased, with characters a tag cannot hold replaced by '-'."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    name = re.sub(r"[^a-z0-9._-]+", "-", folder.resolve().name.lower()).strip("-._")
    return name[:63] or "corinfomax"


def input_spec(config: dict[str, Any]) -> InputSpec:
    """The resize/crop rule clients apply before sending uint8 pixels."""
    size = int(config["image_size"])
    shorter = size if size <= SMALL_IMAGE_MAX else round(size / CROP_RATIO)
    mean, std = (tuple(float(v) for v in config[key]) for key in ("mean", "std"))
    return InputSpec(ResizeRule((size, size), shorter), mean, std)  # type: ignore[arg-type]


def _plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def dataset_name(config: dict[str, Any]) -> str | None:
    """The data a checkpoint was trained on, by name. Presets carry a dataset name (the cpu preset's is cifar10)
    that holds only when --data is that dataset; so a name other than the preset's (a --dataset-name given) is
    kept, the preset's is kept when a folder of the --data path has that name, and otherwise the --data folder
    names the data (its parent for a split folder such as train/). None when the config records no data."""
    given = str(config.get("dataset_name") or "")
    preset_name = str(PRESETS.get(str(config.get("preset")), {}).get("dataset_name", ""))
    if given and given != preset_name:
        return given
    parts = [part for part in Path(str(config.get("data") or "")).parts if part not in ("/", ".", "..")]
    if not parts:
        return None
    if given and _plain(given) in {_plain(part) for part in parts}:
        return given
    named = parts[:-1] if parts[-1].lower() in SPLIT_FOLDERS and len(parts) > 1 else parts
    return named[-1]


def normalisation(config: dict[str, Any]) -> str:
    """Where the card's mean and std come from: a preset's statistics (not measured on this data), or the run's."""
    stats = tuple(tuple(float(v) for v in config[key]) for key in ("mean", "std"))
    preset = str(config.get("preset"))
    if preset in PRESETS and stats == (tuple(PRESETS[preset]["mean"]), tuple(PRESETS[preset]["std"])):
        source = STATISTICS.get(stats)
        named = f"{source} mean and std" if source else "mean and std"
        return f"the {preset} preset's {named}, not computed from the training data"
    return "the mean and std given for this run (--mean, --std)"


def intended_use(config: dict[str, Any]) -> str:
    """What the model is for, from what it was trained on; small-image models say what they lose on photos."""
    size = int(config["image_size"])
    dataset = dataset_name(config) or "the training images"
    text = (f"Image embeddings for search, deduplication and classification of images like its training data "
            f"({dataset}), seen at {size}x{size} px.")
    if size <= SMALL_IMAGE_MAX:
        text += (f" Every input is reduced to {size}x{size} pixels before embedding, so photos lose their "
                 "detail and small objects: for photos, train a model at their resolution "
                 "(`corinfomax train --preset photo --data YOUR_PHOTOS`) and export that.")
    return text


def build_card(state: dict[str, Any], *, name: str, version: str, precision: str, embedding_dim: int,
               checkpoint_sha256: str, opset: int) -> ModelCard:
    """The card for a checkpoint; ``parity`` says the bundle is unverified until `export.parity` fills it."""
    config = state["config"]
    return ModelCard(
        name=name, version=version, embedding_dim=embedding_dim, precision=precision, backbone=config["backbone"],
        cifar_stem=bool(config.get("cifar_stem", False)), input=input_spec(config),
        intended_use=intended_use(config),
        training={
            "method": "CorInfoMax (Ozsoy et al., NeurIPS 2022, arXiv:2209.07999)",
            "dataset": dataset_name(config),
            "data": config.get("data") or None,
            "normalisation": normalisation(config),
            "epochs_trained": state.get("epoch"),
            **{key: config[key] for key in TRAINING_KEYS if key in config},
        },
        evaluation=state.get("evaluation"), checkpoint_sha256=checkpoint_sha256, opset=opset,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def write_card(bundle: Path, card: ModelCard) -> None:
    """Write the card as JSON beside the model and into the ONNX file's metadata_props."""
    model_path = bundle / MODEL_FILE
    model = onnx.load(str(model_path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({METADATA_KEY: card_text(card), "name": card.name, "version": card.version,
                  "precision": card.precision, "embedding_dim": str(card.embedding_dim)})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"CorInfoMax embedding model {card.tag} ({card.precision})"
    onnx.save(model, str(model_path))
    write_card_json(bundle, card)
