"""The model card (docs/FORMATS.md section 2): what a client needs to use the bundle, and where it came from."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from corinfomax_cli import UserError
from serving.embedder import BUNDLE_FORMAT

METADATA_KEY = "corinfomax.card"
# BentoML tags allow lowercase letters, digits, '-', '_' and '.'; keep names valid everywhere.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Beyond 64 px (ImageNet-style models) resize to size/0.875 then centre-crop, the usual evaluation rule.
SMALL_IMAGE_MAX = 64
CROP_RATIO = 0.875
TRAINING_KEYS = ("preset", "projector", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
                 "alpha", "la_R", "la_mu", "R_init", "eps")


class CardError(UserError):
    """A model name or version that cannot be used as a BentoML tag."""


def check_tag_part(value: str, what: str) -> str:
    """Return ``value`` if it is a valid tag part (name or version), else raise CardError."""
    if not _NAME.match(value):
        raise CardError(f"invalid model {what} {value!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'")
    return value


def default_name(checkpoint: Path) -> str:
    """The run folder's name, lowercased, with characters a tag cannot hold replaced by '-'."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    name = re.sub(r"[^a-z0-9._-]+", "-", folder.resolve().name.lower()).strip("-._")
    return name[:63] or "corinfomax"


def input_spec(config: dict[str, Any]) -> dict[str, Any]:
    """The resize/crop rule clients apply before sending uint8 pixels."""
    size = int(config["image_size"])
    shorter = size if size <= SMALL_IMAGE_MAX else round(size / CROP_RATIO)
    return {
        "size": [size, size], "channels": "RGB", "layout": "NHWC", "dtype": "uint8",
        "resize": {"shorter_side": shorter, "interpolation": "bicubic"}, "crop": "center",
        "mean": [float(v) for v in config["mean"]], "std": [float(v) for v in config["std"]],
    }


def build_card(state: dict[str, Any], *, name: str, version: str, precision: str, embedding_dim: int,
               checkpoint_sha256: str, opset: int) -> dict[str, Any]:
    """The card for a checkpoint; ``parity`` says the bundle is unverified until `export.parity` fills it."""
    config = state["config"]
    return {
        "format": BUNDLE_FORMAT,
        "name": name,
        "version": version,
        "embedding_dim": embedding_dim,
        "precision": precision,
        "backbone": config["backbone"],
        "cifar_stem": bool(config.get("cifar_stem", False)),
        "input": input_spec(config),
        "outputs": {"embedding": "L2-normalised float32 [N, D]: cosine similarity = inner product",
                    "features": "raw pooled backbone features, float32 [N, D]"},
        "training": {
            "method": "CorInfoMax (Ozsoy et al., NeurIPS 2022, arXiv:2209.07999)",
            "dataset": config.get("dataset_name") or Path(str(config.get("data", ""))).name or None,
            "data": config.get("data") or None,
            "epochs_trained": state.get("epoch"),
            **{key: config[key] for key in TRAINING_KEYS if key in config},
        },
        "evaluation": state.get("evaluation"),
        "parity": {"verified": False},
        "checkpoint_sha256": checkpoint_sha256,
        "opset": opset,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_card(bundle: Path, model_file: str, card_file: str, card: dict[str, Any]) -> None:
    """Write the card as JSON beside the model and into the ONNX file's metadata_props."""
    text = json.dumps(card, indent=2, sort_keys=False)
    model_path = bundle / model_file
    model = onnx.load(str(model_path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({METADATA_KEY: text, "name": card["name"], "version": card["version"],
                  "precision": card["precision"], "embedding_dim": str(card["embedding_dim"])})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"CorInfoMax embedding model {card['name']}:{card['version']} ({card['precision']})"
    onnx.save(model, str(model_path))
    (bundle / card_file).write_text(text + "\n")
