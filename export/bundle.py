"""Checkpoint -> model bundle (docs/FORMATS.md section 2), built in a temporary folder and renamed into
place only once complete and verified, so a failed export never leaves a bundle behind."""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from corinfomax.core.bundle import CARD_FILE, MODEL_FILE, PRECISIONS, VERIFY_IMAGES, check_tag_part, write_verification
from corinfomax.core.errors import UserError
from corinfomax.core.files import make_temp_dir
from corinfomax.export.card import build_card, default_name, write_card
from corinfomax.export.graph import OPSET, EmbeddingGraph, export_onnx, load_backbone
from corinfomax.training.checkpoint import CHECKPOINT_FILE, file_sha256, load_checkpoint

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}


class ExportError(UserError):
    """An export request that cannot be carried out as given (precision, output folder, data folders)."""


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise ExportError(f"output folder {out} already exists; pass --overwrite to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / CARD_FILE).is_file()):
        raise ExportError(f"refusing to overwrite {out}: it is not a model bundle (no {CARD_FILE}) nor an empty folder")


def _data_folder(given: str | Path | None, config: dict[str, Any], key: str, option: str) -> Path:
    folder = given or config.get(key)
    if not folder:
        raise ExportError(f"no image folder for this step: the checkpoint's config has no {key!r}; "
                          f"pass {option} DIR (an ImageFolder tree, e.g. ../shared/datasets/cifar10/test)")
    if not Path(folder).is_dir():
        raise ExportError(f"{option} {folder} does not exist or is not a folder")
    return Path(folder)  # as given: the card records it, and a resolved host path must not leak into a bundle


def _install(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an old bundle is replaced only after the new one is complete."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = make_temp_dir(out.parent, out.name, ".old")
    os.replace(out, old / "bundle")
    os.replace(tmp, out)
    shutil.rmtree(old)


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    precision: str = "fp32",
    verify: bool = True,
    *,
    name: str | None = None,
    version: str | None = None,
    verify_data: str | Path | None = None,
    calibration_data: str | Path | None = None,
    verify_images: int = 500,
    calibration_images: int = 256,
    knn_images: int = 1000,
    overwrite: bool = False,
    evaluation: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Export a checkpoint's backbone as a bundle folder ``out`` and return its path.

    With ``verify`` (the default) the bundle is compared with PyTorch on ``verify_images`` real images and
    is not written unless it meets `export.parity.THRESHOLDS`; the figures go into the model card.
    int8 is calibrated on ``calibration_images`` images of ``calibration_data`` (default: the training
    folder); its kNN check uses ``knn_images`` labelled images of the same folder as the neighbour bank.
    ``evaluation`` (a `corinfomax eval` report) and ``provenance`` (how the model was made: commands,
    hardware, wall time) go into the model card as they are.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unsupported precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    for option, count in (("verify-images", verify_images), ("calibration-images", calibration_images),
                          ("knn-images", knn_images)):
        if count < 1:
            raise ExportError(f"--{option} must be at least 1, got {count}")
    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(out, overwrite)
    state = load_checkpoint(checkpoint)
    config = state["config"]
    backbone, feature_dim = load_backbone(state, checkpoint)
    name = check_tag_part(name or default_name(checkpoint), "name")
    sha = file_sha256(checkpoint / CHECKPOINT_FILE if checkpoint.is_dir() else checkpoint)
    version = check_tag_part(version or sha[:12], "version")
    verify_dir = _data_folder(verify_data, config, "val_data", "--verify-data") if verify else None
    calib_dir = _data_folder(calibration_data, config, "data", "--calibration-data") if precision == "int8" else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)  # follows the umask: a bundle is meant to be shared
    try:
        _build(tmp, backbone, feature_dim, state, precision, verify_dir, calib_dir, dict(
            name=name, version=version, checkpoint_sha256=sha, verify_images=verify_images,
            calibration_images=calibration_images, knn_images=knn_images, evaluation=evaluation,
            provenance=provenance))
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s bundle %s:%s to %s", precision, name, version, out)
    return out


def _build(tmp: Path, backbone: torch.nn.Module, feature_dim: int, state: dict[str, Any], precision: str,
           verify_dir: Path | None, calib_dir: Path | None, opts: dict[str, Any]) -> None:
    """Write model.onnx and model.json into ``tmp``; verify them when ``verify_dir`` is given."""
    from corinfomax.export.images import load_sample
    from corinfomax.export.parity import THRESHOLDS, ParityError, failures, measure, torch_embed

    config = state["config"]
    size = int(config["image_size"])
    reference = EmbeddingGraph(backbone, config["mean"], config["std"])
    graph = reference
    if precision == "fp16":
        graph = EmbeddingGraph(copy.deepcopy(backbone), config["mean"], config["std"], torch.float16)
    card = build_card(state, name=opts["name"], version=opts["version"], precision=precision,
                      embedding_dim=feature_dim, checkpoint_sha256=opts["checkpoint_sha256"], opset=OPSET)
    if opts.get("evaluation"):
        card.evaluation = opts["evaluation"]
    if opts.get("provenance"):
        card.provenance = opts["provenance"]
    model_path = tmp / MODEL_FILE
    log.info("exporting the %s backbone to ONNX (opset %d, %s)", config["backbone"], OPSET, precision)
    if precision == "int8":
        from corinfomax.export.quantize import quantize_int8

        assert calib_dir is not None  # export_bundle finds the calibration folder for int8

        fp32_path = tmp / "fp32.onnx"
        export_onnx(graph, size, fp32_path)
        calibration = load_sample(calib_dir, opts["calibration_images"], card.input.resize, seed=1,
                                  what="calibration images")
        quantize_int8(fp32_path, model_path, calibration.pixels)
        fp32_path.unlink()
        card.quantization = {"method": "onnxruntime static QDQ, per-channel int8 weights, uint8 activations, "
                                          "min/max calibration", "calibration_data": str(calib_dir),
                                "calibration_images": len(calibration.pixels)}
    else:
        export_onnx(graph, size, model_path)
    write_card(tmp, card)
    if verify_dir is None:
        log.warning("bundle NOT verified against PyTorch (--no-verify)")
        return
    images = load_sample(verify_dir, opts["verify_images"], card.input.resize, seed=0, what="verification images")
    bank = (load_sample(calib_dir, opts["knn_images"], card.input.resize, seed=2, what="kNN bank images")
            if calib_dir is not None else None)
    figures = measure(reference, tmp, precision, images, bank)
    missed = failures(precision, figures)
    if missed:
        raise ParityError(f"the {precision} export does not match PyTorch on {figures['images']} images of "
                          f"{verify_dir}: {'; '.join(missed)}. No bundle was written (--no-verify writes it "
                          "unchecked; for int8, more --calibration-images or --verify-images may help).")
    card.parity = {"verified": True, "data": str(verify_dir), "thresholds": THRESHOLDS[precision], **figures}
    write_card(tmp, card)
    # A few of the same images with PyTorch's answers, so a service can repeat the check on its own machine.
    sample = images.pixels[:VERIFY_IMAGES]
    write_verification(tmp, sample, torch_embed(reference, sample))
