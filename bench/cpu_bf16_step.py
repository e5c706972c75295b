"""A CorInfoMax training step on this CPU in float32 and under bf16 autocast, side by side, alternating, in one run.

    python -m bench.cpu_bf16_step --data ../shared/datasets/cifar10/train --threads 1

The step is the trainer's (batched two-view augmentation, both forwards, the loss in float64, backward, SGD) for
the default model's recipe: tiny_resnet, CIFAR stem, 32 px, projector 1024-1024-64, batch 128. bf16 pays only on
CPUs with native bf16 (``training.distributed.bf16_is_fast``: AMX or AVX512-BF16); the trainer uses it there.
"""

from __future__ import annotations

import argparse
import time

import torch

from corinfomax.training.augment import BatchViews, view_specs
from corinfomax.training.config import CIFAR10_MEAN, CIFAR10_STD
from corinfomax.training.data import decode_folder
from corinfomax.training.distributed import bf16_is_fast
from corinfomax.training.loss import CorInfoMaxLoss
from corinfomax.training.models import CorInfoMaxModel


def seconds_per_step(images: torch.Tensor, bf16: bool, steps: int, batch: int) -> float:
    """Median seconds of ``steps`` steps after two warm-up steps."""
    torch.manual_seed(0)
    model = CorInfoMaxModel("tiny_resnet", "1024-1024-64", cifar_stem=True).to(memory_format=torch.channels_last)
    loss_fn = CorInfoMaxLoss(model.embedding_dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    augment = BatchViews(view_specs(32), CIFAR10_MEAN, CIFAR10_STD)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 2):
        batch_images = images[(step * batch) % (len(images) - batch):][:batch]
        started = time.perf_counter()
        views = augment(batch_images, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = [model(v.contiguous(memory_format=torch.channels_last))[1] for v in views]
        loss = loss_fn(*z).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an image folder (CIFAR-10 train)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="float32 then bf16, this many times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = decode_folder(args.data, 32, limit_per_class=4 * args.batch_size // 10, progress=False).images
    results: dict[str, list[float]] = {"float32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in results:
            results[name].append(seconds_per_step(images, name == "bf16", args.steps, args.batch_size))
    fp32, bf16 = min(results["float32"]), min(results["bf16"])
    print(f"batch {args.batch_size}, 32 px, {args.threads} thread(s); native bf16 here: "
          f"{bf16_is_fast(torch.device('cpu'))}")
    print(f"  float32: {fp32 * 1000:6.0f} ms/step ({args.batch_size / fp32:5.0f} img/s)")
    print(f"  bf16:    {bf16 * 1000:6.0f} ms/step ({args.batch_size / bf16:5.0f} img/s)   {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
