"""What the serving benches measure with when no trained model is at hand: a bundle exported from a randomly
initialised backbone of a training preset (same graph, same input size, same cost as a trained one), and big
photos made from the shared Imagewoof ones. Nothing is written outside the folder given."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
IMAGEWOOF = REPO.parent / "shared" / "datasets" / "imagewoof"


def random_bundle(preset: str, out: Path, image_size: int | None = None, precision: str = "fp32") -> Path:
    """Export a random-init backbone of ``preset`` (``photo``: tiny_resnet at 128 px; ``imagenet100``:
    ResNet-18 at 224 px) to the bundle folder ``out``, without the parity check (there is nothing to match)."""
    import torch

    from corinfomax.export.bundle import export_bundle
    from corinfomax.training.checkpoint import save_checkpoint
    from corinfomax.training.config import resolve
    from corinfomax.training.loss import CorInfoMaxLoss
    from corinfomax.training.models import CorInfoMaxModel

    torch.manual_seed(0)
    overrides = {"projector": "64-32", "epochs": 1, **({"image_size": image_size} if image_size else {})}
    config = resolve(preset, overrides)
    model = CorInfoMaxModel(config.backbone, config.projector, config.cifar_stem)
    checkpoint = out.parent / f"{out.name}-checkpoint" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, {"config": config.to_dict(), "model": model.state_dict(),
                                 "loss": CorInfoMaxLoss(model.embedding_dim).state_dict(), "epoch": 1})
    return export_bundle(checkpoint, out, precision=precision, verify=False)


def big_photos(count: int, side: int = 3000, source: Path = IMAGEWOOF / "val") -> list[bytes]:
    """``count`` Imagewoof photos upscaled to ``side`` px on the long side, with sensor-like noise, as JPEG q90."""
    paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    rng = np.random.default_rng(0)
    out = []
    for path in paths[:: max(1, len(paths) // count)][:count]:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 4, (image.height, image.width, 3)).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out
