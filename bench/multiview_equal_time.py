"""Training recipes compared at equal time: each trains from scratch for the same budget, then is read out by kNN.

    python bench/multiview_equal_time.py --data TRAIN --val VAL --minutes 30 --out runs/equal-time

Each recipe is one `corinfomax train` (time budget: the schedule is fitted to it, so every recipe gets a whole
warm-up + cosine schedule in the same minutes) and one `corinfomax eval --linear none` (weighted kNN, k=200,
T=0.1, bank = TRAIN). VAL must not be the test split the finished model is reported on: pick recipes on a
held-out part of the training images. The CPU time each run used is measured too, so runs that shared the
machine with other work can still be compared (the budget itself is wall-clock).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# The recipes of the comparison (flags on top of the `cpu` preset with batch 128, the default model's run).
RECIPES: dict[str, list[str]] = {
    "2 views": [],
    "2 global + 2 local (16 px)": ["--local-views", "2", "--local-size", "16"],
    "2 global + 6 local (16 px)": ["--local-views", "6", "--local-size", "16"],
    "8 patches (scale 0.25)": ["--global-views", "8", "--crop-scale", "0.25", "0.25"],
}
COMMON = ["--preset", "cpu", "--batch-size", "128", "--warmup-epochs", "0.25", "--epochs", "1000", "--seed", "0",
          "--no-progress"]


def run(command: list[str], log: Path) -> tuple[float, float]:
    """Run ``command`` with its output in ``log``; return (wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with log.open("w") as handle:
        subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.monotonic() - start, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training ImageFolder (also the kNN bank)")
    parser.add_argument("--val", required=True, help="held-out ImageFolder the kNN is measured on")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per recipe")
    parser.add_argument("--out", default="runs/equal-time")
    parser.add_argument("--only", nargs="*", help="run only these recipes (names as in RECIPES)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "corinfomax.cli"]
    rows = []
    for name, flags in RECIPES.items():
        if args.only and name not in args.only:
            continue
        folder = out / f"{name.split(' (')[0].replace(' ', '-').replace('+', 'plus')}-{args.minutes:g}min"
        train = [*cli, "train", *COMMON, *flags, "--data", args.data, "--out", str(folder),
                 "--time-budget-min", str(args.minutes)]
        wall, cpu = run(train, folder.with_suffix(".train.log"))
        evaluate = [*cli, "eval", "--checkpoint", str(folder), "--train-data", args.data, "--test-data", args.val,
                    "--linear", "none", "--no-baseline", "--out", str(folder / "eval.json")]
        run(evaluate, folder.with_suffix(".eval.log"))
        report = json.loads((folder / "eval.json").read_text())
        epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in epochs if "online_probe_acc" in r][-1]
        rows.append({"recipe": name, "flags": " ".join(flags), "train_minutes": round(wall / 60, 1),
                     "cpu_minutes": round(cpu / 60, 1), "epochs": last["epoch"], "steps": last["step"],
                     "knn_top1": report["results"]["trained"]["knn_top1"],
                     "online_probe": round(last["online_probe_acc"], 4),
                     "effective_rank": round(last["effective_rank"], 1)})
        print(json.dumps(rows[-1]), flush=True)
    (out / f"table-{args.minutes:g}min.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'recipe':32} {'wall min':>8} {'CPU min':>8} {'epochs':>6} {'kNN top-1':>9}")
    for row in rows:
        print(f"{row['recipe']:32} {row['train_minutes']:8.1f} {row['cpu_minutes']:8.1f} {row['epochs']:6d} "
              f"{100 * row['knn_top1']:8.2f}%")
    print(f"(threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


if __name__ == "__main__":
    main()
