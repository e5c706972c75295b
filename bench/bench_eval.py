"""How long the evaluation read-outs take at CIFAR-10 scale (50k x F train, 10k test features).

Side by side in one run: weighted kNN (k=200), the fast probe (L-BFGS) and the paper probe (SGD, 100 epochs),
both on one CPU thread (what `linear_probe` uses) and, for the fast probe, on all threads for comparison.
Features are synthetic Gaussian clusters, so only the timings (not the accuracies) mean anything.

    python bench/bench_eval.py [--train 50000] [--test 10000] [--dim 512] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch

from corinfomax.training import evaluate
from corinfomax.training.evaluate import knn_top1, linear_probe


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    started = time.perf_counter()
    accuracy = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=gen) * 0.1
    y_train, y_test = torch.arange(args.train) % args.classes, torch.arange(args.test) % args.classes
    x_train = (centres[y_train] + torch.randn(args.train, args.dim, generator=gen)).relu().to(args.device)
    x_test = (centres[y_test] + torch.randn(args.test, args.dim, generator=gen)).relu().to(args.device)
    data = (x_train, y_train, x_test, y_test, args.classes)

    rows = {"knn k=200": timed(lambda: knn_top1(*data, k=200, temperature=0.1))}
    rows["probe fast (1 thread)"] = timed(lambda: linear_probe(*data, mode="fast"))
    single = evaluate.one_cpu_thread
    evaluate.one_cpu_thread = contextlib.nullcontext  # type: ignore[assignment]  # all threads, measured against one
    try:
        rows[f"probe fast ({torch.get_num_threads()} threads)"] = timed(lambda: linear_probe(*data, mode="fast"))
    finally:
        evaluate.one_cpu_thread = single
    rows["probe paper (1 thread)"] = timed(lambda: linear_probe(*data, mode="paper"))

    base = rows["probe fast (1 thread)"][0]
    print(f"{args.train} train / {args.test} test x {args.dim} features, {args.classes} classes, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'read-out':<24} {'seconds':>8} {'vs fast':>8} {'top-1':>7}")
    for name, (seconds, accuracy) in rows.items():
        print(f"{name:<24} {seconds:8.2f} {seconds / base:7.1f}x {100 * accuracy:6.1f}%")


if __name__ == "__main__":
    main()
