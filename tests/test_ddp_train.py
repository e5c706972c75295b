"""`train` under DDP: 2 gloo processes on CPU log the same per-step losses as 1 process on the same global
batch (issue 3). Both see the same images and views: the data order is sharded by index and the batched
augmentation draws its parameters for the global batch; batch norm and the loss use global-batch statistics."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datakit import small_folder
from trainkit import tiny_config

from corinfomax.training.checkpoint import load_checkpoint
from corinfomax.training.evaluate import one_cpu_thread as one_thread
from corinfomax.training.trainer import train

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

WORLD = 2
# channels_last off: PyTorch's CPU channels-last BatchNorm2d is ~10x less precise in float32 than contiguous.
RECIPE = dict(epochs=1, lr=0.01, channels_last=False)
# Both runs train in float64 (the default dtype, so model, views and probe are all float64). In float32 the two
# runs compute batch norm and gradient sums in a different order (GlobalBatchNorm and all-reduce vs one native
# kernel), each step's rounding differs by ~1e-7 relative, and how far that grows in three SGD steps depends on
# the CPU's kernels (AMX vs AVX-512 vs AVX2 block sizes): 5.7e-6 on one Xeon against a 1e-6 bound tuned on an
# EPYC. In float64 the same reordering costs ~1e-16 relative per operation, so any bound far above that and far
# below a real DDP error (a wrong gradient average or BN statistic moves weights by > 1e-4) is CPU-independent.
TOLERANCE: dict[str, Any] = dict(rtol=1e-9, atol=1e-11)


@contextmanager
def float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def worker(rank: int, port: int, data: str, out: str, cache: str) -> None:
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CORINFOMAX_CACHE=cache)
    torch.set_num_threads(1)
    try:
        with float64():
            train(tiny_config(Path(data), Path(out), **RECIPE), progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(run: Path) -> list[tuple[float, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["attraction"], r["big_bang"]) for r in rows if "lr" in r]


def test_two_gloo_processes_train_like_one(cifar10: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = small_folder(cifar10, tmp_path / "data", per_class=10)  # 100 images: 3 global batches of 32
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("CORINFOMAX_CACHE", cache)
    mp.spawn(worker, args=(free_port(), str(data), str(tmp_path / "ddp"), cache), nprocs=WORLD, join=True)
    with one_thread(), float64():
        train(tiny_config(data, tmp_path / "single", **RECIPE), progress=False)

    single, ddp = step_losses(tmp_path / "single"), step_losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 3
    # Every step, not only the first: data order, views, global BN, gradient averaging, weight decay, momentum and
    # the lr schedule all agree, so the runs stay within float64 summation-order noise.
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), **TOLERANCE)
    a, b = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "single")
    assert set(a["model"]) == set(b["model"]) and set(a["loss"]) == set(b["loss"])  # same format at any world size
    assert a["model"]["backbone.blocks.0.conv2.weight"].dtype == torch.float64
    torch.testing.assert_close(a["model"], b["model"], **TOLERANCE)  # weights and BN running stats
    torch.testing.assert_close(a["loss"], b["loss"], **TOLERANCE)  # the loss's running mean and covariance
    assert not (tmp_path / "ddp" / "rank1").exists() and len(list((tmp_path / "ddp").iterdir())) == 3
