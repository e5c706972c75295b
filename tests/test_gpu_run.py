"""bench/gpu_run.py in its --dry mode: every stage of the GPU script runs, tiny, on the CPU (issue 11 item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainkit import small_folder

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
    run = report["run"]
    assert run["epochs"] == 2 and run["steps"] == 8 and 0 <= run["knn_top1"] <= 1
    assert not (tmp_path / "out" / "cifar10-run" / "checkpoint.pt").exists()
