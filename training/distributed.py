"""The torchrun job this process belongs to, and batch norm over the global batch on any backend.

`nn.SyncBatchNorm` runs only on GPUs, so CPU (gloo) jobs get `GlobalBatchNorm`: the same global-batch
statistics through differentiable all-reduces. With it, N processes with B/N images each train like one
process with B images, which is what the CorInfoMax covariance (also global, see `training.loss`) assumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from corinfomax.training.config import ConfigError


@dataclass
class Dist:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when present, else CPU (device ``local_rank`` of this machine); 'cuda' without a GPU is
    a user error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if requested != "cpu":
        raise ConfigError(f"unknown device {requested!r}; use auto, cuda or cpu")
    return torch.device("cpu")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up on ``device``: a CUDA GPU, or a CPU with native bf16 (AMX tiles
    or AVX512-BF16), where oneDNN runs the convolutions in bf16 (a tiny_resnet step at 32 px, batch 128, one
    thread: 2.2x faster on this project's Xeon with AMX). Without them oneDNN emulates bf16, which is not expected
    to pay (not measured: every machine this project has run on has AMX)."""
    if device.type == "cuda":
        return True
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_amx_tile_supported",
                                                                   "_is_avx512_bf16_supported")]
    return device.type == "cpu" and any(check() for check in native)


def setup_distributed(device_kind: str) -> Dist:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the batches of all processes (any backend, any device)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2-d input, got {x.ndim}-d")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        count = torch.tensor([x.numel() // x.shape[1]], device=x.device, dtype=torch.float64)
        dist.all_reduce(count)
        n = float(count.item())
        mean = dist_fn.all_reduce(x.sum(dims)) / n
        var = dist_fn.all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                tracked = self.num_batches_tracked
                assert tracked is not None  # track_running_stats layers count their batches
                tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / max(1.0, n - 1), momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every batch-norm layer for a `GlobalBatchNorm` holding the same values (in place).

    The new layers have new parameter objects: convert before building the optimizer."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(child.buffers(), torch.empty(0)).device)
            setattr(module, name, new)
        else:
            convert_global_batchnorm(child)
    return module
