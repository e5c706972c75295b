"""The models a service serves: every bundle in a models folder, each named by its card (``name@version``) and
checked, verified and warmed up before it serves.

Loading a bundle: read its card (checked) -> an onnxruntime session -> when the bundle carries ``verify.npz``,
embed its images and compare with PyTorch's embeddings of them under the card's own parity thresholds -> one
warm-up batch -> its probe (``probe.npz``) if any. Any failure refuses that bundle with the reason and changes
nothing else: the models already loaded keep serving (as a model server's explicit load does). The memory a model
takes is measured as the growth of the process' resident memory over its load and warm-up.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import psutil

from corinfomax.core.bundle import CARD_FILE, MODEL_FILE, PROBE_FILE, ModelCard, read_card, read_verification
from corinfomax.core.errors import BadInput, BundleError, NotFound, UserError
from corinfomax.serving.embedder import Embedder

if TYPE_CHECKING:  # the probe module imports SciPy, which the index service's processes never need
    from corinfomax.serving.probe import LinearProbe

log = logging.getLogger("corinfomax.models")

MAX_NAME_CHARS = 200  # a model name in a request: `name@version`, each at most 63 characters
WARM_UP_IMAGES = 8
# Without thresholds in its card (an old export), verify.npz is held to fp16's: far looser than float32 noise.
DEFAULT_THRESHOLDS = {"min_cosine": 0.999}


def model_key(card: ModelCard) -> str:
    """How the service names a model: ``name@version`` (its card's)."""
    return f"{card.name}@{card.version}"


def resolve(name: Any, keys: Iterable[str]) -> str:
    """A request's model name as a key: ``name@version`` as given, or ``name`` when exactly one model has it."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise BadInput(f"model must be a model name or name@version of 1 to {MAX_NAME_CHARS} printable characters")
    known = sorted(keys)
    if name in known:
        return name
    matches = [key for key in known if key.split("@", 1)[0] == name]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(known) or "none"
    if matches:
        raise BadInput(f"model {name!r} is ambiguous: give name@version ({', '.join(matches)})")
    raise NotFound(f"no model {name[:100]!r} is loaded (models: {listed})")


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is meant as a bundle (it holds a model card or a model); other folders are ignored."""
    return folder.is_dir() and ((folder / CARD_FILE).exists() or (folder / MODEL_FILE).exists())


def check_parity(embedder: Embedder, bundle: Path) -> int:
    """Embed the bundle's verification images here and compare with PyTorch's embeddings of them under the card's
    parity thresholds; return how many images were checked (0: the bundle has no ``verify.npz``)."""
    card = embedder.card
    verification = read_verification(bundle, card)
    if verification is None:
        return 0
    ours = embedder.embed_arrays(verification.pixels).astype(np.float64)
    reference = verification.embeddings.astype(np.float64)
    cosine = np.sum(ours * reference, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1) + 1e-12)
    figures = {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
               "max_abs_diff": float(np.abs(ours - reference).max())}
    thresholds = card.parity.get("thresholds") or DEFAULT_THRESHOLDS
    missed = [f"{name} = {figures[name]:.6g} (limit {limit:g})" for name, limit in thresholds.items()
              if name in figures and (figures[name] > limit if name == "max_abs_diff" else figures[name] < limit)]
    if missed:
        raise BundleError(f"{bundle.name}: its verification images embed differently here than in PyTorch at export "
                          f"({'; '.join(missed)}): a damaged or mismatched model.onnx")
    return len(verification.pixels)


@dataclass
class LoadedModel:
    """A bundle ready to serve: its embedder, its probe, and what loading it cost."""

    key: str
    path: Path
    embedder: Embedder
    probe: LinearProbe | None
    memory_bytes: int
    load_seconds: float
    verified_images: int

    @property
    def card(self) -> ModelCard:
        return self.embedder.card

    def record(self) -> dict[str, Any]:
        """What the catalog keeps about an accepted model (``path`` for other processes to load it)."""
        return {**card_record(self.card, self.path), "memory_bytes": self.memory_bytes,
                "load_seconds": round(self.load_seconds, 3), "verified_images": self.verified_images,
                "probe": self.probe is not None}


def card_record(card: ModelCard, path: Path) -> dict[str, Any]:
    """What names a model and where it is: enough for another process to load it (``load_embedder``)."""
    return {"key": model_key(card), "name": card.name, "version": card.version, "dim": card.embedding_dim,
            "precision": card.precision, "checkpoint_sha256": card.checkpoint_sha256, "path": str(path)}


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A model's record as ``/info`` shows it: without the path on this machine."""
    return {key: value for key, value in record.items() if key != "path"}


