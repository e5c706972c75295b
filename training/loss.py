"""The CorInfoMax loss (Ozsoy et al., "Self-Supervised Learning with an Information Maximization
Criterion", NeurIPS 2022, arXiv:2209.07999).

    loss = alpha * MSE(z1, z2) - (logdet(R1 + eps I) + logdet(R2 + eps I)) / D

z1, z2 are the L2-normalised projector outputs of the two views. R1, R2 are running covariance
estimates of each branch: the running mean is updated first (mu = la_mu * mu_old + (1 - la_mu) *
batch_mean), the batch is centred on that new mean, then R = la_R * R_old + (1 - la_R) * batch_cov.
The statistics are kept in float64 and the previous state is detached. The first term ("attraction")
pulls the two views together; the second ("big bang") spreads the embeddings over all D directions.

More than two views (multi-crop: ``G`` global views first, then local ones; or many same-size patches, all
"global"). Each view keeps its own running mean and covariance R_v, so every view's embedding is spread out
on its own. The choices, and why:

    attraction = alpha / |P| * sum_{(i, j) in P} ||z_i - z_j||^2 / (N D),   P = {(i, j): i < j, i < G}
    big bang   = -(2 / V) * sum_v logdet(R_v + eps I) / D

- Pairs with at least one global view: two small local crops of one image may share no content, so pulling
  them together teaches nothing true; a local crop and a global one always overlap in content (SwAV and DINO
  make the same cut). With only global views, P is every pair, and since
  sum_{i<j} ||z_i - z_j||^2 = V * sum_v ||z_v - mean_v z||^2 the pairwise form equals pulling every view
  towards the views' mean (EMP-SSL's form) up to a constant: one formula covers both recipes.
- Mean over pairs and 2/V times the sum of the log-determinants: each term keeps the scale it has with two
  views, so alpha (250 on CIFAR) keeps its meaning and the balance between the terms does not drift with V.
- With V = G = 2 both reduce to the formula above operation for operation (a mean over one pair, a factor
  of exactly 1), so the two-view loss and its state are unchanged.
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
        views: number of views V per image (2: the paper's loss).
        global_views: how many of the views, first in order, are global (the rest are local crops).

    Shapes: ``forward(z_1, ..., z_V)``, each ``[N, D]`` with N >= 2 (any float dtype; statistics are computed
    in float64 with autocast disabled). Buffers ``mu1 .. muV [D]`` and ``R1 .. RV [D, D]`` are float64, saved
    in the ``state_dict`` and moved by ``.to(device)`` (do not cast the module to another dtype).
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
        views: int = 2,
        global_views: int = 2,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if views < 2 or not 1 <= global_views <= views:
            raise ValueError(f"need views >= 2 and 1 <= global_views <= views, got {views} and {global_views}")
        for name, value in (("la_R", la_R), ("la_mu", la_mu)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.dim, self.alpha, self.la_R, self.la_mu, self.eps = dim, alpha, la_R, la_mu, eps
        self.views, self.global_views = views, global_views
        self.pairs = [(i, j) for i in range(global_views) for j in range(i + 1, views)]
        eye = torch.eye(dim, dtype=torch.float64)
        for v in range(1, views + 1):
            self.register_buffer(f"mu{v}", torch.zeros(dim, dtype=torch.float64))
            self.register_buffer(f"R{v}", R_init * eye.clone())

    def forward(self, *z: Tensor) -> CorInfoMaxOutput:
        if len(z) != self.views:
            raise ValueError(f"expected {self.views} views, got {len(z)}")
        if z[0].ndim != 2 or any(view.shape != z[0].shape for view in z):
            raise ValueError(f"every view must be the same [N, D]; got {[tuple(view.shape) for view in z]}")
        if z[0].shape[1] != self.dim:
            raise ValueError(f"expected D = {self.dim} features, got {z[0].shape[1]}")
        if z[0].shape[0] < 2:
            raise ValueError("a batch of at least 2 samples is needed to estimate a covariance")

        with torch.autocast(device_type=z[0].device.type, enabled=False):
            dtype = torch.promote_types(z[0].dtype, torch.float32)  # at least fp32; float64 stays float64
            z = tuple(F.normalize(view.to(dtype), dim=1) for view in z)
            n = _global_count(z[0].shape[0], z[0].device)
            sq_err = torch.stack([_global_sum((z[i] - z[j]).pow(2).sum()) for i, j in self.pairs]).mean()
            attraction = self.alpha * sq_err / (n * self.dim)

            states = [self._update(view.double(), n, *self._state(v)) for v, view in enumerate(z, 1)]
            eye = torch.eye(self.dim, dtype=torch.float64, device=z[0].device)
            logdets = torch.stack([torch.logdet(R + self.eps * eye) for R, _ in states]).sum()
            big_bang = -(logdets * (2 / self.views)) / self.dim

            if self.training:
                # A non-finite batch (the trainer then skips the step) must not poison the running state;
                # torch.where keeps the old state without a host sync.
                finite = torch.stack([torch.isfinite(R).all() for R, _ in states]).all()
                for v, (R, mu) in enumerate(states, 1):
                    R_old, mu_old = self._state(v)
                    setattr(self, f"R{v}", torch.where(finite, R, R_old).detach())
                    setattr(self, f"mu{v}", torch.where(finite, mu, mu_old).detach())
            big_bang = big_bang.to(dtype)
        return CorInfoMaxOutput(attraction + big_bang, attraction, big_bang)

    def _state(self, view: int) -> tuple[Tensor, Tensor]:
        """The running covariance and mean of view ``view`` (1-based, as the buffers are named)."""
        return getattr(self, f"R{view}"), getattr(self, f"mu{view}")

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
