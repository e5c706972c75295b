"""`corinfomax eval`: how good are a checkpoint's frozen backbone features?

Two standard read-outs on frozen features (arXiv:2209.07999, section 4):
- weighted kNN (InstDisc / DINO): cosine similarity, the k nearest training images vote for their class
  with weight exp(sim / T);
- a linear probe. The paper trains it with SGD (lr 0.2, momentum 0.9, cosine, 100 epochs, batch 256) on
  augmented images; on CPU budgets re-running the backbone every epoch is too slow, so both modes here fit
  on precomputed, standardised features ("paper": that SGD recipe; "fast": full-batch L-BFGS, seconds).
  Standardising is an invertible affine map of the inputs, so it changes conditioning, not the model class.

Two baselines are evaluated alongside: the same architecture randomly initialised, and the raw pixels
themselves (the resized, normalised image flattened: on CIFAR-10 they beat a random network, 44% vs 33% kNN).
The gap to the better of the two is what training bought. The same kNN read-out runs during training on
``--val-data`` (`knn_readout`, called by the trainer at epoch ends). The report is one JSON file (see
docs/FORMATS.md, section 6); its constants are in training/eval_protocol.py, shared with the command line
(training/eval_cli.py), which imports this module only when the command runs so that building the `corinfomax`
parser never imports PyTorch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from corinfomax.core.errors import UserError
from corinfomax.training.checkpoint import CHECKPOINT_FILE, file_sha256, load_checkpoint, load_model
from corinfomax.training.config import TrainConfig
from corinfomax.training.data import decode_folder, load_labelled_images, normalize
from corinfomax.training.distributed import pick_device
from corinfomax.training.eval_protocol import (
    FAST_PROBE,
    KNN_K,
    KNN_TEMPERATURE,
    LINEAR_MODES,
    PAPER_PROBE,
    REPORT_FORMAT,
)
from corinfomax.training.models import CorInfoMaxModel

log = logging.getLogger(__name__)

# The kNN read-out during training (--val-data) compares with at most this many training images, equally many
# per class: decoding the whole folder would cost ImageNet-100's 126,689 photos 19 GB at 224 px.
KNN_BANK_IMAGES = 10_000


class EvalError(UserError):
    """Evaluation options or data that cannot work together (bad k, mismatched class folders...)."""


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    desc: str = "features",
) -> Tensor:
    """Pooled backbone features of uint8 ``images [N, 3, H, W]`` -> float32 ``[N, F]`` on ``device``.

    Eval mode (BatchNorm running statistics, as at serving time), no gradients, bf16 autocast on CUDA.
    """
    device = torch.device(device)
    backbone.eval().to(device)
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = normalize(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks.append(backbone(batch).float())
    return torch.cat(chunks)


def raw_pixel_features(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                       device: torch.device | str = "cpu") -> Tensor:
    """The raw-pixel baseline: uint8 ``images [N, 3, H, W]`` normalised as the backbone sees them, flattened
    to float32 ``[N, 3*H*W]``."""
    return torch.cat([normalize(chunk.to(device), mean, std).flatten(1) for chunk in images.split(1024)])


@torch.no_grad()
def knn_top1(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 512,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier (cosine similarity, votes exp(sim / T))."""
    if k < 1:
        raise EvalError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise EvalError(f"the kNN temperature must be positive, got {temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels = train_labels.to(train.device)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk_size):  # chunks bound the [chunk, N_train] similarity matrix
        sims, idx = (test[start : start + chunk_size] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(1).cpu() == test_labels[start : start + chunk_size].cpu()).sum())
    return correct / len(test)


