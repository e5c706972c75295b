"""Keep a long training run in git: pack its checkpoint into parts under 16 MiB, and unpack it again.

    python scripts/pack_run.py pack runs/v4-multicrop checkpoints/v4-multicrop     # after training a while
    python scripts/pack_run.py unpack checkpoints/v4-multicrop runs/v4-multicrop   # on a fresh clone, then resume

Why: a run that spans sessions and machines must survive a fresh clone, and the repository refuses files over
16 MiB. The packed checkpoint keeps the weights, the loss state and everything else exactly; only the SGD
momentum buffers are stored in bfloat16 (the optimizer casts them back to the parameters' float32 when it
loads them), which halves the largest part of the file. So a resume from a packed checkpoint continues the
same schedule from the same step, but is not bit-identical to the run that was never packed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import torch

PART_BYTES = 15 << 20  # under the repository's 16 MiB limit per file
MANIFEST = "MANIFEST.json"
CHECKPOINT = "checkpoint.pt"
SIDE_FILES = ("config.json", "metrics.jsonl")


def pack(run: Path, dest: Path) -> None:
    state = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)
    for entry in state["optimizer"]["state"].values():
        if "momentum_buffer" in entry and entry["momentum_buffer"] is not None:
            entry["momentum_buffer"] = entry["momentum_buffer"].to(torch.bfloat16)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    parts = []
    for number, start in enumerate(range(0, len(data), PART_BYTES)):
        name = f"{CHECKPOINT}.{number:03d}"
        (dest / name).write_bytes(data[start : start + PART_BYTES])
        parts.append(name)
    for name in SIDE_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
    manifest = {"parts": parts, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "step": int(state["step"]), "epoch": int(state["epoch"]),
                "epoch_batch": int(state.get("epoch_batch", 0)), "momentum": "bfloat16"}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"packed step {manifest['step']} of {run} into {len(parts)} part(s) in {dest} ({len(data) / 2**20:.1f} MiB)")


def unpack(packed: Path, run: Path) -> None:
    manifest = json.loads((packed / MANIFEST).read_text())
    if (run / CHECKPOINT).is_file():
        have = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)["step"]
        if have >= manifest["step"]:
            print(f"{run} is already at step {have} >= the packed step {manifest['step']}: left as it is")
            return
    data = b"".join((packed / name).read_bytes() for name in manifest["parts"])
    if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        sys.exit(f"{packed}: the parts do not match {MANIFEST} (truncated or mixed); not unpacked")
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".{CHECKPOINT}.tmp"
    tmp.write_bytes(data)
    tmp.replace(run / CHECKPOINT)
    for name in SIDE_FILES:
        if (packed / name).is_file():
            shutil.copy2(packed / name, run / name)
    print(f"unpacked step {manifest['step']} into {run}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("source", type=Path, help="pack: the run folder; unpack: the packed folder")
    parser.add_argument("dest", type=Path, help="pack: the packed folder; unpack: the run folder")
    args = parser.parse_args()
    (pack if args.action == "pack" else unpack)(args.source, args.dest)


if __name__ == "__main__":
    main()
