"""Service settings from the environment (read once per process), and the model/probe loading they imply."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from corinfomax.core.errors import BundleError
from corinfomax.core.images import DEFAULT_MAX_PIXELS
from corinfomax.core.thumbnails import DEFAULT_SIDE, MAX_SIDE
from corinfomax.serving.embedder import cpu_threads_per_worker
from corinfomax.serving.index.originals import DEFAULT_MAX_BYTES, MAX_BYTES_VARIABLE

log = logging.getLogger(__name__)

# The checkout this file lives in (serving/api/config.py).
REPO = Path(__file__).resolve().parents[2]


def _inside_bento() -> bool:
    """Whether this is a Bento being served: `bentoml serve <tag>` runs in the stored Bento's ``src/`` folder,
    beside ``bento.yaml`` (a container likewise, in /home/bentoml/bento/src)."""
    return (Path.cwd().parent / "bento.yaml").is_file()


def _shipped() -> Path:
    """Where the default model and the demo images ship: the Bento's copy inside a Bento (an installed wheel
    has no models/ or demo/ beside it), else the checkout."""
    return Path.cwd() if _inside_bento() else REPO


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise BundleError(f"{name}={raw!r} is not an integer") from err


def _demo_dir(raw: str | None) -> Path | None:
    """CORINFOMAX_DEMO_DIR; unset means the shipped demo collection (checkout or Bento), empty means none."""
    if raw is None:
        default = _shipped() / "demo" / "images"
        return default if default.is_dir() else None
    return Path(raw) if raw else None


def _models_dir(raw: str | None) -> Path | None:
    """CORINFOMAX_MODELS; unset means the shipped models folder (checkout or Bento), empty means none."""
    if raw is None:
        return _shipped() / "models"
    return Path(raw) if raw else None


def _thumbnail_side(side: int) -> int:
    if not 0 <= side <= MAX_SIDE:
        raise BundleError(f"CORINFOMAX_THUMBNAIL_PX={side}: give 0 (no thumbnails) to {MAX_SIDE} pixels")
    return side


def _index_location(raw: str | None) -> str:
    """CORINFOMAX_INDEX, else ``data/index`` under the working directory, except inside a Bento.

    A folder is the embedded index, a ``.db`` file a Milvus Lite one, ``milvus://host:port/collection`` a
    Milvus server (``serving.index.factory.open_index``); a URL is kept as given.

    An index in a Bento's ``src/`` folder would grow the stored Bento and vanish with it, so a Bento keeps it
    under BentoML's home (``$BENTOML_HOME/data/index``: ~/bentoml/data/index locally, /home/bentoml/data/index
    in a container).
    A path is made absolute so the start-up log says exactly where it is.
    """
    if raw and raw.startswith("milvus://"):
        return raw
    if raw:
        return str(Path(raw).absolute())
    if _inside_bento():
        home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
        return str(home.absolute() / "data" / "index")
    return str(Path.cwd() / "data" / "index")


def model_threads(workers: int) -> int:
    """Intra-op threads per worker: its share of the cores less one for the event loop (HTTP, decoding).

    The model runs in a thread beside the worker's event loop; giving onnxruntime every core made its
    spinning threads fight the loop (bench/serve_load.py: 1 thread beat 2 on 2 cores).
    """
    return max(1, cpu_threads_per_worker(workers) - 1)


# The longest expected wait a request is admitted with (admission.py). Measured with bench/serve_backpressure.py:
# see docs/LIMITS.md "Backpressure".
DEFAULT_MAX_QUEUE_MS = 500


@dataclass(frozen=True)
class Settings:
    model: str  # bundle folder or BentoML model tag
    index: str  # an index folder, a Milvus Lite .db file or milvus://host:port/collection
    probe: Path | None  # a probe for the CORINFOMAX_MODEL bundle instead of its own probe.npz
    api_key: str | None
    workers: int
    max_request_bytes: int
    max_pixels: int  # per image
    max_request_pixels: int  # all images of one request together: bounds the decode time of one request
    max_images: int  # per request
    body_seconds: int  # the whole request body must arrive within this many seconds of the request's start
    threads: int  # onnxruntime intra-op threads per worker (default: model_threads)
    batch_size: int  # most images per model call when concurrent requests are merged
    batch_wait_ms: int  # extra wait for more requests before a model call that is not full (0: none)
    max_queue_ms: int  # a request expected to wait longer is answered 503 at once (admission.py; 0: never)
    allow_private_urls: bool  # only for tests and closed networks
    access_log: bool  # BentoML's per-request access log line (CORINFOMAX_ACCESS_LOG=0 saves CPU per request)
    direct_apis: bool  # answer the APIs past BentoML's per-request machinery (direct.py; CORINFOMAX_DIRECT_APIS=0: not)
    index_channel: bool  # call IndexOwner over a Unix socket of ours (channel.py; CORINFOMAX_INDEX_CHANNEL=0: not)
    demo_dir: Path | None  # images indexed on first start when the index is empty ("" disables)
    thumbnail_side: int  # side of the thumbnail stored with each added image, in pixels (0: none)
    models_dir: Path | None  # every bundle directly under it is loaded (CORINFOMAX_MODELS; "" for none)
    keep_originals: bool  # whether the default collection, when first made, keeps the images added to it
    originals_max_bytes: int  # cap on the kept originals of all collections together

    @classmethod
    def from_env(cls) -> "Settings":
        probe = os.environ.get("CORINFOMAX_PROBE")
        workers = max(1, _int("CORINFOMAX_WORKERS", 1))
        return cls(
            model=os.environ.get("CORINFOMAX_MODEL", str(_shipped() / "models" / "default")),
            index=_index_location(os.environ.get("CORINFOMAX_INDEX")),
            probe=Path(probe) if probe else None,
            api_key=os.environ.get("CORINFOMAX_API_KEY") or None,
            workers=workers,
            threads=max(1, _int("CORINFOMAX_THREADS", model_threads(workers))),
            max_request_bytes=_int("CORINFOMAX_MAX_REQUEST_BYTES", 32 << 20),
            max_pixels=_int("CORINFOMAX_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            max_request_pixels=_int("CORINFOMAX_MAX_REQUEST_PIXELS", 128_000_000),
            max_images=_int("CORINFOMAX_MAX_IMAGES", 64),
            body_seconds=max(1, _int("CORINFOMAX_BODY_TIMEOUT_S", 30)),
            batch_size=max(1, _int("CORINFOMAX_BATCH_SIZE", 64)),
            batch_wait_ms=max(0, _int("CORINFOMAX_BATCH_WAIT_MS", 0)),
            max_queue_ms=max(0, _int("CORINFOMAX_MAX_QUEUE_MS", DEFAULT_MAX_QUEUE_MS)),
            allow_private_urls=os.environ.get("CORINFOMAX_ALLOW_PRIVATE_URLS") == "1",
            access_log=os.environ.get("CORINFOMAX_ACCESS_LOG", "1") != "0",
            direct_apis=os.environ.get("CORINFOMAX_DIRECT_APIS", "1") != "0",
            index_channel=os.environ.get("CORINFOMAX_INDEX_CHANNEL", "1") != "0",
            demo_dir=_demo_dir(os.environ.get("CORINFOMAX_DEMO_DIR")),
            thumbnail_side=_thumbnail_side(_int("CORINFOMAX_THUMBNAIL_PX", DEFAULT_SIDE)),
            models_dir=_models_dir(os.environ.get("CORINFOMAX_MODELS")),
            keep_originals=os.environ.get("CORINFOMAX_KEEP_ORIGINALS", "1") != "0",
            originals_max_bytes=_int(MAX_BYTES_VARIABLE, DEFAULT_MAX_BYTES),
        )

    def bundle_dir(self) -> Path:
        """The bundle folder: ``model`` as a path if it is one, else as a BentoML model tag."""
        path = Path(self.model)
        if path.is_dir():
            return path
        import bentoml

        try:
            return Path(bentoml.models.get(self.model).path)
        except Exception as err:  # bentoml raises NotFound or a tag-format error
            raise BundleError(f"CORINFOMAX_MODEL={self.model!r} is neither a bundle folder nor a BentoML model tag "
                              f"in the local model store ({err})") from err


@functools.cache
def settings() -> Settings:
    """The service's settings, read from the environment once per process (its modules share this one copy)."""
    return Settings.from_env()
