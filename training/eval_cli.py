"""The command line of `corinfomax eval` (the work is in training/evaluate.py).

No PyTorch at module level: `corinfomax` builds its whole parser, serving commands included, in environments
without PyTorch, so the defaults come from training/eval_protocol.py and training/evaluate.py is imported when
the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from corinfomax.training.eval_protocol import KNN_K, KNN_TEMPERATURE, LINEAR_MODES


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write the JSON atomically: a crash never leaves a half-written report."""
    from corinfomax.core.files import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")


def format_table(report: dict[str, Any]) -> str:
    """A short human summary: one row per evaluated backbone."""
    def pct(value: float | None) -> str:
        return "   -  " if value is None else f"{100 * value:5.1f}%"

    k = report["protocol"]["knn"]["k"]
    lines = [f"{'backbone':<12} {f'kNN@{k}':>8} {'linear':>8}"]
    for name, result in report["results"].items():
        lines.append(f"{name:<12} {pct(result['knn_top1']):>8} {pct(result['linear_top1']):>8}")
    data = report["data"]
    lines.append(f"({data['num_train']} train / {data['num_test']} test images, {report['seconds']:.0f} s)")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `corinfomax eval`."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt, or the run folder holding it")
    parser.add_argument("--train-data", required=True, help="ImageFolder tree the kNN bank and probe are fit on")
    parser.add_argument("--test-data", required=True, help="ImageFolder tree with the same class folders")
    parser.add_argument("--out", help="report JSON to write (default: eval.json beside the checkpoint)")
    parser.add_argument("--linear", choices=LINEAR_MODES, default="fast",
                        help="linear probe: fast (L-BFGS, seconds), paper (SGD 100 epochs), none")
    parser.add_argument("--k", type=int, default=KNN_K, help="neighbours in the weighted kNN")
    parser.add_argument("--temperature", type=float, default=KNN_TEMPERATURE, help="kNN vote temperature")
    parser.add_argument("--limit-per-class", type=int, help="use only the first N images of each class")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the randomly initialised baseline")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")


def run_eval_command(args: argparse.Namespace) -> int:
    """Handler of `corinfomax eval`: evaluate, write the JSON, print a table."""
    from corinfomax.training.evaluate import evaluate_checkpoint

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval.json"
    report = evaluate_checkpoint(
        checkpoint, args.train_data, args.test_data, k=args.k, temperature=args.temperature, linear=args.linear,
        limit_per_class=args.limit_per_class, baseline=args.baseline, device=args.device,
        batch_size=args.batch_size,
    )
    write_report(report, out)
    print(format_table(report))
    print(f"report: {out}")
    return 0
