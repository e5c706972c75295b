"""The embedder every consumer shares (service, `corinfomax extract`, export's parity check):
a model bundle loaded once into an onnxruntime session."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from corinfomax.core.bundle import MODEL_FILE, read_card
from corinfomax.core.errors import BundleError
from corinfomax.core.images import DEFAULT_MAX_PIXELS, ImageSource, model_input

log = logging.getLogger(__name__)

def _cuda_driver_present() -> bool:
    # onnxruntime-gpu lists the CUDA provider even where no driver is installed, then fails noisily.
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def default_providers() -> list[str | tuple[str, dict[str, Any]]]:
    """CUDA when onnxruntime can use it (TF32 off, so fp32 bundles keep their verified parity), else CPU."""
    providers: list[str | tuple[str, dict[str, Any]]] = []
    if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_driver_present():
        providers.append(("CUDAExecutionProvider", {"use_tf32": 0}))
    return providers + ["CPUExecutionProvider"]


class Embedder:
    """Turns images into L2-normalised float32 embeddings with a model bundle.

    Args:
        bundle_dir: folder with ``model.onnx`` and ``model.json``.
        providers: onnxruntime execution providers (default: CUDA if present, else CPU).
        threads: intra-op threads (default: onnxruntime's choice; set it when several processes share cores).
        max_pixels: decompression-bomb guard for decoded images.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.card = read_card(self.bundle_dir)
        self.dim = self.card.embedding_dim
        self.resize = self.card.input.resize
        self.input_size = self.resize.size
        self.max_pixels = max_pixels
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The memory pattern caches one planned block per input shape, and every batch size is a new shape (the
        # service merges requests into batches of 1 to 64 rows): running each size twice held +66 MiB with it,
        # +33 MiB without (the arena, sized by the largest batch), at the same speed (bench/ort_memory.py).
        options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(
                str(self.bundle_dir / MODEL_FILE), options, providers=list(providers or default_providers())
            )
        except Exception as err:  # onnxruntime raises its own exception types for bad models
            raise BundleError(f"onnxruntime cannot load {self.bundle_dir / MODEL_FILE}: {err}") from err
        self.providers = self.session.get_providers()
        log.info("loaded model %s (%s, dim %d) on %s", self.card.tag, self.card.precision, self.dim,
                 ",".join(self.providers))

    def preprocess(self, source: ImageSource) -> np.ndarray:
        """Decode one image (JPEGs at reduced size: ``core.images.model_input``) and bring it to the model's input:
        uint8 ``[H, W, 3]``."""
        return model_input(source, self.resize, self.max_pixels)[0]

    def embed_arrays(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Embed preprocessed uint8 ``[N, H, W, 3]`` pixels; return float32 ``[N, D]``."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:3]) != self.input_size or pixels.shape[3] != 3:
            raise ValueError(f"expected uint8 [N, {self.input_size[0]}, {self.input_size[1]}, 3], got {pixels.shape}")
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        out = [
            self.session.run(["embedding"], {"pixels": pixels[i : i + batch_size]})[0]
            for i in range(0, len(pixels), batch_size)
        ]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, self.dim), np.float32)

    def embed_images(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """Decode, preprocess and embed images; return float32 ``[N, D]``."""
        return self.embed_arrays(np.stack([self.preprocess(s) for s in sources]))


def cpu_threads_per_worker(workers: int) -> int:
    """Intra-op threads for one of ``workers`` processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
