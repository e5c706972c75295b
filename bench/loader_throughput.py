"""Streaming loader throughput per worker: two-view batches vs the raw decode of the same files, and
reduced-size (JPEG draft) vs full decode on large photos, measured side by side in one run (issue 11).

    python bench/loader_throughput.py --data ../shared/datasets/imagewoof/train --size 128

One process does what one DataLoader worker does, on one thread; rounds of the pipelines alternate and the
median round counts, so load from other jobs hits all of them alike. Pipelines:
- full / reduced decode: the file to an RGB tensor, in full or at reduced size (what every pipeline pays);
- two crops: the training path's worker part (reduced decode, `Crops`, collate into uint8 batches);
- PIL two views: the per-image PIL reference (``augment=pil``), the whole augmentation in the worker.
The training path's colour stage runs in the main process, batched: its cost per image on this CPU (one
thread, the same batches) is measured too, so that worker + colour stage is the honest total on a CPU.
The large photos are made here: Imagewoof images upscaled to 3000 px on the long side, with sensor-like noise
so they decode like camera JPEGs rather than like smooth upscales.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from corinfomax.core.images import load_image, scan_images
from corinfomax.training.augment import BatchViews, Crops, PilTwoView, view_specs
from corinfomax.training.config import IMAGENET_MEAN, IMAGENET_STD
from corinfomax.training.stream import ImageFiles, ViewDataset


def make_large_photos(sources: list[Path], folder: Path, long_side: int) -> list[Path]:
    """JPEG q90 photos of ``long_side`` px made from ``sources``, with Gaussian noise (sigma 6 grey levels)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, source in enumerate(sources):
        image = load_image(source)
        scale = long_side / max(image.size)
        big = np.asarray(image.resize((round(image.width * scale), round(image.height * scale)),
                                      Image.Resampling.BICUBIC), dtype=np.float32)
        noisy = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"photo{i}.jpg")
        Image.fromarray(noisy).save(paths[-1], quality=90)
    return paths


Pipeline = tuple[Callable[[int], object], Callable[[list], object]]  # (item, collate)


def rates(pipelines: dict[str, Pipeline], n: int, batch: int, rounds: int) -> dict[str, float]:
    """Median images/s of each pipeline over ``rounds`` alternating rounds of ``n`` images in batches."""
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(rounds):
        for name, (item, collate) in pipelines.items():
            start = time.perf_counter()
            for first in range(0, n, batch):
                collate([item(i) for i in range(first, min(n, first + batch))])
            seconds[name].append(time.perf_counter() - start)
    return {name: n / statistics.median(values) for name, values in seconds.items()}


def compare(paths: list[Path], size: int, n: int, batch: int, rounds: int) -> dict[str, float]:
    files = ImageFiles(paths, torch.zeros(len(paths), dtype=torch.int64), [], min_side=2 * size)
    crops = ViewDataset(files, Crops(view_specs(size)))
    pil = ViewDataset(files, PilTwoView(size, IMAGENET_MEAN, IMAGENET_STD))
    colour = BatchViews(view_specs(size), IMAGENET_MEAN, IMAGENET_STD)
    crop_batches = [default_collate([crops[(i % len(paths), i)][:2] for i in range(first, min(n, first + batch))])
                    for first in range(0, n, batch)]

    def as_tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy, as ToTensor makes

    def colour_stage(i: int) -> int:  # one call per batch: the whole batch of crops, both views
        if i % batch == 0:
            colour.colour_views(list(crop_batches[i // batch]), torch.Generator().manual_seed(i))
        return i

    # Decoded images differ in size: a decode-only "batch" is their list; the views collate into tensors.
    return rates({
        "full decode": (lambda i: as_tensor(load_image(paths[i % len(paths)])), list),
        "reduced decode": (lambda i: as_tensor(files.load(i % len(paths))), list),
        "two crops": (lambda i: crops[(i % len(paths), i)][:3], default_collate),
        "colour stage": (colour_stage, list),
        "PIL two views": (lambda i: pil[(i % len(paths), i)][:3], default_collate),
    }, n, batch, rounds)


def report(title: str, result: dict[str, float]) -> None:
    print(title)
    for name, rate in result.items():
        print(f"  {name:>16}: {rate:8.1f} images/s per worker" + (" (main process, batched)" if name ==
                                                                   "colour stage" else ""))
    decode, crops, pil = result["reduced decode"], result["two crops"], result["PIL two views"]
    both = 1 / (1 / crops + 1 / result["colour stage"])  # the worker's part and the colour stage on one core
    print(f"  over the reduced decode: two crops {100 * (decode / crops - 1):+.0f}%, two crops + colour stage "
          f"{100 * (decode / both - 1):+.0f}% ({both:.1f} img/s on one core), PIL two views "
          f"{100 * (decode / pil - 1):+.0f}%; reduced / full decode {decode / result['full decode']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder of photos (e.g. Imagewoof train)")
    parser.add_argument("--size", type=int, default=128, help="training crop size")
    parser.add_argument("--images", type=int, default=256, help="images per round from --data")
    parser.add_argument("--large", type=int, default=6, help="how many large photos to make")
    parser.add_argument("--large-side", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker's share
    listed = scan_images(args.data).paths
    paths = listed[:: max(1, len(listed) // args.images)][: args.images]  # spread over the classes
    print(f"crop {args.size} px, batches of {args.batch}, {args.rounds} alternating rounds, median; one thread")
    report(f"{len(paths)} photos from {args.data}:", compare(paths, args.size, len(paths), args.batch, args.rounds))
    with tempfile.TemporaryDirectory() as folder:
        large = make_large_photos(paths[: args.large], Path(folder), args.large_side)
        n = 4 * len(large)  # each photo 4 times per round
        report(f"{len(large)} photos of {args.large_side} px (each 4x a round):",
               compare(large, args.size, n, min(args.batch, n), args.rounds))


if __name__ == "__main__":
    main()
