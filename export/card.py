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

METADATA_KEY = "corinfomax.card"
# Beyond 64 px (ImageNet-style models) resize to size/0.875 then centre-crop, the usual evaluation rule.
SMALL_IMAGE_MAX = 64
CROP_RATIO = 0.875
TRAINING_KEYS = ("preset", "projector", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
                 "alpha", "la_R", "la_mu", "R_init", "eps")


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


def intended_use(config: dict[str, Any]) -> str:
    """What the model is for, from what it was trained on; small-image models say what they lose on photos."""
    size = int(config["image_size"])
    dataset = config.get("dataset_name") or "the training images"
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
            "dataset": config.get("dataset_name") or Path(str(config.get("data", ""))).name or None,
            "data": config.get("data") or None,
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
