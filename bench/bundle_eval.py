"""Accuracy of a model bundle as served: ONNX embeddings of images decoded by the serving rule (the card's).

The numbers a model card quotes come from the PyTorch checkpoint (`corinfomax eval`); this script checks them
on what users actually get: the bundle's `model.onnx` (fp32, fp16 or int8) fed by the serving decode rule,
against raw pixels through the same rule, plus the bundle's shipped probe if it has one.

    python bench/bundle_eval.py --bundle models/default --train-data ../shared/datasets/cifar10/train \
        --test-data ../shared/datasets/cifar10/test [--work /tmp/bundle-eval]

kNN: k=200, T=0.1, cosine (`corinfomax.training.evaluate.knn_top1`, the same read-out as `corinfomax eval`);
linear: the fast L-BFGS probe on standardised features (`corinfomax.training.evaluate.linear_probe`). Extraction
resumes from --work, so a second run only recomputes the read-outs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corinfomax.core.bundle import PROBE_FILE, read_card
from corinfomax.core.images import load_image, to_model_input, walk_images
from corinfomax.serving.extract.extract import extract
from corinfomax.serving.extract.features import load_features
from corinfomax.serving.probe import LinearProbe
from corinfomax.training.evaluate import knn_top1, linear_probe


def embeddings(bundle: Path, data: Path, out: Path) -> tuple[np.ndarray, list[str]]:
    extract([str(data)], bundle, out, show_progress=True)
    features = load_features(out)
    if any(label is None for label in features.labels):
        raise SystemExit(f"{data} must be an ImageFolder (one sub-folder per class)")
    return features.embeddings, [str(label) for label in features.labels]


def raw_pixels(bundle: Path, data: Path) -> tuple[np.ndarray, list[str]]:
    """The card's resize + crop, then its mean/std: what the network sees, flattened."""
    spec = read_card(bundle).input
    mean, std = np.asarray(spec.mean, np.float32) * 255, np.asarray(spec.std, np.float32) * 255
    rows, labels = [], []
    for path, label in walk_images(data):
        pixels = to_model_input(load_image(path), spec.resize).astype(np.float32)
        rows.append(((pixels - mean) / std).reshape(-1))
        labels.append(str(label))
    return np.stack(rows), labels


def read_outs(train: np.ndarray, train_labels: list[str], test: np.ndarray, test_labels: list[str]) -> dict:
    classes = sorted(set(train_labels))
    index = {name: i for i, name in enumerate(classes)}
    y_train = torch.tensor([index[c] for c in train_labels])
    y_test = torch.tensor([index[c] for c in test_labels])
    x_train, x_test = torch.from_numpy(train).double(), torch.from_numpy(test).double()
    started = time.perf_counter()
    knn = knn_top1(x_train, y_train, x_test, y_test, len(classes))
    linear = linear_probe(x_train.float(), y_train, x_test.float(), y_test, len(classes), mode="fast")
    return {"knn_top1": knn, "linear_top1": linear, "dim": train.shape[1],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/default"))
    parser.add_argument("--train-data", type=Path, default=Path("../shared/datasets/cifar10/train"))
    parser.add_argument("--test-data", type=Path, default=Path("../shared/datasets/cifar10/test"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bundle-eval"), help="features folders")
    parser.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baseline")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    card = read_card(args.bundle)
    work = args.work / f"{card.name}-{card.version}-{card.precision}"
    train, train_labels = embeddings(args.bundle, args.train_data, work / "train")
    test, test_labels = embeddings(args.bundle, args.test_data, work / "test")
    results: dict[str, Any] = {"bundle": str(args.bundle), "name": card.name, "version": card.version,
               "precision": card.precision, "train_images": len(train), "test_images": len(test),
               "bundle_embeddings": read_outs(train, train_labels, test, test_labels)}
    if (args.bundle / PROBE_FILE).exists():
        results["shipped_probe_top1"] = LinearProbe.load(args.bundle / PROBE_FILE).accuracy(test, test_labels)
    if not args.no_pixels:
        pixel_train, pixel_train_labels = raw_pixels(args.bundle, args.train_data)
        pixel_test, pixel_test_labels = raw_pixels(args.bundle, args.test_data)
        results["raw_pixels"] = read_outs(pixel_train, pixel_train_labels, pixel_test, pixel_test_labels)

    print(f"{card.name} {card.version} ({card.precision}), {len(train)} train / {len(test)} test images")
    print("| features | kNN top-1 (k=200, T=0.1) | linear top-1 (fast) |\n| --- | --- | --- |")
    for key in ("bundle_embeddings", "raw_pixels"):
        if key in results:
            row = results[key]
            print(f"| {key.replace('_', ' ')} ({row['dim']}-d) | {row['knn_top1']:.2%} | {row['linear_top1']:.2%} |")
    if "shipped_probe_top1" in results:
        print(f"shipped probe ({PROBE_FILE}) top-1: {results['shipped_probe_top1']:.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
