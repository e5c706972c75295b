"""`corinfomax export`: checkpoint -> verified model bundle. Torch is imported only when the command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRECISION_CHOICES = "fp32|fp16|int8"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="export a checkpoint's backbone as an ONNX model bundle (verified against PyTorch)",
        description="Write a model bundle (model.onnx + model.json) from a training checkpoint. The bundle is "
        "compared with PyTorch on real images and is not written if it does not match (unless --no-verify).")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt or its run folder")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    parser.add_argument("--precision", default="fp32", help=f"{PRECISION_CHOICES} (default fp32; fp16 targets "
                        "the CUDA provider; int8 is statically quantised on --calibration-data)")
    parser.add_argument("--name", help="model name (default: the run folder's name)")
    parser.add_argument("--version", help="model version (default: first 12 hex digits of the checkpoint's SHA-256)")
    parser.add_argument("--verify-data", type=Path,
                        help="ImageFolder tree of real images for the parity check (default: the config's val_data)")
    parser.add_argument("--calibration-data", type=Path,
                        help="labelled image folder for int8 calibration and its kNN check "
                        "(default: the config's data)")
    parser.add_argument("--verify-images", type=int, default=500, help="images for the parity check (default 500)")
    parser.add_argument("--calibration-images", type=int, default=256, help="int8 calibration images (default 256)")
    parser.add_argument("--knn-images", type=int, default=1000,
                        help="labelled images of --calibration-data for the int8 kNN check (default 1000)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check (not advised)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder / registered tag")
    parser.add_argument("--register", action="store_true",
                        help="also add the bundle to the BentoML model store as NAME:VERSION")
    parser.add_argument("--evaluation", type=Path, metavar="REPORT",
                        help="a `corinfomax eval` JSON report to record in the model card")
    parser.add_argument("--provenance", type=Path, metavar="JSON",
                        help="a JSON object recorded in the card as how the model was made (commands, hardware, time)")
    parser.set_defaults(handler=run)


def _json_object(path: Path | None, option: str) -> dict | None:
    """Read an optional JSON object given on the command line."""
    from corinfomax.export.bundle import ExportError

    if path is None:
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{option} {path}: not a readable JSON file ({err})") from err
    if not isinstance(value, dict):
        raise ExportError(f"{option} {path}: expected a JSON object")
    return value


def run(args: argparse.Namespace) -> int:
    from corinfomax.core.bundle import read_card
    from corinfomax.export.bundle import export_bundle
    from corinfomax.export.registry import register_bundle

    out = export_bundle(
        args.checkpoint, args.out, args.precision, args.verify, name=args.name, version=args.version,
        verify_data=args.verify_data, calibration_data=args.calibration_data, verify_images=args.verify_images,
        calibration_images=args.calibration_images, knn_images=args.knn_images, overwrite=args.overwrite,
        evaluation=_json_object(args.evaluation, "--evaluation"),
        provenance=_json_object(args.provenance, "--provenance"),
    )
    card = read_card(out)
    summary = {"bundle": str(out), "name": card.name, "version": card.version, "precision": card.precision,
               "embedding_dim": card.embedding_dim, "parity": card.parity}
    if args.register:
        summary["bentoml_tag"] = register_bundle(out, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
