"""The default duplicates threshold, measured: plant edited copies of real images among the originals, embed
everything with the default model, run the duplicate finder, and report precision and recall per edit.

    python -m bench.duplicates_threshold --originals 2000 --copies 250

Originals: ``--originals`` photos from Imagewoof val and as many CIFAR-10 test images (seeded sample). For
each edit, ``--copies`` originals of each dataset (a different set per edit, so every copy has one original)
get a copy in a temporary folder: ``reencode`` (JPEG quality 50), ``resize`` (half of each side, Lanczos),
``crop`` (the central 90% of each side) and ``flip`` (mirrored left-right); all but ``reencode`` are saved as
PNG, so the edit is the only change. Pairs are what ``duplicates.duplicate_pairs`` finds over the whole set.

Per threshold: precision over all pairs found (a pair is right when both are the same original or its copy;
two originals or copies of different originals are wrong), and per edit the recall of its planted pairs and
the precision of the pairs that involve its copies. Accuracy, not speed: a loaded machine gives the same.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from corinfomax.core.images import load_image, walk_images
from corinfomax.serving.embedder import Embedder
from corinfomax.serving.index.duplicates import duplicate_pairs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS = {"imagewoof": SHARED / "imagewoof" / "val", "cifar10": SHARED / "cifar10" / "test"}
THRESHOLDS = [0.80, 0.85, 0.88, 0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
GOAL = 0.95  # precision and recall for reencode and resize


def _reencode(image: Image.Image) -> Image.Image:
    return image


def _resize(image: Image.Image) -> Image.Image:
    return image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.LANCZOS)


def _crop(image: Image.Image) -> Image.Image:
    dx, dy = round(image.width * 0.05), round(image.height * 0.05)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


EDITS: dict[str, tuple[Callable[[Image.Image], Image.Image], str, dict[str, int]]] = {
    "reencode": (_reencode, "JPEG", {"quality": 50}),
    "resize": (_resize, "PNG", {}),
    "crop": (_crop, "PNG", {}),
    "flip": (ImageOps.mirror, "PNG", {}),
}


@dataclass
class Collection:
    """Every image of the experiment: originals first, then the copies; ``family`` is the original's row."""

    paths: list[Path]
    dataset: list[str]
    family: np.ndarray  # int64
    edit: np.ndarray  # str: "" for an original


def originals(per_dataset: int, rng: np.random.Generator) -> Collection:
    paths, names = [], []
    for name, root in DATASETS.items():
        found = [path for path, _ in walk_images(root)]
        chosen = rng.choice(len(found), size=min(per_dataset, len(found)), replace=False)
        paths += [found[i] for i in sorted(chosen)]
        names += [name] * len(chosen)
    return Collection(paths, names, np.arange(len(paths)), np.array([""] * len(paths), dtype=object))


def plant(items: Collection, copies: int, rng: np.random.Generator, folder: Path) -> Collection:
    """Add ``copies`` edited copies per edit and dataset, of originals that have no other copy."""
    paths, datasets, families, edits = list(items.paths), list(items.dataset), list(items.family), list(items.edit)
    for name in DATASETS:
        rows = rng.permutation([i for i, d in enumerate(items.dataset) if d == name])
        for e, (edit, (change, fmt, options)) in enumerate(EDITS.items()):
            for row in tqdm(rows[e * copies : (e + 1) * copies], desc=f"{name} {edit}", leave=False):
                target = folder / f"{name}-{edit}-{row}.{fmt.lower()}"
                change(load_image(items.paths[row])).save(target, fmt, **options)
                paths.append(target)
                datasets.append(name)
                families.append(int(row))
                edits.append(edit)
    return Collection(paths, datasets, np.asarray(families), np.asarray(edits, dtype=object))


def embed(model: Path, paths: list[Path], threads: int | None) -> np.ndarray:
    embedder = Embedder(model, threads=threads)
    chunks = [embedder.embed_images(paths[i : i + 256]) for i in tqdm(range(0, len(paths), 256), desc="embed")]
    return np.concatenate(chunks)