def _resident() -> int:
    """The process' resident memory, after handing freed heap pages back (glibc's malloc_trim): otherwise a model
    loaded where an earlier one was freed reuses those pages and seems to take nothing."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may read low after frees
        pass
    return int(psutil.Process().memory_info().rss)


def load_model(path: Path, threads: int | None, max_pixels: int, probe_path: Path | None = None) -> LoadedModel:
    """Load, verify and warm up one bundle (BundleError with the reason when it cannot serve).

    Its memory: the growth of resident memory over the load and warm-up, and at least the model file's size (its
    weights are held once in memory whatever the allocator reuses)."""
    from corinfomax.serving.probe import LinearProbe

    before, started = _resident(), time.perf_counter()
    embedder = Embedder(path, threads=threads, max_pixels=max_pixels)
    verified = check_parity(embedder, path)
    height, width = embedder.input_size
    embedder.embed_arrays(np.zeros((WARM_UP_IMAGES, height, width, 3), np.uint8))  # the first call plans the graph
    probe_path = probe_path or (path / PROBE_FILE if (path / PROBE_FILE).is_file() else None)
    probe = None
    if probe_path is not None:
        try:
            probe = LinearProbe.load(probe_path)
        except UserError as err:
            raise BundleError(f"{path.name}: {err}") from err
        if probe.dim != embedder.dim:
            raise BundleError(f"probe {probe_path} takes {probe.dim}-dim embeddings, the model makes {embedder.dim}")
    memory = max(_resident() - before, (path / MODEL_FILE).stat().st_size)
    return LoadedModel(model_key(embedder.card), path, embedder, probe, memory, time.perf_counter() - started,
                       verified)


class ModelRegistry:
    """Every bundle directly under ``folder`` plus the ``default`` bundle (wherever it is), loaded once each.

    Args:
        folder: the models folder (``CORINFOMAX_MODELS``); None for the default bundle only.
        default: the bundle that serves the default collection (``CORINFOMAX_MODEL``); it must load.
        default_probe: a probe for the default bundle instead of its own (``CORINFOMAX_PROBE``).
        threads: onnxruntime intra-op threads per model; max_pixels: per decoded image.
    """

    def __init__(self, folder: Path | None, default: Path, default_probe: Path | None = None,
                 threads: int | None = None, max_pixels: int = 64_000_000) -> None:
        self.folder, self.default_path, self.default_probe = folder, default, default_probe
        self.threads, self.max_pixels = threads, max_pixels
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        loaded = self._load(default, probe_path=default_probe)  # raises: no service without its default model
        self.default_key = loaded.key
        self.reload()

    def reload(self) -> tuple[list[str], list[dict[str, str]]]:
        """Load the folder's bundles not loaded yet; return (keys loaded now, [{"path", "error"}] refused)."""
        loaded, refused = [], []
        with self._lock:
            known = {model.path.resolve() for model in self._models.values()}
            for path in self._bundles():
                if path.resolve() in known:
                    continue
                try:
                    loaded.append(self._load(path).key)
                except UserError as err:
                    log.warning("model bundle %s refused: %s", path, err)
                    refused.append({"path": path.name, "error": str(err)})
        return loaded, refused

    def _bundles(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(path for path in self.folder.iterdir() if is_bundle(path))

    def _load(self, path: Path, probe_path: Path | None = None) -> LoadedModel:
        key = model_key(read_card(path))
        if key in self._models:
            raise BundleError(f"{path.name}: model {key} is already loaded from {self._models[key].path.name}")
        model = load_model(path, self.threads, self.max_pixels, probe_path)
        self._models[model.key] = model
        log.info("model %s ready (%s; %d verification images matched; %.1f MiB, %.2f s)", model.key, path,
                 model.verified_images, model.memory_bytes / 2**20, model.load_seconds)
        return model

    def load_accepted(self, record: dict[str, Any]) -> LoadedModel:
        """Load a model another process accepted (the catalog's ``record``), here too, checked the same way."""
        with self._lock:
            if record["key"] not in self._models:
                model = self._load(Path(record["path"]))
                if model.key != record["key"]:
                    del self._models[model.key]
                    raise BundleError(f"{record['path']} now holds model {model.key}, not {record['key']}")
            return self._models[record["key"]]

    def resolve(self, name: Any) -> str:
        return resolve(name, self._models)

    def get(self, key: str) -> LoadedModel:
        return self._models[key]

    def has(self, key: str) -> bool:
        return key in self._models

    def models(self) -> list[LoadedModel]:
        return sorted(self._models.values(), key=lambda model: model.key)


def load_embedder(record: dict[str, Any], threads: int | None = 1) -> Embedder:
    """An embedder for a model the catalog accepted, for work outside the API (re-embedding, fanned-out adds)."""
    embedder = Embedder(record["path"], threads=threads)
    if model_key(embedder.card) != record["key"]:
        raise BundleError(f"{record['path']} now holds model {model_key(embedder.card)}, not {record['key']}")
    return embedder
