"""One prepared call for a GPU machine (issue 11 item 6): every figure measured side by side by the real trainer.

1. recipe: the paper's CIFAR-10 ResNet-18 recipe (`cifar10` preset, batch 512), training images/s with the
   batched tensor augmentation vs PIL workers, bf16 vs fp32, channels_last vs contiguous, torch.compile;
2. realres: ResNet-18 with the ImageNet stem on a folder of large JPEGs (``--photos``, or generated ones) at
   128-224 px: training images/s, GPU busy %, and the loader alone, to say whether it keeps up;
3. real run: ``--minutes`` of the cifar10 preset on the full ``--data`` with its kNN read-out on ``--val-data``;
4. serve: the serving path on the GPU (bench/gpu_serve.py): onnxruntime's CUDA provider at batch 1-64 for a
   ResNet-18 bundle in fp32 and fp16, the service's img/s with it, and extraction against raw inference, on
   ``--serve-photos`` (default: ``--photos``, else ``--val-data``).

Writes ``OUT/gpu_run.json``, ``OUT/gpu_run.log`` and the real run's model as ``OUT/model/`` (bf16 parts small
enough to come back from the device machine; ``--join OUT/model RUN`` rebuilds a checkpoint here).
Images/s is the median per-step rate after the warm-up steps
(cuDNN autotuning and compilation make the first steps slow). ``--dry`` runs every stage tiny on the CPU.

    python bench/gpu_run.py --data /tmp/cifar10/train --val-data /tmp/cifar10/test --out $OUT --minutes 5
    python bench/gpu_run.py --dry --data ../shared/datasets/cifar10/train --val-data ../shared/datasets/cifar10/test \\
        --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from corinfomax.core.images import scan_images
from corinfomax.training.batches import BatchSource
from corinfomax.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from corinfomax.training.config import resolve
from corinfomax.training.data import decode_folder
from corinfomax.training.distributed import Dist, pick_device
from corinfomax.training.trainer import train

log = logging.getLogger("gpu_run")

# (name, overrides) of the recipe variants, all on the cifar10 preset.
VARIANTS = [
    ("tensor bf16 channels_last", dict(augment="tensor", amp=True, channels_last=True)),
    ("pil bf16 channels_last", dict(augment="pil", amp=True, channels_last=True)),
    ("tensor fp32 channels_last", dict(augment="tensor", amp=False, channels_last=True)),
    ("tensor bf16 contiguous", dict(augment="tensor", amp=True, channels_last=False)),
    ("tensor bf16 channels_last compile", dict(augment="tensor", amp=True, channels_last=True, compile=True)),
]


class GpuBusy:
    """Samples nvidia-smi's utilisation every 200 ms while in use; `mean` over the last seconds of it."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (time.monotonic(), utilisation %)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        if torch.cuda.is_available():
            try:
                self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,"
                                              "nounits", "-lms", "200", "-i", str(torch.cuda.current_device())],
                                             stdout=subprocess.PIPE, text=True)
                threading.Thread(target=self._read, daemon=True).start()
            except FileNotFoundError:
                log.warning("nvidia-smi not found: no GPU busy figures")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.monotonic(), float(line)))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def mean(self, last_seconds: float) -> float | None:
        """Mean utilisation over the last ``last_seconds`` sampled (the timed steps, not decoding or warm-up)."""
        end = self.samples[-1][0] if self.samples else 0.0
        late = [value for t, value in self.samples if t >= end - last_seconds]
        return round(statistics.fmean(late), 1) if late else None


def subset(root: Path, count: int, dest: Path) -> Path:
    """An ImageFolder tree of symlinks to the first ``count`` images of ``root`` (classes interleaved)."""
    listing = scan_images(root)
    order = sorted(range(len(listing.paths)), key=lambda i: (listing.paths[i].name, listing.labels[i]))[:count]
    for i in order:
        path = listing.paths[i]
        target = dest / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(path.resolve())
    return dest


