"""Linear probe: multinomial logistic regression on embeddings, in NumPy (docs/FORMATS.md section 4).

Fitted by `corinfomax probe fit` with SciPy's full-batch L-BFGS-B (smooth, convex objective: no learning
rate to tune), used by the service with `LinearProbe.load(...).predict_proba(x)`. No torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from corinfomax.core.errors import UserError
from corinfomax.core.files import atomic_write

log = logging.getLogger(__name__)

# Regularisation path tried by `fit_probe` (strongest first, each fit warm-starts the next).
DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3)
DEFAULT_MAX_ITER = 300
SWEEP_ROWS = 10_000


class ProbeError(UserError):
    """A probe file that is missing or malformed, or labels a probe cannot be fitted on."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


@dataclass
class LinearProbe:
    """``softmax(x @ weight.T + bias)`` over ``classes``."""

    weight: np.ndarray  # float32 [C, D]
    bias: np.ndarray  # float32 [C]
    classes: list[str]
    model_sha256: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        labels: Sequence[str],
        *,
        l2: float = 1e-4,
        max_iter: int = DEFAULT_MAX_ITER,
        tol: float = 1e-5,
        model_sha256: str = "",
        init: "LinearProbe | None" = None,
    ) -> "LinearProbe":
        """Fit on features ``x`` [N, D] and string labels: mean cross-entropy + l2/2 |W|^2 on standardised x."""
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ProbeError(f"a probe needs at least two classes; the labels hold {len(classes)}")
        index = {name: i for i, name in enumerate(classes)}
        target = np.array([index[label] for label in labels])
        x = np.asarray(x, dtype=np.float64)
        # Fit on standardised features (far better conditioned, so L-BFGS needs fewer steps), then fold
        # the standardisation into weight and bias so prediction stays one affine map.
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        x = ((x - mean) / scale).astype(np.float32)  # float32 products: half the time, ample precision
        n, dim = x.shape
        n_classes = len(classes)
        onehot = np.zeros((n, n_classes))
        onehot[np.arange(n), target] = 1.0

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            weight, bias = theta[:-n_classes].reshape(n_classes, dim), theta[-n_classes:]
            logits = (x @ weight.T.astype(np.float32)).astype(np.float64) + bias
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(shifted).sum(axis=1))
            loss = float((log_norm - shifted[np.arange(n), target]).mean()) + 0.5 * l2 * float((weight * weight).sum())
            residual = (np.exp(shifted - log_norm[:, None]) - onehot) / n
            grad_w = (residual.T.astype(np.float32) @ x).astype(np.float64) + l2 * weight
            return loss, np.concatenate([grad_w.ravel(), residual.sum(axis=0)])

        if init is not None and init.classes == classes:
            init_weight = init.weight.astype(np.float64)
            theta = np.concatenate([(init_weight * scale).ravel(), init.bias + init_weight @ mean])
        else:
            theta = np.zeros(n_classes * (dim + 1))
        result = minimize(objective, theta, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-7})
        theta, iterations = result.x, int(result.nit)
        weight = theta[:-n_classes].reshape(n_classes, dim) / scale
        bias = theta[-n_classes:] - weight @ mean
        return cls(weight.astype(np.float32), bias.astype(np.float32), classes, model_sha256,
                   {"l2": l2, "iterations": iterations, "train_samples": n})

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities float32 ``[N, C]`` for embeddings ``[N, D]`` (or ``[D]``, giving ``[1, C]``)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ProbeError(f"the probe takes embeddings of dimension {self.dim}, got shape {tuple(x.shape)}")
        return _softmax(x @ self.weight.T + self.bias)

    def predict(self, x: np.ndarray) -> list[str]:
        """Most probable class name per row."""
        return [self.classes[i] for i in self.predict_proba(x).argmax(axis=1)]

    def accuracy(self, x: np.ndarray, labels: Sequence[str]) -> float:
        if len(labels) == 0:
            return float("nan")
        return float(np.mean([p == t for p, t in zip(self.predict(x), labels)]))

    def save(self, path: str | Path) -> None:
        """Write ``probe.npz`` atomically (plain arrays, loadable without pickles)."""
        path = Path(path)
        arrays: dict[str, Any] = dict(weight=self.weight.astype(np.float32), bias=self.bias.astype(np.float32),
                                      classes=np.array(self.classes, dtype=np.str_),
                                      model_sha256=np.array(self.model_sha256, dtype=np.str_))
        try:
            atomic_write(path, lambda handle: np.savez(handle, **arrays))
        except OSError as err:
            raise ProbeError(f"cannot write probe {path}: {err.strerror or err}") from err

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        try:
            with np.load(path, allow_pickle=False) as data:
                weight, bias = data["weight"].astype(np.float32), data["bias"].astype(np.float32)
                classes = [str(c) for c in data["classes"]]
                model_sha256 = str(data["model_sha256"])
        except FileNotFoundError as err:
            raise ProbeError(f"no probe file at {path} (fit one with `corinfomax probe fit`)") from err
        except (OSError, ValueError, KeyError) as err:
            raise ProbeError(f"{path} is not a probe file ({type(err).__name__}: {err})") from err
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or len(classes) != weight.shape[0]:
            raise ProbeError(f"{path} is malformed: weight {weight.shape}, bias {bias.shape}, {len(classes)} classes")
        return cls(weight, bias, classes, model_sha256)


