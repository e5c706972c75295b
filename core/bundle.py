"""The bundle contract between export (writer) and serving (reader), docs/FORMATS.md section 2.

A bundle is a folder holding ``model.onnx``, its model card ``model.json`` and optionally ``probe.npz`` and
``verify.npz`` (a few verification images with PyTorch's embeddings of them, so a service can check the bundle on
its own machine before serving it). The card is one typed object, checked in one place (`ModelCard.from_json`)
whoever reads it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from corinfomax.core.errors import BundleError, CardError
from corinfomax.core.files import atomic_write, atomic_write_text
from corinfomax.core.images import ResizeRule

BUNDLE_FORMAT = "corinfomax-bundle/1"
CARD_FILE = "model.json"
MODEL_FILE = "model.onnx"
PROBE_FILE = "probe.npz"
VERIFY_FILE = "verify.npz"
VERIFY_IMAGES = 8  # images in verify.npz: enough to catch a wrong or damaged model, small enough to ship
PRECISIONS = ("fp32", "fp16", "int8")
# BentoML tags allow lowercase letters, digits, '-', '_' and '.'; keep names valid everywhere.
_TAG_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_tag_part(value: str, what: str) -> str:
    """Return ``value`` if it is a valid tag part (name or version), else raise CardError."""
    if not _TAG_PART.match(value):
        raise CardError(f"invalid model {what} {value!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'")
    return value


@dataclass(frozen=True)
class InputSpec:
    """What a client sends: uint8 RGB NHWC pixels made by ``resize``; ``mean``/``std`` are applied in the graph."""

    resize: ResizeRule
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def size(self) -> tuple[int, int]:
        return self.resize.size

    def to_json(self) -> dict[str, Any]:
        return {
            "size": list(self.resize.size), "channels": "RGB", "layout": "NHWC", "dtype": "uint8",
            "resize": {"shorter_side": self.resize.shorter_side, "interpolation": self.resize.interpolation},
            "crop": "center", "mean": list(self.mean), "std": list(self.std),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputSpec:
        height, width = (int(v) for v in data["size"])
        resize = data.get("resize", {})
        rule = ResizeRule((height, width), int(resize.get("shorter_side", min(height, width))),
                          str(resize.get("interpolation", "bicubic")))
        return cls(rule, _triple(data["mean"]), _triple(data["std"]))


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


@dataclass
class ModelCard:
    """The model card: what a client needs to use the bundle, and where it came from."""

    name: str
    version: str
    embedding_dim: int
    precision: str
    backbone: str
    input: InputSpec
    checkpoint_sha256: str
    opset: int
    exported_at: str
    cifar_stem: bool = False
    intended_use: str | None = None  # what the model is for and where it is weak, in words for people
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    parity: dict[str, Any] = field(default_factory=lambda: {"verified": False})
    provenance: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    outputs: dict[str, str] = field(default_factory=lambda: {
        "embedding": "L2-normalised float32 [N, D]: cosine similarity = inner product",
        "features": "raw pooled backbone features, float32 [N, D]"})

    def __post_init__(self) -> None:
        check_tag_part(self.name, "name")
        check_tag_part(self.version, "version")
        if self.precision not in PRECISIONS:
            raise CardError(f"unknown precision {self.precision!r}; a card holds one of {', '.join(PRECISIONS)}")
        if self.embedding_dim < 1:
            raise CardError(f"embedding_dim must be positive, got {self.embedding_dim}")

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as ``model.json`` (unset optional sections are left out)."""
        data: dict[str, Any] = {"format": BUNDLE_FORMAT}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "input":
                value = value.to_json()
            if value is not None or item.name == "evaluation":
                data[item.name] = value
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "model card") -> ModelCard:
        """Check and read a card's JSON object; every problem is a BundleError naming ``where``."""
        if not isinstance(data, dict):
            raise BundleError(f"{where} is not a JSON object")
        if data.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{where} has format {data.get('format')!r}; this version reads {BUNDLE_FORMAT!r}")
        names = {item.name for item in dataclasses.fields(cls)}
        try:
            values = {key: value for key, value in data.items() if key in names}
            values["input"] = InputSpec.from_json(data["input"])
            values["embedding_dim"], values["opset"] = int(data["embedding_dim"]), int(data["opset"])
            return cls(**values)
        except CardError as err:
            raise CardError(f"{where}: {err}") from err
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{where} is malformed ({type(err).__name__}: {err})") from err


def read_card(bundle_dir: str | Path) -> ModelCard:
    """Read and check a bundle's model card (the folder must also hold the model)."""
    bundle = Path(bundle_dir)
    card_path, model_path = bundle / CARD_FILE, bundle / MODEL_FILE
    if not bundle.is_dir():
        raise BundleError(f"model bundle {bundle} does not exist or is not a folder")
    if not card_path.is_file() or not model_path.is_file():
        raise BundleError(f"{bundle} is not a model bundle: it needs {CARD_FILE} and {MODEL_FILE} "
                          "(see `corinfomax export`)")
    try:
        data = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"unreadable model card {card_path}: {err}") from err
    return ModelCard.from_json(data, str(card_path))


def card_text(card: ModelCard) -> str:
    """The card as the JSON text stored in ``model.json`` (and in the ONNX file's metadata)."""
    return json.dumps(card.to_json(), indent=2)


def write_card(bundle_dir: str | Path, card: ModelCard) -> None:
    """Write ``model.json`` atomically."""
    atomic_write_text(Path(bundle_dir) / CARD_FILE, card_text(card) + "\n")


@dataclass(frozen=True)
class Verification:
    """``verify.npz``: preprocessed images (the model's input) and the PyTorch fp32 reference embeddings of them."""

    pixels: np.ndarray  # uint8 [N, H, W, 3]
    embeddings: np.ndarray  # float32 [N, D]


def write_verification(bundle_dir: str | Path, pixels: np.ndarray, embeddings: np.ndarray) -> None:
    """Write ``verify.npz`` atomically (NumPy arrays only, no pickles)."""
    buffer = io.BytesIO()
    np.savez(buffer, pixels=np.ascontiguousarray(pixels, np.uint8),
             embeddings=np.ascontiguousarray(embeddings, np.float32))
    atomic_write(Path(bundle_dir) / VERIFY_FILE, lambda handle: handle.write(buffer.getvalue()))


def read_verification(bundle_dir: str | Path, card: ModelCard) -> Verification | None:
    """The bundle's ``verify.npz`` checked against its card, or None when it has none."""
    path = Path(bundle_dir) / VERIFY_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            pixels, embeddings = data["pixels"], data["embeddings"]
    except (OSError, ValueError, KeyError) as err:
        raise BundleError(f"unreadable {path}: {err}") from err
    height, width = card.input.size
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (height, width, 3):
        raise BundleError(f"{path}: pixels must be uint8 [N, {height}, {width}, 3], got {pixels.dtype} "
                          f"{list(pixels.shape)}")
    if embeddings.shape != (len(pixels), card.embedding_dim) or not np.isfinite(embeddings).all():
        raise BundleError(f"{path}: embeddings must be finite [{len(pixels)}, {card.embedding_dim}], got "
                          f"{list(embeddings.shape)}")
    return Verification(pixels, embeddings.astype(np.float32))
