"""bench/gpu_run.py in its --dry mode: every stage of the GPU script runs, tiny, on the CPU (issue 11 item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datakit import small_folder

from corinfomax.training.checkpoint import load_checkpoint, load_model

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_measures_every_stage(cifar10: Path, tmp_path: Path) -> None:
    val = small_folder(cifar10, tmp_path / "val", per_class=4, split="test")
    env = {**os.environ, "CORINFOMAX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_run.py"), "--dry", "--data",
                             str(cifar10 / "train"), "--val-data", str(val), "--out", str(tmp_path / "out"),
                             "--workers", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert report["dry"] is True and (tmp_path / "out" / "gpu_run.log").stat().st_size > 0
    assert set(report["recipe"]) == {"tensor bf16 channels_last", "pil bf16 channels_last",
                                     "tensor fp32 channels_last", "tensor bf16 contiguous"}
    assert all(r["images_per_s"] > 0 and r["steps_timed"] == 2 for r in report["recipe"].values())
    assert all(rate > 0 for rate in report["recipe_loader_images_per_s"].values())
    assert set(report["recipe_ratios"]) == {"batched / pil", "bf16 / fp32", "channels_last / contiguous"}
    assert {"32px tensor", "32px pil"} == set(report["realres"])
    assert all(r["loader_images_per_s"] > 0 and isinstance(r["loader_keeps_up"], bool)
               for r in report["realres"].values())
    serve = report["serve"]["fp32"]  # the serving path: onnxruntime by batch, the service, extraction
    assert set(serve["onnxruntime_img_s"]) == {"1", "4"} and all(r > 0 for r in serve["onnxruntime_img_s"].values())
    assert all(s["img_s"] > 0 and s["errors"] == 0 for s in serve["service"].values())
    assert serve["extract"]["extract_img_s"] > 0
    run = report["run"]
    assert run["epochs"] == 2 and run["steps"] == 8 and 0 <= run["knn_top1"] <= 1
    assert not (tmp_path / "out" / "cifar10-run" / "checkpoint.pt").exists()
    # The model comes back in parts that fit the device machine's return limits, and joins into a checkpoint
    # that eval and export read, with the run's weights rounded to bf16.
    parts = sorted((tmp_path / "out" / "model").iterdir())
    assert parts and all(part.stat().st_size < 16 << 20 for part in parts) and len(parts) <= 7
    joined = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_run.py"), "--join",
                             str(tmp_path / "out" / "model"), str(tmp_path / "joined")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert joined.returncode == 0, joined.stderr[-3000:]
    state = load_checkpoint(tmp_path / "joined")
    model = load_model(state, tmp_path / "joined")
    assert state["epoch"] == 2 and all(p.dtype == torch.float32 for p in model.parameters())
