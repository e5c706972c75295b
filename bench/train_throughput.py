"""Training images/s of one model and batch with the PIL-worker pipeline and the batched tensor pipeline,
side by side in one run on whatever device is present; prints the ratio (issue 3).

    python bench/train_throughput.py --data ../shared/datasets/cifar10/train --steps 8 --batch-size 128
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from corinfomax.training.batches import BatchSource
from corinfomax.training.config import resolve
from corinfomax.training.data import decode_folder
from corinfomax.training.distributed import Dist, pick_device
from corinfomax.training.loss import CorInfoMaxLoss
from corinfomax.training.models import CorInfoMaxModel


def images_per_second(pipeline: str, args: argparse.Namespace, device: torch.device, data) -> float:
    """Full training steps (augment, two forwards, loss, backward, SGD) after 2 warm-up steps."""
    config = resolve("cpu", dict(data=args.data, out=tempfile.mkdtemp(), augment=pipeline, workers=args.workers,
                                 batch_size=args.batch_size, projector=args.projector, time_budget_min=0.0))
    torch.manual_seed(0)
    model = CorInfoMaxModel(config.backbone, config.projector, config.cifar_stem).to(device)
    model = model.to(memory_format=torch.channels_last)
    loss_fn = CorInfoMaxLoss(model.embedding_dim).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = BatchSource(data, config, device, Dist()).epoch(0)
    use_amp = device.type == "cuda"
    for step in range(args.steps + 2):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        (v1, v2), _ = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            _, z1 = model(v1.contiguous(memory_format=torch.channels_last))
            _, z2 = model(v2.contiguous(memory_format=torch.channels_last))
        loss = loss_fn(z1, z2).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    float(loss.detach())  # wait for the device
    return args.steps * args.batch_size / (time.perf_counter() - start)


def augment_only(data, batch: int) -> dict[str, float]:
    """Images/s of the augmentation alone, one process, no model: where the pipelines really differ."""
    from PIL import Image

    from corinfomax.training.augment import BatchViews, PilTwoView, view_specs

    images, mean, std = data.images[:batch], (0.5,) * 3, (0.25,) * 3
    pil, tensor = PilTwoView(32, mean, std), BatchViews(view_specs(32), mean, std)
    start = time.perf_counter()
    for i, x in enumerate(images):
        pil(Image.fromarray(x.permute(1, 2, 0).numpy()), i)
    middle = time.perf_counter()
    tensor(images, torch.Generator().manual_seed(0))
    end = time.perf_counter()
    return {"pil": batch / (middle - start), "tensor": batch / (end - middle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--projector", default="1024-1024-64")
    parser.add_argument("--workers", type=int, default=2, help="PIL DataLoader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--limit-per-class", type=int, default=200)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device("auto", 0)
    data = decode_folder(args.data, 32, limit_per_class=args.limit_per_class)
    augment = augment_only(data, args.batch_size)
    rates = {p: images_per_second(p, args, device, data) for p in ("pil", "tensor")}
    print(f"device {device}, tiny_resnet, batch {args.batch_size}, {args.steps} steps, torch threads "
          f"{torch.get_num_threads()}, PIL workers {args.workers}")
    for pipeline, rate in rates.items():
        print(f"{pipeline:>6}: training {rate:8.1f} images/s, augmentation alone {augment[pipeline]:8.1f} images/s")
    print(f"batched / PIL: training {rates['tensor'] / rates['pil']:.2f}x, "
          f"augmentation alone {augment['tensor'] / augment['pil']:.2f}x")


if __name__ == "__main__":
    main()
