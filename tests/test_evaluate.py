"""`corinfomax eval`: weighted kNN, linear probes, and the checkpoint report on real CIFAR-10 images (issue 5)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corinfomax.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from corinfomax.training.data import normalize
from corinfomax.training.eval_cli import add_eval_arguments, run_eval_command
from corinfomax.training.evaluate import (
    REPORT_FORMAT,
    EvalError,
    evaluate_checkpoint,
    extract_features,
    knn_top1,
    linear_probe,
    raw_pixel_features,
)
from corinfomax.training.models import build_backbone


@pytest.fixture(autouse=True)
def private_image_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the decoded-image cache of these tests out of the user's home."""
    monkeypatch.setenv("CORINFOMAX_CACHE", str(tmp_path_factory.getbasetemp() / "image-cache"))


def numpy_weighted_knn(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, k: int, t: float,
                       c: int) -> np.ndarray:
    """Brute-force reference: cosine similarities, k best, class votes weighted by exp(sim / t)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    predictions = []
    for row in test @ train.T:
        best = np.argsort(-row)[:k]
        votes = np.zeros(c)
        np.add.at(votes, train_y[best], np.exp(row[best] / t))
        predictions.append(votes.argmax())
    return np.array(predictions)


def parse_eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_knn_matches_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 16)), rng.normal(size=(70, 16))
    train_y, test_y = rng.integers(0, 5, 300), rng.integers(0, 5, 70)
    want = numpy_weighted_knn(train, train_y, test, k=20, t=0.1, c=5)
    got = knn_top1(torch.from_numpy(train), torch.from_numpy(train_y), torch.from_numpy(test),
                   torch.from_numpy(test_y), num_classes=5, k=20, temperature=0.1, chunk_size=16)
    assert got == pytest.approx(float((want == test_y).mean()))


def test_knn_votes_are_weighted_by_similarity() -> None:
    # One very close class-1 neighbour outvotes two mediocre class-0 neighbours at a low temperature.
    train = torch.tensor([[1.0, 0.02], [1.0, 0.6], [1.0, -0.6]])
    train_y, test, test_y = torch.tensor([1, 0, 0]), torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_top1(train, train_y, test, test_y, num_classes=2, k=3, temperature=0.05) == 1.0
    assert knn_top1(train, train_y, test, test_y, num_classes=2, k=3, temperature=100.0) == 0.0
    assert knn_top1(train, train_y, test, test_y, num_classes=2, k=500) == 1.0  # k is capped at N
    with pytest.raises(EvalError, match="k must be"):
        knn_top1(train, train_y, test, test_y, num_classes=2, k=0)


@pytest.mark.parametrize("mode", ["fast", "paper"])
def test_linear_probe_separates_clusters_and_not_noise(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 32, generator=gen)
    y_train, y_test = torch.arange(400) % 4, torch.arange(200) % 4
    x_train = centres[y_train] + torch.randn(400, 32, generator=gen)
    x_test = centres[y_test] + torch.randn(200, 32, generator=gen)
    assert linear_probe(x_train, y_train, x_test, y_test, num_classes=4, mode=mode) > 0.95
    shuffled = y_test[torch.randperm(200, generator=gen)]
    assert linear_probe(x_train, y_train, x_test, shuffled, num_classes=4, mode=mode) < 0.45
    with pytest.raises(EvalError, match="unknown linear probe mode"):
        linear_probe(x_train, y_train, x_test, y_test, num_classes=4, mode="slow")


def test_extract_features_is_the_eval_mode_backbone() -> None:
    torch.manual_seed(0)
    backbone, dim = build_backbone("tiny_resnet", cifar_stem=True)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    feats = extract_features(backbone, images, mean, std, batch_size=4)
    assert feats.shape == (10, dim) and feats.dtype == torch.float32
    assert not backbone.training
    with torch.no_grad():
        torch.testing.assert_close(feats, backbone(normalize(images, mean, std)), rtol=1e-4, atol=1e-5)


def test_raw_pixel_features_are_the_normalised_pixels_flattened() -> None:
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    feats = raw_pixel_features(images, mean, std)
    assert feats.shape == (5, 192) and feats.dtype == torch.float32
    expected = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(feats.double(), expected.flatten(1), rtol=0, atol=1e-5)


def test_report_on_cifar10(tiny_checkpoint: Path, cifar10: Path) -> None:
    report = evaluate_checkpoint(tiny_checkpoint, cifar10 / "train", cifar10 / "test", k=20,
                                 limit_per_class=10, device="cpu")
    assert report["format"] == REPORT_FORMAT and report["epoch"] == 1
    assert report["data"]["num_train"] == report["data"]["num_test"] == 100
    assert report["model"] == {"backbone": "tiny_resnet", "cifar_stem": True, "image_size": 32,
                               "projector": "64-32", "feature_dim": 256}
    assert list(report["results"]) == ["raw_pixels", "random_init", "trained"]
    for result in report["results"].values():
        assert 0.0 <= result["knn_top1"] <= 1.0 and 0.0 <= result["linear_top1"] <= 1.0
    assert any("JPEG quality 75" in note for note in report["notes"])
    json.dumps(report)  # plain JSON types only


def test_cli_writes_json_atomically_and_prints_table(
    tiny_checkpoint: Path, cifar10: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reports" / "eval.json"
    args = parse_eval_args("--checkpoint", str(tiny_checkpoint.parent), "--train-data", str(cifar10 / "train"),
                           "--test-data", str(cifar10 / "test"), "--out", str(out), "--linear", "none",
                           "--limit-per-class", "5", "--k", "10", "--no-baseline", "--device", "cpu")
    assert run_eval_command(args) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["trained"] and report["results"]["trained"]["linear_top1"] is None
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary file left behind
    printed = capsys.readouterr().out
    assert "kNN@10" in printed and "trained" in printed and "JPEG" in printed


def test_weights_of_another_architecture_are_a_user_error(tiny_checkpoint: Path, cifar10: Path, tmp_path: Path) -> None:
    state = load_checkpoint(tiny_checkpoint)
    state["config"]["backbone"] = "resnet18"
    bad = tmp_path / "checkpoint.pt"
    save_checkpoint(bad, {k: v for k, v in state.items() if k != "format"})
    out = tmp_path / "eval.json"
    args = parse_eval_args("--checkpoint", str(bad), "--train-data", str(cifar10 / "train"),
                           "--test-data", str(cifar10 / "test"), "--out", str(out), "--limit-per-class", "2")
    with pytest.raises(CheckpointError, match=r"another architecture.*'resnet18'"):
        run_eval_command(args)
    assert not out.exists()


@pytest.mark.slow  # a subprocess
def test_eval_command_line_builds_without_pytorch() -> None:
    code = ("import argparse, sys; from corinfomax.training.eval_cli import add_eval_arguments; "
            "add_eval_arguments(argparse.ArgumentParser()); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_bad_options_and_mismatched_folders(tiny_checkpoint: Path, cifar10: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="unknown --linear"):
        evaluate_checkpoint(tiny_checkpoint, cifar10 / "train", cifar10 / "test", linear="svm")
    with pytest.raises(EvalError, match="must all be positive"):
        evaluate_checkpoint(tiny_checkpoint, cifar10 / "train", cifar10 / "test", k=0)
    two_classes = tmp_path / "two"
    two_classes.mkdir()
    for name in ("cat", "dog"):
        (two_classes / name).symlink_to(cifar10 / "test" / name, target_is_directory=True)
    with pytest.raises(EvalError, match="different classes"):
        evaluate_checkpoint(tiny_checkpoint, cifar10 / "train", two_classes, limit_per_class=2)


@pytest.mark.slow  # a subprocess
def test_cli_exits_2_without_traceback_on_a_missing_checkpoint(cifar10: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "corinfomax"), "eval", "--checkpoint", str(tmp_path / "missing.pt"),
         "--train-data", str(cifar10 / "train"), "--test-data", str(cifar10 / "test"), "--out", str(out)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2
    assert "missing.pt does not exist" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
