"""The CorInfoMax loss (Ozsoy et al., "Self-Supervised Learning with an Information Maximization
Criterion", NeurIPS 2022, arXiv:2209.07999).

    loss = alpha * MSE(z1, z2) - (logdet(R1 + eps I) + logdet(R2 + eps I)) / D

z1, z2 are the L2-normalised projector outputs of the two views. R1, R2 are running covariance
estimates of each branch: the running mean is updated first (mu = la_mu * mu_old + (1 - la_mu) *
batch_mean), the batch is centred on that new mean, then R = la_R * R_old + (1 - la_R) * batch_cov.
The statistics are kept in float64 and the previous state is detached. The first term ("attraction")
pulls the two views together; the second ("big bang") spreads the embeddings over all D directions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn  # differentiable collectives; not loaded by torch.distributed
import torch.nn.functional as F
from torch import Tensor, nn


class CorInfoMaxOutput(NamedTuple):
    """The loss and its two terms (``loss = attraction + big_bang``)."""

    loss: Tensor
    attraction: Tensor
    big_bang: Tensor


def _global_sum(x: Tensor) -> Tensor:
    """Sum over all processes, differentiably, so every rank sees global-batch statistics.

    The backward all-reduce hands each rank ``world_size`` times its share of the gradient; DDP's
    gradient averaging divides that back, so N ranks with batch B/N train exactly like one with B.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist_fn.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _global_count(n: int, device: torch.device) -> int:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], device=device, dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())
    return n


class CorInfoMaxLoss(nn.Module):
    """CorInfoMax loss with running float64 covariance state per branch.

    Args:
        dim: projector output dimension D.
        alpha: weight of the attraction (MSE) term; the paper uses 250 on CIFAR-10, 1000 on CIFAR-100.
        la_R: forgetting factor of the covariance (0.01: 99% of R comes from the current batch).
        la_mu: forgetting factor of the mean.
        eps: ridge added before the log-determinant.
        R_init: scale of the identity the covariance starts from.

    Shapes: ``z1``, ``z2``: ``[N, D]`` with N >= 2 (any float dtype; statistics are computed in float64
    with autocast disabled). Buffers ``mu1, mu2 [D]`` and ``R1, R2 [D, D]`` are float64, saved in the
    ``state_dict`` and moved by ``.to(device)`` (do not cast the module to another dtype).
    """

    mu1: Tensor
    mu2: Tensor
    R1: Tensor
    R2: Tensor

    def __init__(
        self,
        dim: int,
        alpha: float = 250.0,
        la_R: float = 0.01,
        la_mu: float = 0.01,
        eps: float = 1e-8,
        R_init: float = 1.0,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        for name, value in (("la_R", la_R), ("la_mu", la_mu)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.dim, self.alpha, self.la_R, self.la_mu, self.eps = dim, alpha, la_R, la_mu, eps
        eye = torch.eye(dim, dtype=torch.float64)
        self.register_buffer("mu1", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("mu2", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("R1", R_init * eye)
        self.register_buffer("R2", R_init * eye.clone())

    def forward(self, z1: Tensor, z2: Tensor) -> CorInfoMaxOutput:
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(f"z1 and z2 must both be [N, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
        if z1.shape[1] != self.dim:
            raise ValueError(f"expected D = {self.dim} features, got {z1.shape[1]}")
        if z1.shape[0] < 2:
            raise ValueError("a batch of at least 2 samples is needed to estimate a covariance")

        with torch.autocast(device_type=z1.device.type, enabled=False):
            dtype = torch.promote_types(z1.dtype, torch.float32)  # at least fp32; float64 stays float64
            z1 = F.normalize(z1.to(dtype), dim=1)
            z2 = F.normalize(z2.to(dtype), dim=1)
            n = _global_count(z1.shape[0], z1.device)
            sq_err = _global_sum((z1 - z2).pow(2).sum())
            attraction = self.alpha * sq_err / (n * self.dim)

            R1, mu1 = self._update(z1.double(), n, self.R1, self.mu1)
            R2, mu2 = self._update(z2.double(), n, self.R2, self.mu2)
            eye = torch.eye(self.dim, dtype=torch.float64, device=z1.device)
            big_bang = -(torch.logdet(R1 + self.eps * eye) + torch.logdet(R2 + self.eps * eye)) / self.dim

            if self.training:
                # A non-finite batch (the trainer then skips the step) must not poison the running state;
                # torch.where keeps the old state without a host sync.
                finite = torch.isfinite(R1).all() & torch.isfinite(R2).all()
                self.R1 = torch.where(finite, R1, self.R1).detach()
                self.mu1 = torch.where(finite, mu1, self.mu1).detach()
                self.R2 = torch.where(finite, R2, self.R2).detach()
                self.mu2 = torch.where(finite, mu2, self.mu2).detach()
            big_bang = big_bang.to(dtype)
        return CorInfoMaxOutput(attraction + big_bang, attraction, big_bang)

    def _update(self, z: Tensor, n: int, R_old: Tensor, mu_old: Tensor) -> tuple[Tensor, Tensor]:
        mu = self.la_mu * mu_old.detach() + (1.0 - self.la_mu) * _global_sum(z.sum(0)) / n
        zc = z - mu
        cov = _global_sum(zc.T @ zc) / n
        R = self.la_R * R_old.detach() + (1.0 - self.la_R) * cov
        return R, mu

    @torch.no_grad()
    def spectrum(self) -> dict[str, float]:
        """Eigen-spectrum of the running covariance R1: effective rank, smallest and largest eigenvalue, and all
        eigenvalues, largest first (dimensional collapse shows as a tail falling to zero; `corinfomax report`)."""
        eig = torch.linalg.eigvalsh(self.R1).clamp_min(0.0)
        p = eig / eig.sum().clamp_min(1e-300)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
        return {
            "effective_rank": float(torch.exp(entropy)),
            "eig_min": float(eig.min()),
            "eig_max": float(eig.max()),
            "eigenvalues": eig.flip(0).tolist(),
        }
