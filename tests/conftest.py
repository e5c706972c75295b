"""Shared fixtures: the shared CIFAR-10 folders, a tiny random-init checkpoint and its exported bundle; and the
guard that keeps the quick lane (`-m "not slow"`) free of subprocesses and model exports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = Path(os.environ.get("CORINFOMAX_CIFAR10", REPO.parent / "shared" / "datasets" / "cifar10"))
IMAGEWOOF = Path(os.environ.get("CORINFOMAX_IMAGEWOOF", REPO.parent / "shared" / "datasets" / "imagewoof"))
# Fixtures that export a model: a test using one (even through another fixture) belongs to the slow lane.
EXPORTING_FIXTURES = {"tiny_bundle"}
SLOW_RULE = "mark it @pytest.mark.slow (pyproject.toml's `slow` marker says what the quick lane leaves out)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test-fast` must not export models: refuse a quick-lane test that uses an exporting fixture."""
    for item in items:
        exporting = EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ()))
        if exporting and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {', '.join(sorted(exporting))}, which exports a model: "
                                    + SLOW_RULE)


def runs_python(args: Any, executable: Any = None) -> bool:
    """Whether a subprocess command runs this environment's Python: the interpreter, or one of its console
    scripts (corinfomax, bentoml, torchrun...). Libraries' probes of system tools (matplotlib's fc-list) do not."""
    if executable is None:
        executable = args.split()[0] if isinstance(args, str) else args if isinstance(args, os.PathLike) else args[0]
    program = Path(shutil.which(str(executable)) or str(executable))
    return program == Path(sys.executable) or program.parent == Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _quick_lane_starts_no_subprocess(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quick-lane test that starts a Python subprocess (a command, a server, a DDP job) fails, naming the
    command. Data-loader workers are forked by multiprocessing, not started through subprocess, so they pass."""
    if request.node.get_closest_marker("slow") is not None:
        return
    start = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        if runs_python(args, kwargs.get("executable")):
            pytest.fail(f"{request.node.nodeid} starts a subprocess ({args!r}): {SLOW_RULE}", pytrace=False)
        start(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(scope="session")
def cifar10() -> Path:
    """Root of the shared CIFAR-10 image folders (train/ PNG, test/ JPEG q75)."""
    if not (CIFAR10 / "test").is_dir():
        pytest.fail(f"shared CIFAR-10 not found at {CIFAR10} (set CORINFOMAX_CIFAR10)")
    return CIFAR10


@pytest.fixture(scope="session")
def imagewoof() -> Path:
    """Root of the shared Imagewoof folders (train/ and val/ JPEG photos, shorter side 160 px)."""
    if not (IMAGEWOOF / "val").is_dir():
        pytest.fail(f"shared Imagewoof not found at {IMAGEWOOF} (set CORINFOMAX_IMAGEWOOF)")
    return IMAGEWOOF


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a randomly initialised tiny_resnet (CIFAR stem, 32x32, projector 64-32)."""
    import torch

    from corinfomax.training.checkpoint import save_checkpoint
    from corinfomax.training.config import resolve
    from corinfomax.training.loss import CorInfoMaxLoss
    from corinfomax.training.models import CorInfoMaxModel

    torch.manual_seed(0)
    config = resolve("cpu", {"projector": "64-32", "epochs": 1})
    model = CorInfoMaxModel(config.backbone, config.projector, config.cifar_stem)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "loss": CorInfoMaxLoss(model.embedding_dim).state_dict(),
        "epoch": 1,
    })
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 model bundle exported from `tiny_checkpoint` (embedding dim 256, input 32x32)."""
    from corinfomax.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(tiny_checkpoint, out, precision="fp32", verify=False)
    return out
