"""Learning-rate schedule, the LARS optimizer for large batches, and the optimizer a config names."""

from __future__ import annotations

import math

import torch
from torch import nn

from corinfomax.training.config import ConfigError, TrainConfig


def lr_at(step: int, total_steps: int, warmup_steps: float, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base_lr``, then cosine decay to ``min_lr``, per step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise trust ratios (You et al., 2017); biases and norm weights (1-d) are exempt
    from both weight decay and adaptation, as is usual for self-supervised training."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.norm(p), torch.norm(grad)
                    trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm,
                                        torch.ones_like(p_norm))
                    grad = grad.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return None


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names ('sgd' or 'lars') over ``model``'s parameters."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "lars":
        return LARS(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ConfigError(f"unknown optimizer {config.optimizer!r}; use 'sgd' or 'lars'")
