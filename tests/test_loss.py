"""CorInfoMaxLoss against an independent float64 NumPy reference of the paper's formula (issue 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corinfomax.training.loss import CorInfoMaxLoss

D = 8
HYPER = dict(alpha=250.0, la_R=0.01, la_mu=0.01, eps=1e-8, R_init=1.0)


class NumpyCorInfoMax:
    """The loss written straight from arXiv:2209.07999 (and issue 2), in float64 NumPy."""

    def __init__(self, dim: int, alpha: float, la_R: float, la_mu: float, eps: float, R_init: float) -> None:
        self.alpha, self.la_R, self.la_mu, self.eps = alpha, la_R, la_mu, eps
        self.mu = [np.zeros(dim), np.zeros(dim)]
        self.R = [R_init * np.eye(dim), R_init * np.eye(dim)]

    def step(self, z1: np.ndarray, z2: np.ndarray) -> tuple[float, float, float]:
        n, dim = z1.shape
        zs = [z / np.linalg.norm(z, axis=1, keepdims=True) for z in (z1, z2)]
        attraction = self.alpha * np.mean((zs[0] - zs[1]) ** 2)
        logdets = []
        for b, z in enumerate(zs):
            self.mu[b] = self.la_mu * self.mu[b] + (1 - self.la_mu) * z.mean(axis=0)
            zc = z - self.mu[b]
            self.R[b] = self.la_R * self.R[b] + (1 - self.la_R) * (zc.T @ zc) / n
            sign, logdet = np.linalg.slogdet(self.R[b] + self.eps * np.eye(dim))
            assert sign > 0
            logdets.append(logdet)
        big_bang = -(logdets[0] + logdets[1]) / dim
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
    [((8, D), (8, D + 1), "must both be"), ((8, D, 1), (8, D, 1), "must both be"),
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


def test_non_finite_batch_keeps_running_state() -> None:
    loss_fn = CorInfoMaxLoss(D, **HYPER)
    loss_fn(*(torch.from_numpy(z).float() for z in random_views(np.random.default_rng(4))))
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    z1, z2 = torch.randn(16, D), torch.randn(16, D)
    z1[3, 0] = float("nan")
    assert not torch.isfinite(loss_fn(z1, z2).loss)
    assert all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())
