"""CorInfoMaxLoss against an independent float64 NumPy reference of the paper's formula, and of its V-view
extension (the pairs and scale written down in training/loss.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from corinfomax.training.loss import CorInfoMaxLoss

D = 8
HYPER: dict[str, Any] = dict(alpha=250.0, la_R=0.01, la_mu=0.01, eps=1e-8, R_init=1.0)


class NumpyCorInfoMax:
    """The loss written straight from arXiv:2209.07999, for V views of which the first G are global, in float64
    NumPy: attraction averaged over the pairs holding a global view, 2/V times the views' log-determinants."""

    def __init__(self, dim: int, alpha: float, la_R: float, la_mu: float, eps: float, R_init: float,
                 views: int = 2, global_views: int = 2) -> None:
        self.alpha, self.la_R, self.la_mu, self.eps, self.global_views = alpha, la_R, la_mu, eps, global_views
        self.mu = [np.zeros(dim) for _ in range(views)]
        self.R = [R_init * np.eye(dim) for _ in range(views)]

    def step(self, *views: np.ndarray) -> tuple[float, float, float]:
        n, dim = views[0].shape
        zs = [z / np.linalg.norm(z, axis=1, keepdims=True) for z in views]
        pairs = [(i, j) for i in range(len(zs)) for j in range(i + 1, len(zs)) if i < self.global_views]
        attraction = self.alpha * np.mean([np.mean((zs[i] - zs[j]) ** 2) for i, j in pairs])
        logdets = []
        for b, z in enumerate(zs):
            self.mu[b] = self.la_mu * self.mu[b] + (1 - self.la_mu) * z.mean(axis=0)
            zc = z - self.mu[b]
            self.R[b] = self.la_R * self.R[b] + (1 - self.la_R) * (zc.T @ zc) / n
            sign, logdet = np.linalg.slogdet(self.R[b] + self.eps * np.eye(dim))
            assert sign > 0
            logdets.append(logdet)
        big_bang = -(2 / len(zs)) * sum(logdets) / dim
        return attraction + big_bang, attraction, big_bang


def random_views(rng: np.random.Generator, n: int = 32, dim: int = D) -> tuple[np.ndarray, np.ndarray]:
    z1 = rng.normal(size=(n, dim))
    return z1, z1 + 0.3 * rng.normal(size=(n, dim))


def test_consecutive_steps_match_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    loss_fn, ref = CorInfoMaxLoss(D, **HYPER), NumpyCorInfoMax(D, **HYPER)
    for _ in range(5):
        z1, z2 = random_views(rng)
        out = loss_fn(torch.from_numpy(z1).float(), torch.from_numpy(z2).float())
        want = ref.step(z1, z2)
        np.testing.assert_allclose([float(t) for t in out], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(loss_fn.mu1.numpy(), ref.mu[0], atol=1e-6)
        np.testing.assert_allclose(loss_fn.R2.numpy(), ref.R[1], atol=1e-6)
    assert float(out.loss) == pytest.approx(float(out.attraction + out.big_bang))


@pytest.mark.parametrize("views, global_views", [(6, 2), (4, 4), (3, 1)])
def test_more_views_match_numpy_reference(views: int, global_views: int) -> None:
    rng = np.random.default_rng(5)
    loss_fn = CorInfoMaxLoss(D, **HYPER, views=views, global_views=global_views)
    ref = NumpyCorInfoMax(D, **HYPER, views=views, global_views=global_views)
    for _ in range(4):
        base = rng.normal(size=(32, D))
        zs = [base + 0.3 * rng.normal(size=base.shape) for _ in range(views)]
        out = loss_fn(*(torch.from_numpy(z) for z in zs))  # float64 in: a check of the formula, not of rounding
        np.testing.assert_allclose([float(t) for t in out], ref.step(*zs), rtol=1e-10, atol=1e-10)
    assert set(loss_fn.state_dict()) == {f"{kind}{v}" for kind in ("mu", "R") for v in range(1, views + 1)}


def test_two_views_are_the_papers_formula_bit_for_bit() -> None:
    """The V-view code with V = 2 performs the two-view formula's operations exactly: same loss, gradients and
    state to the last bit (the pairs' mean is over one pair, the views' factor is 2/2)."""
    torch.manual_seed(0)
    loss_fn = CorInfoMaxLoss(D, **HYPER)
    R, mu = [torch.eye(D, dtype=torch.float64)] * 2, [torch.zeros(D, dtype=torch.float64)] * 2
    for _ in range(3):
        z = [torch.randn(16, D, requires_grad=True) for _ in range(2)]
        ours = loss_fn(*z)
        ours_grad = torch.autograd.grad(ours.loss, z)
        zn = [torch.nn.functional.normalize(v, dim=1) for v in z]
        attraction = HYPER["alpha"] * (zn[0] - zn[1]).pow(2).sum() / (16 * D)
        logdets = []
        for b in range(2):
            x = zn[b].double()
            mu[b] = HYPER["la_mu"] * mu[b] + (1 - HYPER["la_mu"]) * x.sum(0) / 16
            R[b] = HYPER["la_R"] * R[b] + (1 - HYPER["la_R"]) * ((x - mu[b]).T @ (x - mu[b])) / 16
            logdets.append(torch.logdet(R[b] + HYPER["eps"] * torch.eye(D, dtype=torch.float64)))
        big_bang = (-(logdets[0] + logdets[1]) / D).float()
        want = attraction + big_bang
        assert torch.equal(ours.loss, want) and torch.equal(ours.big_bang, big_bang)
        assert all(torch.equal(a, b) for a, b in zip(ours_grad, torch.autograd.grad(want, z)))
        assert torch.equal(loss_fn.R2, R[1].detach()) and torch.equal(loss_fn.mu1, mu[0].detach())
        R, mu = [r.detach() for r in R], [m.detach() for m in mu]


def test_state_is_float64_buffers_saved_and_restored() -> None:
    rng = np.random.default_rng(1)
    loss_fn = CorInfoMaxLoss(D, **HYPER)
    for _ in range(3):
        loss_fn(*(torch.from_numpy(z).float() for z in random_views(rng)))
    state = loss_fn.state_dict()
    assert set(state) == {"mu1", "mu2", "R1", "R2"}
    assert all(t.dtype == torch.float64 for t in state.values())
    assert not any(t.requires_grad for t in state.values())

    resumed = CorInfoMaxLoss(D, **HYPER)
    resumed.load_state_dict(state)
    z1, z2 = (torch.from_numpy(z).float() for z in random_views(rng))
    assert torch.equal(loss_fn(z1, z2).loss, resumed(z1, z2).loss)
    assert torch.equal(loss_fn.R1, resumed.R1)

    moved = resumed.to("meta")
    assert all(t.device.type == "meta" and t.dtype == torch.float64 for t in moved.buffers())


def test_eval_mode_leaves_running_state_alone() -> None:
    loss_fn = CorInfoMaxLoss(D, **HYPER).eval()
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    loss_fn(*(torch.from_numpy(z).float() for z in random_views(np.random.default_rng(2))))
    assert all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())


