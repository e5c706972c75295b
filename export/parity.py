"""The export check: the bundle, run by serving's own Embedder, must match PyTorch on real images.

Thresholds follow the issue: fp32 is numerically the same model, fp16 nearly so, int8 close enough that
kNN top-1 moves by at most one point.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corinfomax.core.errors import UserError
from corinfomax.export.graph import EmbeddingGraph
from corinfomax.export.images import Sample
from corinfomax.serving.embedder import Embedder
from corinfomax.training.distributed import pick_device
from corinfomax.training.evaluate import knn_top1

log = logging.getLogger(__name__)

THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"min_cosine": 0.99999, "max_abs_diff": 1e-4},
    "fp16": {"min_cosine": 0.999},
    "int8": {"mean_cosine": 0.98, "knn_top1_drop": 0.01},
}
KNN_K = 20


class ParityError(UserError):
    """The exported model does not reproduce the PyTorch model closely enough."""


def torch_embed(graph: EmbeddingGraph, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Reference embeddings from the PyTorch graph (CUDA when present, TF32 off so fp32 means fp32)."""
    device = pick_device("auto")
    graph = graph.to(device).eval()
    out = []
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in range(0, len(pixels), batch_size):
            embedding, _ = graph(torch.from_numpy(pixels[i : i + batch_size]).to(device))
            out.append(embedding.float().cpu().numpy())
    graph.cpu()
    return np.concatenate(out)


def _knn(bank_embeddings: np.ndarray, bank: Sample, embeddings: np.ndarray, images: Sample) -> float:
    return knn_top1(torch.from_numpy(bank_embeddings), torch.from_numpy(bank.labels), torch.from_numpy(embeddings),
                    torch.from_numpy(images.labels), len(bank.classes), k=KNN_K)


def measure(graph: EmbeddingGraph, bundle: Path, precision: str, images: Sample,
            bank: Sample | None) -> dict[str, Any]:
    """Compare the bundle with ``graph`` on ``images``; with a labelled ``bank``, also compare kNN top-1."""
    embedder = Embedder(bundle)
    reference = torch_embed(graph, images.pixels)
    exported = embedder.embed_arrays(images.pixels)
    cosine = np.sum(reference * exported, 1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1) + 1e-12)
    figures: dict[str, Any] = {
        "images": len(images.pixels),
        "providers": embedder.providers,
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
        "max_abs_diff": float(np.abs(reference - exported).max()),
    }
    if precision == "int8":
        if bank is None or not bank.labelled or not images.labelled or bank.classes != images.classes:
            raise ParityError("the int8 check compares kNN top-1 and needs labelled image folders (ImageFolder "
                              "layout, same classes) for --verify-data and --calibration-data")
        ref_top1 = _knn(torch_embed(graph, bank.pixels), bank, reference, images)
        top1 = _knn(embedder.embed_arrays(bank.pixels), bank, exported, images)
        figures.update(knn_k=KNN_K, knn_bank=len(bank.pixels), knn_top1_reference=ref_top1, knn_top1=top1,
                       knn_top1_drop=ref_top1 - top1)
    log.info("parity (%s): %s", precision, figures)
    return figures


def failures(precision: str, figures: dict[str, Any]) -> list[str]:
    """The thresholds ``figures`` miss, as readable sentences (empty: the bundle passes)."""
    missed = []
    for key, limit in THRESHOLDS[precision].items():
        value = figures[key]
        bad = value > limit if key in ("max_abs_diff", "knn_top1_drop") else value < limit
        if bad:
            missed.append(f"{key} = {value:.6g} (limit {limit:g})")
    return missed