def make_photos(dest: Path, count: int, side: int) -> Path:
    """``count`` JPEGs of ``side`` x ``side * 5 // 4`` px (smooth random colour fields) in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = dest / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            small = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
            Image.fromarray(small).resize((side * 5 // 4, side), Image.Resampling.BICUBIC).save(path, quality=90)
    return dest


# Files come back from the device machine only up to 16 MiB each and 8 in all: the trained model comes back as
# bf16 weight parts of at most PART_BYTES (ResNet-18 + its 2048-2048-64 projector: 33 MB, 3 parts) and one file
# of everything else a finished run's checkpoint holds that eval and export read (config, epoch, metrics).
PART_BYTES = 15 << 20


def save_model_parts(state: dict[str, Any], dest: Path) -> list[Path]:
    """Split a checkpoint's model weights (as bf16) and its metadata into files small enough to come back."""
    dest.mkdir(parents=True, exist_ok=True)
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state["model"].items():
        tensor = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        nbytes = tensor.numel() * tensor.element_size()
        if parts[-1] and size + nbytes > PART_BYTES:
            parts.append({})
            size = 0
        parts[-1][key] = tensor.cpu()
        size += nbytes
    files = []
    for i, part in enumerate(parts):
        files.append(dest / f"model-part{i}.pt")
        torch.save(part, files[-1])
    meta = {key: value for key, value in state.items() if key in ("format", "config", "epoch", "step", "metrics")}
    files.append(dest / "run-meta.pt")
    torch.save(meta, files[-1])
    return files


def join_model_parts(parts_dir: Path, run_dir: Path) -> Path:
    """Rebuild a checkpoint that eval and export accept (weights back to float32; no optimizer: not resumable)."""
    state = torch.load(parts_dir / "run-meta.pt", weights_only=True)
    state["model"] = {}
    for part in sorted(parts_dir.glob("model-part*.pt"), key=lambda path: int(path.stem[len("model-part"):])):
        for key, tensor in torch.load(part, weights_only=True).items():
            state["model"][key] = tensor.float() if tensor.is_floating_point() else tensor
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run_dir / CHECKPOINT_FILE, state)
    (run_dir / "config.json").write_text(json.dumps(state["config"], indent=2) + "\n")
    return run_dir / CHECKPOINT_FILE


def timed_train(preset: str, overrides: dict[str, Any], skip: int) -> dict[str, Any]:
    """One short run of the real trainer; median images/s of the steps after ``skip``, GPU busy %."""
    config = resolve(preset, {"log_every": 1, "time_budget_min": 0.0, **overrides})
    with GpuBusy() as busy:
        started = time.monotonic()
        checkpoint = train(config, progress=False)
        seconds = time.monotonic() - started
    rows = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r][skip:]
    timed_seconds = sum(config.batch_size / r for r in rates)
    return {"images_per_s": round(statistics.median(rates), 1) if rates else None, "steps_timed": len(rates),
            "gpu_busy_pct": busy.mean(timed_seconds), "seconds": round(seconds, 1)}


