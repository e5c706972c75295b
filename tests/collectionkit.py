"""The collections tests' stand-in models and helpers (the snapshot tests build the same collections)."""

from __future__ import annotations

from typing import Any

import numpy as np

from corinfomax.core.errors import BadInput
from corinfomax.core.images import ResizeRule, load_image, to_model_input
from corinfomax.serving.index.collections import Collections
from corinfomax.serving.index.factory import open_layout
from corinfomax.serving.index.generations import Encoder
from corinfomax.serving.index.originals import Budget
from corinfomax.serving.index.reembed import Jobs


class Pixels:
    """A stand-in model: an image's 8x8 pixels through a fixed random projection to ``dim`` dims."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim = dim
        self.weight = np.random.default_rng(seed).normal(size=(8 * 8 * 3, dim)).astype(np.float32)

    def preprocess(self, source: Any) -> np.ndarray:
        return to_model_input(load_image(source), ResizeRule((8, 8), 8, "bicubic"))

    def embed_arrays(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = (pixels.reshape(len(pixels), -1).astype(np.float32) / 255 - 0.5) @ self.weight
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed(self, images: list[bytes]) -> np.ndarray:
        return self.embed_arrays(np.stack([self.preprocess(data) for data in images]))


MODELS = {"a@1": Pixels(16, 0), "b@1": Pixels(24, 1)}


def record(key: str) -> dict[str, Any]:
    return {"key": key, "name": key.split("@")[0], "version": "1", "dim": MODELS[key].dim,
            "checkpoint_sha256": key, "path": "/nowhere"}


def encoders(key: str) -> Encoder:
    if key not in MODELS:
        raise BadInput(f"no model {key}")
    return MODELS[key]


def opened(location: str, budget: int = 1 << 30) -> tuple[Collections, Jobs]:
    collections = Collections(open_layout(location), encoders, Budget(budget))
    collections.open(record("a@1"), keep_originals=True)
    return collections, Jobs(collections)


def ids_of(collections: Collections, name: str | None = None) -> list[int]:
    with collections.reading(name) as store:
        return store.id_list().tolist()


def add_images(collections: Collections, images: list[bytes], name: str | None = None,
               key: str = "a@1") -> list[int]:
    return collections.add(name, MODELS[key].embed(images), [{"n": i} for i in range(len(images))],
                           images=images, model=key)