def test_gradcheck_float64() -> None:
    rng = np.random.default_rng(3)
    warm = CorInfoMaxLoss(4, **HYPER)
    warm(*(torch.from_numpy(z).float() for z in random_views(rng, n=6, dim=4)))  # a non-trivial R_old
    z1, z2 = (torch.from_numpy(z).requires_grad_() for z in random_views(rng, n=6, dim=4))

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss_fn = CorInfoMaxLoss(4, **HYPER)
        loss_fn.load_state_dict(warm.state_dict())
        return loss_fn(a, b).loss

    assert fn(z1, z2).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (z1, z2), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_autocast_bf16_close_to_fp32() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, D, bias=False)
    x1, x2 = torch.randn(64, 16), torch.randn(64, 16)
    x2 = x1 + 0.3 * x2
    fp32 = CorInfoMaxLoss(D, **HYPER)(head(x1), head(x2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = head(x1), head(x2)
        assert z1.dtype == torch.bfloat16
        bf16 = CorInfoMaxLoss(D, **HYPER)(z1, z2)
    assert torch.isfinite(bf16.loss) and bf16.loss.dtype == torch.float32
    assert bf16.loss.item() == pytest.approx(fp32.loss.item(), rel=2e-2, abs=2e-2)
    bf16.loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize(
    "shape1, shape2, match",
    [((8, D), (8, D + 1), "must be the same"), ((8, D, 1), (8, D, 1), "must be the same"),
     ((8, D + 1), (8, D + 1), "expected D"), ((1, D), (1, D), "at least 2")],
)
def test_shape_errors(shape1: tuple[int, ...], shape2: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CorInfoMaxLoss(D)(torch.randn(shape1), torch.randn(shape2))


def test_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="la_R"):
        CorInfoMaxLoss(D, la_R=1.0)
    with pytest.raises(ValueError, match="dim"):
        CorInfoMaxLoss(0)
    with pytest.raises(ValueError, match="global_views"):
        CorInfoMaxLoss(D, views=3, global_views=4)
    with pytest.raises(ValueError, match="expected 3 views"):
        CorInfoMaxLoss(D, views=3)(torch.randn(8, D), torch.randn(8, D))


def test_non_finite_batch_keeps_running_state() -> None:
    loss_fn = CorInfoMaxLoss(D, **HYPER)
    loss_fn(*(torch.from_numpy(z).float() for z in random_views(np.random.default_rng(4))))
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    z1, z2 = torch.randn(16, D), torch.randn(16, D)
    z1[3, 0] = float("nan")
    assert not torch.isfinite(loss_fn(z1, z2).loss)
    assert all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())
