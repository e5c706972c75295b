"""Under DDP the loss sees the global batch: 2 gloo processes with B/2 each == 1 process with B (issue 2)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from corinfomax.training.loss import CorInfoMaxLoss

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

WORLD, BATCH, IN_DIM, D, STEPS = 2, 16, 6, 4, 3


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        x1 = torch.randn(BATCH, IN_DIM, generator=gen)
        batches.append((x1, x1 + 0.5 * torch.randn(BATCH, IN_DIM, generator=gen)))
    return batches


def run_steps(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    """3 loss steps on this rank's slice; gradients averaged over ranks, as DDP does."""
    torch.manual_seed(0)
    head = torch.nn.Linear(IN_DIM, D, bias=False)  # the same initial weights on every rank
    loss_fn = CorInfoMaxLoss(D)
    out: dict[str, list[torch.Tensor]] = {"loss": [], "attraction": [], "grad": [], "R1": [], "mu2": []}
    for x1, x2 in global_batches():
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        head.zero_grad()
        result = loss_fn(head(x1[part]), head(x2[part]))
        result.loss.backward()
        assert head.weight.grad is not None
        grad = head.weight.grad.clone()
        if world > 1:
            dist.all_reduce(grad)
            grad /= world
        out["loss"].append(result.loss.detach())
        out["attraction"].append(result.attraction.detach())
        out["grad"].append(grad)
        out["R1"].append(loss_fn.R1.clone())
        out["mu2"].append(loss_fn.mu2.clone())
    return out


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(run_steps(rank, WORLD), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = run_steps(0, 1)
    for rank in range(WORLD):
        ddp = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, want in single.items():
            for step, (got, ref) in enumerate(zip(ddp[key], want)):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"{key} step {step} rank {rank}")
