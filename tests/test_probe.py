"""Linear probe: fitting, the probe.npz format, and `fit_probe_on_features` on a real features folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from corinfomax.core.bundle import InputSpec, ModelCard, write_card
from corinfomax.core.images import ResizeRule
from corinfomax.serving.extract.features import FeaturesWriter, Record
from corinfomax.serving.probe import LinearProbe, ProbeError, fit_probe, fit_probe_on_features

DIM = 16
CARD = ModelCard(name="t", version="1", embedding_dim=DIM, precision="fp32", backbone="tiny_resnet",
                 input=InputSpec(ResizeRule.square(32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
                 checkpoint_sha256="f" * 64, opset=18, exported_at="2024-01-01T00:00:00+00:00")


def blobs(n_per_class: int, classes: int = 4, spread: float = 0.35, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Unit vectors around one random centre per class (what a trained model's features look like)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, DIM))
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, DIM)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [f"class{c}" for c in range(classes) for _ in range(n_per_class)]


def test_fit_separates_blobs_and_round_trips(tmp_path: Path) -> None:
    x, labels = blobs(200)
    probe = LinearProbe.fit(x, labels, l2=1e-3, model_sha256="abc")
    assert probe.accuracy(x, labels) > 0.95
    probabilities = probe.predict_proba(x[:5])
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    logits = x[:5] @ probe.weight.T + probe.bias  # the documented formula
    np.testing.assert_allclose(probabilities, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-5)

    probe.save(tmp_path / "probe.npz")
    with np.load(tmp_path / "probe.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["bias", "classes", "model_sha256", "weight"]
        assert data["weight"].dtype == np.float32 and data["classes"].dtype.kind == "U"
    loaded = LinearProbe.load(tmp_path / "probe.npz")
    assert loaded.classes == probe.classes and loaded.model_sha256 == "abc"
    np.testing.assert_array_equal(loaded.predict_proba(x), probe.predict_proba(x))


def test_fit_probe_reports_held_out_accuracy_per_l2() -> None:
    x, labels = blobs(150, spread=0.8)
    probe, report = fit_probe(x, labels, l2_grid=(1e-1, 1e-3), holdout=0.2)
    assert report["holdout_rows"] == 120 and report["train_rows"] == 480
    assert [step["l2"] for step in report["path"]] == [1e-1, 1e-3]
    assert report["holdout_accuracy"] == max(step["holdout_accuracy"] for step in report["path"]) > 0.6
    assert probe.info["train_samples"] == 600  # refit on all rows


def test_bad_inputs(tmp_path: Path) -> None:
    x, labels = blobs(10)
    with pytest.raises(ProbeError, match="at least two classes"):
        LinearProbe.fit(x, ["one"] * len(x))
    probe = LinearProbe.fit(x, labels)
    with pytest.raises(ProbeError, match="dimension 16"):
        probe.predict_proba(np.zeros((2, 8), np.float32))
    with pytest.raises(ProbeError, match="no probe file"):
        LinearProbe.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(ProbeError, match="not a probe file"):
        LinearProbe.load(tmp_path / "junk.npz")


def write_features(folder: Path, x: np.ndarray, labels: list[str | None]) -> None:
    classes = sorted({name for name in labels if name})
    writer = FeaturesWriter(folder, CARD, "float32", ["synthetic"], "listing", len(x), classes)
    writer.write_shard(0, x, [Record(f"/img/{i}.png", label, 8, 8) for i, label in enumerate(labels)])


def test_fit_on_features_folder_writes_where_the_service_looks(tmp_path: Path) -> None:
    x, labels = blobs(100)
    features = tmp_path / "features"
    write_features(features, x, [*labels[:-5], *[None] * 5])  # unlabelled rows are left out
    report = fit_probe_on_features(features, l2_grid=(1e-2,))
    assert report["path_written"] == str(features / "probe.npz") and report["holdout_accuracy"] > 0.9
    assert LinearProbe.load(features / "probe.npz").model_sha256 == CARD.checkpoint_sha256

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"")
    write_card(bundle, dataclasses.replace(CARD, checkpoint_sha256="0" * 64))
    with pytest.raises(ProbeError, match="not the model"):
        fit_probe_on_features(features, bundle, l2_grid=(1e-2,))
    assert not (bundle / "probe.npz").exists()

    unlabelled = tmp_path / "unlabelled"
    write_features(unlabelled, x, [None] * len(x))
    with pytest.raises(ProbeError, match="no labelled rows"):
        fit_probe_on_features(unlabelled)
