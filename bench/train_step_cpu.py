"""Images/s of one CorInfoMax training step at 128 px on this CPU, ResNet-18 (ImageNet stem) vs the small CPU net
(tiny_resnet, ImageNet stem), side by side on the same Imagewoof photos (issue 11).

A step is what the trainer does per batch: batched two-view augmentation, two forwards, the loss, backward, SGD.

    python bench/train_step_cpu.py --data ../shared/datasets/imagewoof/train --batch-size 32 --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from corinfomax.training.augment import BatchViews, view_specs
from corinfomax.training.config import IMAGENET_MEAN, IMAGENET_STD
from corinfomax.training.data import decode_folder
from corinfomax.training.loss import CorInfoMaxLoss
from corinfomax.training.models import CorInfoMaxModel


def images_per_second(backbone: str, images: torch.Tensor, args: argparse.Namespace) -> tuple[float, float]:
    """Median images/s over ``args.steps`` steps after one warm-up step, and the augmentation's share of a step."""
    torch.manual_seed(0)
    model = CorInfoMaxModel(backbone, args.projector, cifar_stem=False).to(memory_format=torch.channels_last)
    loss_fn = CorInfoMaxLoss(model.embedding_dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    augment = BatchViews(view_specs(args.size), IMAGENET_MEAN, IMAGENET_STD)
    generator = torch.Generator().manual_seed(0)
    rates, shares = [], []
    for step in range(args.steps + 1):
        batch = images[(step * args.batch_size) % len(images):][: args.batch_size]
        start = time.perf_counter()
        v1, v2 = augment(batch, generator)
        augmented = time.perf_counter()
        _, z1 = model(v1.contiguous(memory_format=torch.channels_last))
        _, z2 = model(v2.contiguous(memory_format=torch.channels_last))
        loss = loss_fn(z1, z2).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            rates.append(len(batch) / (time.perf_counter() - start))
            shares.append((augmented - start) * rates[-1] / len(batch))
    return sorted(rates)[len(rates) // 2], sorted(shares)[len(shares) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an image folder (e.g. Imagewoof train)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--projector", default="1024-1024-64")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    per_class = -(-args.batch_size * 2 // 10)  # two batches' worth over ten classes
    images = decode_folder(args.data, args.size, limit_per_class=per_class, progress=False).images
    rates = {name: images_per_second(name, images, args) for name in ("tiny_resnet", "resnet18")}
    print(f"{args.size} px, batch {args.batch_size}, {args.steps} timed steps, projector {args.projector}, "
          f"torch threads {torch.get_num_threads()}")
    for name, (rate, share) in rates.items():
        print(f"{name:>12}: {rate:7.1f} images/s per training step ({share:.0%} of it augmentation)")
    print(f"tiny_resnet / resnet18: {rates['tiny_resnet'][0] / rates['resnet18'][0]:.1f}x")


if __name__ == "__main__":
    main()