def loader_rate(preset: str, overrides: dict[str, Any]) -> float:
    """Images/s of the data pipeline alone (augment, to the device; no model) over one whole epoch, worker
    start-up included: conservative, since loader workers prefetch and a short timed window would flatter them."""
    config = resolve(preset, overrides)
    device = pick_device(config.device)
    source = BatchSource(decode_folder(config.data, config.image_size, progress=False), config, device, Dist())
    done, started = 0, time.monotonic()
    for _, labels in source.epoch(0):
        done += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round(done / (time.monotonic() - started), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="CIFAR-10 train ImageFolder")
    parser.add_argument("--val-data", help="CIFAR-10 test ImageFolder (kNN read-out)")
    parser.add_argument("--photos", help="folder of large JPEGs for the real-resolution stage (default: generated)")
    parser.add_argument("--out")
    parser.add_argument("--minutes", type=float, default=6.0, help="length of the real run")
    parser.add_argument("--steps", type=int, default=80, help="steps per throughput measurement")
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps not timed")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="PIL / loader workers")
    parser.add_argument("--sizes", default="128,160,224", help="real-resolution image sizes")
    parser.add_argument("--serve-photos", help="image folder for the serve stage (default: --photos, else --val-data)")
    parser.add_argument("--stages", default="recipe,realres,run,serve")
    parser.add_argument("--dry", action="store_true", help="every stage tiny on the CPU (a test runs this)")
    parser.add_argument("--join", nargs=2, metavar=("PARTS", "RUN"),
                        help="on this machine: rebuild RUN/checkpoint.pt from the real run's PARTS folder, then exit")
    args = parser.parse_args()
    if args.join:
        print(join_model_parts(Path(args.join[0]), Path(args.join[1])))
        return
    if not (args.data and args.val_data and args.out):
        parser.error("--data, --val-data and --out are required (unless --join)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "gpu_run.log")])
    work = Path(tempfile.mkdtemp(prefix="gpu_run."))
    os.environ.setdefault("CORINFOMAX_CACHE", str(work / "cache"))
    # The dry run shrinks the models, batches and sizes, never the code path.
    tiny = dict(backbone="tiny_resnet", projector="64-32", batch_size=16, device="cpu") if args.dry else {}
    batch = 16 if args.dry else 512
    steps, skip = (3, 1) if args.dry else (args.steps, args.skip)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "torch": torch.__version__, "dry": args.dry, "args": vars(args)}
    stages = args.stages.split(",")

    if "recipe" in stages:
        data = subset(Path(args.data), steps * batch, work / "recipe-data")
        report["recipe"] = {}
        for name, overrides in VARIANTS:
            if args.dry and overrides.get("compile"):  # inductor's CPU compile takes minutes; measured on GPU only
                continue
            log.info("recipe: %s", name)
            report["recipe"][name] = timed_train("cifar10", dict(
                data=str(data), out=str(work / f"recipe-{len(report['recipe'])}"), epochs=1, workers=args.workers,
                online_probe=False, **overrides, **tiny), skip)
            log.info("recipe: %s -> %s", name, report["recipe"][name])
        # Loader workers prefetch 2 batches each, which can hide a slow pipeline for part of a short run.
        report["recipe_loader_images_per_s"] = {augment: loader_rate("cifar10", dict(
            data=str(data), out=str(work / "loader"), augment=augment, workers=args.workers, **tiny))
            for augment in ("tensor", "pil")}
        rates = {name: r["images_per_s"] for name, r in report["recipe"].items()}
        base = rates["tensor bf16 channels_last"]
        report["recipe_ratios"] = {"batched / pil": base / rates["pil bf16 channels_last"],
                                   "bf16 / fp32": base / rates["tensor fp32 channels_last"],
                                   "channels_last / contiguous": base / rates["tensor bf16 contiguous"]}
        if "tensor bf16 channels_last compile" in rates:
            report["recipe_ratios"]["compile / eager"] = rates["tensor bf16 channels_last compile"] / base

    if "realres" in stages:
        rbatch = 16 if args.dry else 256
        # 40 steps a size (the loader is timed over a whole epoch); more photos would only cost generation time.
        photos = Path(args.photos) if args.photos else make_photos(work / "photos", min(steps, 40) * rbatch,
                                                                   64 if args.dry else 256)
        report["realres"] = {}
        for size in [int(s) for s in args.sizes.split(",")]:
            size = 32 if args.dry else size
            for augment in ("tensor", "pil"):
                name = f"{size}px {augment}"
                overrides = dict(data=str(photos), out=str(work / f"realres-{size}-{augment}"), epochs=1,
                                 image_size=size, augment=augment, workers=args.workers, online_probe=False,
                                 **{**tiny, "batch_size": rbatch})
                log.info("realres: %s", name)
                result = timed_train("imagenet100", overrides, skip)
                result["loader_images_per_s"] = loader_rate("imagenet100", overrides)
                result["loader_keeps_up"] = bool(result["images_per_s"]
                                                 and result["loader_images_per_s"] >= result["images_per_s"])
                report["realres"][name] = result
                log.info("realres: %s -> %s", name, result)
            if args.dry:
                break

    if "run" in stages:
        log.info("real run: %.1f min of the cifar10 preset on %s", args.minutes, args.data)
        run_out = out / "cifar10-run"
        overrides = dict(data=args.data, val_data=args.val_data, out=str(run_out), epochs=1000,
                         time_budget_min=args.minutes, workers=args.workers, log_every=1, **tiny)
        if args.dry:
            overrides.update(data=str(subset(Path(args.data), 64, work / "run-data")), epochs=2, time_budget_min=0.0)
        started = time.monotonic()
        with GpuBusy() as busy:
            train(resolve("cifar10", overrides), progress=False)
        state = load_checkpoint(run_out)
        rows = [json.loads(line) for line in (run_out / "metrics.jsonl").read_text().splitlines()]
        seconds = time.monotonic() - started
        report["run"] = {"seconds": round(seconds, 1), "epochs": state["epoch"], "steps": state["step"],
                         "gpu_busy_pct": busy.mean(seconds / 2),
                         "median_images_per_s": statistics.median(r["images_per_s"] for r in rows
                                                                  if "images_per_s" in r),
                         **{k: state["metrics"].get(k) for k in ("knn_top1", "effective_rank", "online_probe_acc",
                                                                 "loss")}}
        save_model_parts(state, out / "model")  # OUT/model comes back; `--join OUT/model RUN` rebuilds the run
        (run_out / CHECKPOINT_FILE).unlink()  # 100+ MB with the optimizer: it would not come back
        log.info("real run -> %s", report["run"])

    if "serve" in stages:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's bench package
        from bench.gpu_serve import serve_stage

        report["serve"] = serve_stage(Path(args.serve_photos or args.photos or args.val_data), args.dry)

    (out / "gpu_run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
