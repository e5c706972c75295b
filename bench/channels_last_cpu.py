"""channels_last on CPU: training-step speed and BatchNorm float32 precision, side by side in one run.

Why: the trainer puts the model in channels_last; on CPU that is faster, but PyTorch's channels-last
BatchNorm kernel is less precise in float32, which is what made a 1-process run and a DDP run (different
BN code) part after a few steps. This prints both sides so the trade-off is measured, not assumed.

    python bench/channels_last_cpu.py --batch-size 256 --rounds 4 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from corinfomax.training.loss import CorInfoMaxLoss
from corinfomax.training.models import CorInfoMaxModel

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@torch.no_grad()
def bn_error(memory_format: torch.memory_format, offset: float) -> float:
    """Max relative error of a float32 BatchNorm2d forward (training mode) against float64."""
    x = torch.randn(32, 32, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5 + offset
    want = torch.nn.BatchNorm2d(32).double()(x)
    got = torch.nn.BatchNorm2d(32)(x.float().contiguous(memory_format=memory_format)).double()
    return float((got - want).abs().max() / want.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timed steps per layout (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("BatchNorm2d float32 forward, max relative error vs float64 (32x32x16x16):")
    for offset in (0.0, 3.0):
        errors = {name: bn_error(fmt, offset) for name, fmt in FORMATS.items()}
        print(f"  inputs with mean {offset}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + f"  (channels_last / contiguous = {errors['channels_last'] / errors['contiguous']:.0f}x)")

    torch.manual_seed(0)
    template = CorInfoMaxModel("tiny_resnet", "1024-1024-64", cifar_stem=True)
    models = {}
    for name, fmt in FORMATS.items():
        model = CorInfoMaxModel("tiny_resnet", "1024-1024-64", cifar_stem=True)
        model.load_state_dict(template.state_dict())
        models[name] = model.to(memory_format=fmt)
    loss_fn = CorInfoMaxLoss(64)
    views = torch.randn(2, args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def step(name: str) -> float:
        v1, v2 = (v.contiguous(memory_format=FORMATS[name]) for v in views)
        start = time.perf_counter()
        _, z1 = models[name](v1)
        _, z2 = models[name](v2)
        loss_fn(z1, z2).loss.backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in FORMATS}
    for round_ in range(args.rounds + 1):
        for name in FORMATS:  # interleaved, so load changes on the machine hit both layouts alike
            seconds = step(name)
            if round_:
                times[name].append(seconds)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f"training step (two forwards, loss, backward), tiny_resnet, batch {args.batch_size}, 32 px, "
          f"{args.threads} thread(s), median of {args.rounds}:")
    for name, seconds in median.items():
        print(f"  {name:13s} {seconds:.3f} s/step  {args.batch_size / seconds:.0f} img/s")
    print(f"  speed-up of channels_last: {median['contiguous'] / median['channels_last']:.2f}x")


if __name__ == "__main__":
    main()