def pairs_at(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first rows, second rows, scores) of every pair at or above ``threshold``, by the duplicate finder."""
    ids = np.arange(len(vectors), dtype=np.int64)
    batches = ((ids[i : i + 10_000], vectors[i : i + 10_000]) for i in range(0, len(vectors), 10_000))
    found = list(duplicate_pairs(batches, threshold))
    return (np.concatenate([p.first for p in found]), np.concatenate([p.second for p in found]),
            np.concatenate([p.scores for p in found]))


def ratio(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


def measure(items: Collection, first: np.ndarray, second: np.ndarray, scores: np.ndarray, threshold: float,
            dataset: str | None) -> dict[str, float]:
    """Overall precision, and per edit recall (``<edit> R``) and precision (``<edit> P``), at ``threshold``,
    over the pairs with both images in ``dataset`` (None: every pair, those across the datasets too)."""
    inside = np.ones(len(items.paths), bool) if dataset is None else np.asarray(items.dataset) == dataset
    keep = (scores >= threshold) & inside[first] & inside[second]
    a, b = first[keep], second[keep]
    right = items.family[a] == items.family[b]
    row: dict[str, float] = {"pairs": float(len(a)), "precision": ratio(int(right.sum()), len(a))}
    for edit in EDITS:
        involved = (items.edit[a] == edit) | (items.edit[b] == edit)
        row[f"{edit} R"] = ratio(int((right & involved).sum()), int(((items.edit == edit) & inside).sum()))
        row[f"{edit} P"] = ratio(int((right & involved).sum()), int(involved.sum()))
    return row


def planted_similarities(items: Collection, vectors: np.ndarray) -> None:
    """Quantiles of the similarity of each copy to its original, per dataset and edit (where they lie)."""
    print("\nsimilarity of a copy to its original: min / 5% / median")
    for name in DATASETS:
        for edit in EDITS:
            rows = np.nonzero((items.edit == edit) & (np.asarray(items.dataset) == name))[0]
            sims = np.einsum("ij,ij->i", vectors[rows], vectors[items.family[rows]])
            print(f"  {name:>9} {edit:>8}: {sims.min():.3f} / {np.percentile(sims, 5):.3f} / {np.median(sims):.3f}")


def report(items: Collection, vectors: np.ndarray) -> None:
    """One table per dataset and one over everything, then where the copies lie."""
    first, second, scores = pairs_at(vectors, min(THRESHOLDS))
    names = ["pairs", "precision", *(f"{edit} {m}" for edit in EDITS for m in "RP")]
    for dataset in [*DATASETS, None]:
        print(f"\n{dataset or 'both datasets together (pairs across them count as wrong)'}\n")
        print("| threshold | " + " | ".join(names) + " |")
        print("| ---: | " + " | ".join("---:" for _ in names) + " |")
        meeting = []
        for threshold in THRESHOLDS:
            row = measure(items, first, second, scores, threshold, dataset)
            cells = [f"{int(row['pairs'])}", *(f"{row[n]:.3f}" for n in names[1:])]
            print(f"| {threshold:.2f} | " + " | ".join(cells) + " |")
            if all(row[f"{edit} {m}"] >= GOAL for edit in ("reencode", "resize") for m in "RP"):
                meeting.append(threshold)
        print(f"\nmeeting the goal (precision and recall >= {GOAL} for reencode and resize): "
              f"{', '.join(f'{t:.2f}' for t in meeting) or 'none'}")
    planted_similarities(items, vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", type=int, default=2000, help="per dataset")
    parser.add_argument("--copies", type=int, default=250, help="per edit and dataset")
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "default")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="duplicates-") as folder:
        items = plant(originals(args.originals, rng), args.copies, rng, Path(folder))
        print(f"{len(items.paths)} images: {int((items.edit == '').sum())} originals, "
              f"{args.copies} copies per edit and dataset", flush=True)
        vectors = embed(args.model, items.paths, args.threads)
    report(items, vectors)


if __name__ == "__main__":
    main()