def split_holdout(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random split into (train, held-out) row indices, so every class is in both when it can be."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    train, held = [], []
    for name in sorted(set(labels)):
        rows = rng.permutation(np.flatnonzero(labels_array == name))
        cut = int(round(len(rows) * fraction)) if len(rows) > 1 else 0
        held.append(rows[:cut])
        train.append(rows[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def fit_probe(
    x: np.ndarray,
    labels: Sequence[str],
    *,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    holdout: float = 0.2,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    model_sha256: str = "",
) -> tuple[LinearProbe, dict[str, Any]]:
    """Choose L2 on a held-out split, report held-out accuracy, then refit on all rows.

    L2 is swept on at most ``SWEEP_ROWS`` training rows (the choice barely moves with more, the cost
    does); the chosen L2 is then fitted on the whole training split (warm-started) for the reported
    held-out accuracy, and once more on every row for the probe returned. Returns the probe and a
    report with per-L2 train/held-out accuracy (plot it to see under/over-fitting). The held-out rows
    also picked L2, so the accuracy is mildly optimistic.
    """
    if not 0.0 < holdout < 1.0:
        raise ProbeError(f"--holdout must be between 0 and 1, not {holdout}")
    train, held = split_holdout(labels, holdout, seed)
    if len(held) == 0:
        raise ProbeError("too few labelled rows for a held-out split")
    labels = list(labels)
    sweep = train
    if len(train) > SWEEP_ROWS:
        sweep = np.sort(np.random.default_rng(seed).choice(train, SWEEP_ROWS, replace=False))
    y_sweep, y_train, y_held = ([labels[i] for i in rows] for rows in (sweep, train, held))
    # One BLAS thread: its threads spin-wait for each other, and on shared, busy cores the probe's
    # tall-and-skinny products took 2.5 s each with 2 threads against 0.06 s with 1 (2-core dev box).
    with threadpool_limits(limits=1, user_api="blas"):
        path, probes, probe = [], [], None
        for l2 in sorted(l2_grid, reverse=True):
            probe = LinearProbe.fit(x[sweep], y_sweep, l2=l2, max_iter=max_iter, init=probe)
            step = {"l2": l2, "train_accuracy": probe.accuracy(x[sweep], y_sweep),
                    "holdout_accuracy": probe.accuracy(x[held], y_held), "iterations": probe.info["iterations"]}
            log.info("probe l2=%g: train %.4f held-out %.4f (%d iterations)", l2, step["train_accuracy"],
                     step["holdout_accuracy"], step["iterations"])
            path.append(step)
            probes.append(probe)
        best = max(range(len(path)), key=lambda i: (path[i]["holdout_accuracy"], path[i]["l2"]))
        l2, chosen = path[best]["l2"], probes[best]
        if len(sweep) < len(train):
            chosen = LinearProbe.fit(x[train], y_train, l2=l2, max_iter=max_iter, init=chosen)
        held_accuracy = chosen.accuracy(x[held], y_held)
        final = LinearProbe.fit(x, labels, l2=l2, max_iter=max_iter, init=chosen, model_sha256=model_sha256)
    log.info("probe: l2=%g, held-out accuracy %.4f; final fit on %d rows took %d iterations",
             l2, held_accuracy, len(labels), final.info["iterations"])
    report = {"l2": l2, "holdout_accuracy": held_accuracy, "train_rows": len(train), "holdout_rows": len(held),
              "sweep_rows": len(sweep), "classes": len(final.classes), "path": path}
    return final, report


def _probe_target(out: str | Path, model_sha256: str, source: str | Path) -> Path:
    """Where to write the probe: ``out`` as a file, or a model bundle folder's ``probe.npz`` after checking the
    bundle is the model ``source`` (features or index) came from."""
    from corinfomax.core.bundle import PROBE_FILE, read_card

    target = Path(out)
    if target.is_dir():
        card = read_card(target)
        if card.checkpoint_sha256 != model_sha256:
            raise ProbeError(f"bundle {target} is not the model that produced {source} "
                             f"(checkpoint {card.checkpoint_sha256[:12]} vs {model_sha256[:12]})")
        target = target / PROBE_FILE
    if not target.parent.is_dir():
        raise ProbeError(f"cannot write {target}: folder {target.parent} does not exist")
    return target


def fit_probe_on_features(
    features_dir: str | Path,
    out: str | Path | None = None,
    **fit_options: Any,
) -> dict[str, Any]:
    """`corinfomax probe fit`: fit on the labelled rows of a features folder and write ``probe.npz``.

    ``out`` is a file path, or a model bundle folder (its ``probe.npz``, after checking the bundle is the
    model the features came from); by default ``FEATURES_DIR/probe.npz``.
    """
    from corinfomax.core.bundle import PROBE_FILE
    from corinfomax.serving.extract.features import load_features

    features = load_features(features_dir)
    model_sha256 = str(features.manifest["model"].get("checkpoint_sha256") or "")
    target = _probe_target(out if out is not None else Path(features_dir) / PROBE_FILE, model_sha256, features_dir)
    rows = [i for i, label in enumerate(features.labels) if label is not None]
    labels = [label for label in features.labels if label is not None]
    if not rows:
        raise ProbeError(f"{features_dir} has no labelled rows: extract from an ImageFolder tree "
                         "(FOLDER/<class>/image) or a .txt list with 'path<TAB>label' lines")
    probe, report = fit_probe(features.embeddings[rows], labels, model_sha256=model_sha256, **fit_options)
    probe.save(target)
    report["path_written"] = str(target)
    return report


def fit_probe_on_index(location: str, out: str | Path, **fit_options: Any) -> dict[str, Any]:
    """`corinfomax probe fit --index`: fit on the labelled items of an index (any backend) and write the probe
    to ``out`` (a file, or a model bundle folder)."""
    from corinfomax.serving.index.factory import open_index

    with open_index(location) as index:
        labelled = index.labelled()
        model_sha256 = index.model_sha256 or ""
    if not labelled.labels:
        raise ProbeError(f"index {location} has no labelled items: add items with labels first")
    target = _probe_target(out, model_sha256, location)
    probe, report = fit_probe(labelled.vectors, labelled.labels, model_sha256=model_sha256, **fit_options)
    probe.save(target)
    report["path_written"] = str(target)
    return report
