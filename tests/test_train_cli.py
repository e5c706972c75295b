"""Bad input through the real `corinfomax train` command (issue 2 s.6): non-zero exit, one-line error,
no traceback, no run folder left behind; corrupt images are skipped and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datakit import small_folder

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

CLI = Path(sys.executable).parent / "corinfomax"
TINY = ["--projector", "64-32", "--batch-size", "16", "--epochs", "1", "--image-size", "16", "--time-budget-min", "0",
        "--device", "cpu", "--no-progress"]


def corinfomax(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORINFOMAX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(CLI), "train", *args], capture_output=True, text=True, env=env, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def data(cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_folder(cifar10, tmp_path_factory.mktemp("data"), per_class=4)  # 40 images


@pytest.mark.parametrize("case,args,fragments", [
    ("missing data", ["--data", "{tmp}/nowhere"], ["does not exist"]),
    ("empty data", ["--data", "{tmp}/empty"], ["no images found"]),
    ("unknown backbone", ["--data", "{data}", "--backbone", "resnet_xl"], ["unknown backbone 'resnet_xl'"]),
    ("impossible projector", ["--data", "{data}", "--projector", "64-x-32"], ["impossible projector '64-x-32'"]),
    ("negative checkpoint interval", ["--data", "{data}", "--checkpoint-every", "-1"],
     ["--checkpoint-every must be 0"]),
    ("tiny images", ["--data", "{data}", "--image-size", "4"], ["image_size 4 is too small"]),
    ("one view", ["--data", "{data}", "--global-views", "1"], ["at least two views"]),
    ("local crops on PIL", ["--data", "{data}", "--local-views", "2", "--augment", "pil"], ["--augment tensor"]),
    ("batch too large", ["--data", "{data}", "--batch-size", "512"], ["fewer than one batch"]),
    ("no data flag", [], ["--data"]),
])
def test_bad_input_is_one_line_and_leaves_nothing(case: str, args: list[str], fragments: list[str],
                                                  data: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    assert_user_error(corinfomax(tmp_path, *TINY, *args, "--out", str(run)), *fragments)
    assert not run.exists(), case


def test_all_corrupt_images_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png")
    assert_user_error(corinfomax(tmp_path, *TINY, "--data", str(bad), "--out", str(tmp_path / "run")),
                      "none of the 3 files")
    assert not (tmp_path / "run").exists()


def test_corrupt_images_are_skipped_and_counted_then_config_change_refused(cifar10: Path, tmp_path: Path) -> None:
    data = small_folder(cifar10, tmp_path / "data", per_class=4)
    (data / "cat" / "broken.png").write_bytes(b"\x89PNG truncated")
    (data / "dog" / "empty.jpg").write_bytes(b"")
    run = tmp_path / "run"
    result = corinfomax(tmp_path, *TINY, "--data", str(data), "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["checkpoint"] == str(run / "checkpoint.pt")
    assert "skipped 2 unreadable file(s)" in result.stderr
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["images"] == 40 and first["skipped"] == 2

    changed = corinfomax(tmp_path, *TINY, "--data", str(data), "--out", str(run), "--lr", "0.01")
    assert_user_error(changed, "different config", "lr: 0.3 -> 0.01", "--allow-config-change")


def test_huge_lr_exits_2_with_the_reason_and_no_checkpoint(data: Path, tmp_path: Path) -> None:
    # It used to exit 0 with a checkpoint whose BatchNorm running_var held inf.
    run = tmp_path / "run"
    result = corinfomax(tmp_path, *TINY, "--data", str(data), "--out", str(run), "--lr", "1e6", "--batch-size", "4",
                        "--warmup-epochs", "0", "--max-bad-steps", "3")
    assert_user_error(result, "3 consecutive steps with a non-finite loss or model state", "lower --lr")
    assert not run.exists()