def knn_readout(model: CorInfoMaxModel, config: TrainConfig, device: torch.device,
                classes: int) -> tuple[float, int]:
    """The kNN read-out during training: top-1 on ``--val-data`` (all of it) against a bank of at most
    `KNN_BANK_IMAGES` training images at the training size: the first ``KNN_BANK_IMAGES // classes`` of each
    class (decoded once, then cached). Returns the accuracy and the bank's size."""
    per_class = max(1, KNN_BANK_IMAGES // classes)
    bank = decode_folder(config.data, config.image_size, limit_per_class=per_class, progress=False)
    test = decode_folder(config.val_data, config.image_size, progress=False)
    log.info("kNN on %s: a bank of %d training images (up to %d per class, %d classes; at most %d in all)",
             config.val_data, len(bank), per_class, classes, KNN_BANK_IMAGES)
    model.eval()
    bank_f = extract_features(model.backbone, bank.images, config.mean, config.std, 512, device)
    test_f = extract_features(model.backbone, test.images, config.mean, config.std, 512, device)
    model.train()
    return knn_top1(bank_f, bank.labels, test_f, test.labels, num_classes=classes), len(bank)


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run a block on one torch intra-op thread. Probe steps are tiny ([256, F] x [F, C]): extra intra-op
    threads only add synchronisation, and on a busy machine they made a 400-sample SGD probe 70x slower
    (6.2 s vs 0.09 s, 2 cores, load 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_lbfgs(head: nn.Linear, x: Tensor, y: Tensor) -> None:
    """Full-batch L-BFGS on L2-regularised cross-entropy: deterministic, converges in a few seconds."""
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=FAST_PROBE["max_iter"],
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * FAST_PROBE["weight_decay"] * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def _fit_sgd(head: nn.Linear, x: Tensor, y: Tensor, generator: torch.Generator) -> None:
    """The paper's probe recipe: SGD + momentum, cosine decay per step, mini-batches of shuffled features."""
    recipe = PAPER_PROBE
    optimizer = torch.optim.SGD(head.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                                weight_decay=recipe["weight_decay"])
    steps_per_epoch = -(-len(x) // recipe["batch_size"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe["epochs"] * steps_per_epoch)
    for _ in tqdm(range(recipe["epochs"]), desc="linear probe", unit="epoch", leave=False):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for batch in order.split(recipe["batch_size"]):
            optimizer.zero_grad()
            F.cross_entropy(head(x[batch]), y[batch]).backward()
            optimizer.step()
            scheduler.step()


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    mode: str = "fast",
    seed: int = 0,
) -> float:
    """Top-1 test accuracy of a linear classifier fit on frozen, standardised training features."""
    if mode not in ("fast", "paper"):
        raise EvalError(f"unknown linear probe mode {mode!r}; choose fast or paper")
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    x_train, x_test = (train_feats - mean) / std, (test_feats - mean) / std
    y_train = train_labels.to(x_train.device)
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    with torch.enable_grad(), one_cpu_thread():
        if mode == "fast":
            _fit_lbfgs(head, x_train, y_train)
        else:
            _fit_sgd(head, x_train, y_train, generator)
    with torch.no_grad():
        predictions = head(x_test).argmax(1).cpu()
    return int((predictions == test_labels.cpu()).sum()) / len(predictions)


def _test_set_notes(test_dir: Path) -> list[str]:
    """Say when accuracies are measured on lossy JPEG test images (the shared CIFAR-10 test split is q75)."""
    if next((p for p in test_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")), None) is None:
        return []
    note = "test images are JPEG (lossy): accuracies can be below figures published on lossless test sets"
    if "cifar10" in test_dir.resolve().parts[-2:]:
        note = ("test split is the shared CIFAR-10 copy stored as JPEG quality 75 (about 30 dB PSNR): expect kNN "
                "and linear accuracy 1-3 points below published CIFAR-10 figures")
    return [note]


def _evaluate_features(
    train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, num_classes: int,
    k: int, temperature: float, linear: str, seed: int,
) -> dict[str, float | None]:
    started = time.perf_counter()
    result: dict[str, float | None] = {"knn_top1": knn_top1(train, train_y, test, test_y, num_classes, k, temperature)}
    result["knn_seconds"] = round(time.perf_counter() - started, 3)
    result["linear_top1"] = result["linear_seconds"] = None
    if linear != "none":
        started = time.perf_counter()
        result["linear_top1"] = linear_probe(train, train_y, test, test_y, num_classes, linear, seed)
        result["linear_seconds"] = round(time.perf_counter() - started, 3)
    return result


def _evaluate_backbone(name: str, backbone: nn.Module | None, config: TrainConfig, train: tuple[Tensor, Tensor],
                       test: tuple[Tensor, Tensor], num_classes: int, dev: torch.device, batch_size: int, *,
                       k: int, temperature: float, linear: str, seed: int) -> dict[str, Any]:
    """kNN and probe figures of one backbone (None: the raw pixels) on frozen features of both splits."""
    t0 = time.perf_counter()
    feats = [raw_pixel_features(x, config.mean, config.std, dev) if backbone is None else
             extract_features(backbone, x, config.mean, config.std, batch_size, dev, f"{name} features")
             for x in (train[0], test[0])]
    feature_seconds = round(time.perf_counter() - t0, 3)
    result = _evaluate_features(feats[0], train[1], feats[1], test[1], num_classes, k, temperature, linear, seed)
    result["feature_seconds"] = feature_seconds
    del feats  # raw pixels at 128 px are ~2 GB
    log.info("%s: %s", name, result)
    return result


def evaluate_checkpoint(
    checkpoint: str | Path,
    train_dir: str | Path,
    test_dir: str | Path,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    linear: str = "fast",
    limit_per_class: int | None = None,
    baseline: bool = True,
    device: str = "auto",
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """kNN and linear-probe top-1 of a checkpoint's backbone (and of a random-init twin) as a report dict."""
    if linear not in LINEAR_MODES:
        raise EvalError(f"unknown --linear {linear!r}; choose one of {', '.join(LINEAR_MODES)}")
    if k < 1 or temperature <= 0 or batch_size < 1 or (limit_per_class is not None and limit_per_class < 1):
        raise EvalError("k, temperature, batch size and limit per class must all be positive")
    started = time.perf_counter()
    dev = pick_device(device)
    path = Path(checkpoint)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    trained = load_model(state, path)

    train_x, train_y, classes = load_labelled_images(train_dir, config.image_size, limit_per_class)
    test_x, test_y, test_classes = load_labelled_images(test_dir, config.image_size, limit_per_class)
    if classes != test_classes:
        raise EvalError(f"train and test folders have different classes: {classes} vs {test_classes}")
    log.info("evaluating on %d train / %d test images, %d classes, device %s", len(train_x), len(test_x),
             len(classes), dev)

    backbones: dict[str, nn.Module | None] = {}
    if baseline:  # raw pixels first, then random init, then trained: weakest expected first
        torch.manual_seed(seed)
        backbones["raw_pixels"] = None
        backbones["random_init"] = CorInfoMaxModel(config.backbone, config.projector, config.cifar_stem).backbone
    backbones["trained"] = trained.backbone
    results = {name: _evaluate_backbone(name, backbone, config, (train_x, train_y), (test_x, test_y), len(classes),
                                        dev, batch_size, k=k, temperature=temperature, linear=linear, seed=seed)
               for name, backbone in backbones.items()}

    return {
        "format": REPORT_FORMAT,
        "checkpoint": str(path),
        "checkpoint_sha256": file_sha256(path),
        "epoch": state.get("epoch"),
        "model": {"backbone": config.backbone, "cifar_stem": config.cifar_stem, "image_size": config.image_size,
                  "projector": config.projector, "feature_dim": trained.feature_dim},
        "data": {"train": str(train_dir), "test": str(test_dir), "classes": classes, "num_train": len(train_x),
                 "num_test": len(test_x), "limit_per_class": limit_per_class},
        "protocol": {"knn": {"k": k, "temperature": temperature, "metric": "cosine"}, "linear": linear,
                     "linear_recipe": {"fast": FAST_PROBE, "paper": PAPER_PROBE}.get(linear),
                     "features": "frozen backbone, eval mode, precomputed once, standardised for the probe"},
        "results": results,
        "device": str(dev),
        "seconds": round(time.perf_counter() - started, 3),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": _test_set_notes(Path(test_dir)),
    }

