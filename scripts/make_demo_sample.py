"""Make the demo collection shipped in the repo: a few CIFAR-10 test JPEGs per class (well under 1 MB).

    python scripts/make_demo_sample.py [--per-class 30] [--source ../shared/datasets/cifar10/test]

The files are copied byte for byte (they are the JPEGs clients would send); the service indexes them on its
first start when its index is empty, so search and classify work out of the box.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10" / "test")
    parser.add_argument("--out", type=Path, default=REPO / "demo" / "images")
    parser.add_argument("--per-class", type=int, default=30)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    total = 0
    for class_dir in sorted(d for d in args.source.iterdir() if d.is_dir()):
        # Take evenly spaced files, not the first N, so the sample is not biased by file order.
        files = sorted(class_dir.glob("*.jpg"))
        step = max(1, len(files) // args.per_class)
        for src in files[::step][: args.per_class]:
            dst = args.out / class_dir.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            total += dst.stat().st_size
    print(f"wrote {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
