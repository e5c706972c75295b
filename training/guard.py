"""The NaN guard's memory: every tensor an optimisation step may change, saved before the step and put back if
the step leaves anything non-finite, so that a skipped step leaves nothing behind.

A finite loss is not enough: with a huge learning rate, BatchNorm normalises away exploding activations, the
loss stays finite, and the running variances overflow to inf. So the guard checks the whole state after the
step: parameters, buffers (BatchNorm running statistics, the loss's running covariances) and optimizer state.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class StepGuard:
    """Snapshot (`save`), check (`finite`) and roll back (`restore`) the state of ``modules`` and ``optimizers``.

    The snapshot lives in preallocated tensors, refreshed with one fused copy per step; optimizer state that
    a rolled-back step created (e.g. the first momentum buffers) is dropped again.
    """

    def __init__(self, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.modules, self.optimizers = list(modules), list(optimizers)
        self._saved: list[Tensor] = []
        self._had_state: list[set[Tensor]] = []

    def _tensors(self) -> list[Tensor]:
        tensors = [t for m in self.modules for t in (*m.parameters(), *m.buffers())]
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    tensors += [state[k] for k in sorted(state) if isinstance(state[k], Tensor)]
        return [t.detach() for t in tensors]

    @torch.no_grad()
    def save(self) -> None:
        """Remember the current state (call before the forward pass: BatchNorm updates its buffers there)."""
        tensors = self._tensors()
        if [(t.shape, t.dtype, t.device) for t in tensors] != [(s.shape, s.dtype, s.device) for s in self._saved]:
            self._saved = [t.clone() for t in tensors]  # the first step, or the optimizer just created its state
        else:
            torch._foreach_copy_(self._saved, tensors)
        self._had_state = [set(opt.state) for opt in self.optimizers]

    @torch.no_grad()
    def finite(self, device: torch.device) -> Tensor:
        """A 0-d bool tensor on ``device``: whether every floating-point tensor of the state is finite (no sync)."""
        floats = [t for t in self._tensors() if t.is_floating_point()]
        peaks = torch._foreach_norm(floats, float("inf"))  # NaN and inf survive the max-abs
        return torch.isfinite(torch.stack([p.to(device) for p in peaks])).all()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the state `save` remembered."""
        for opt, had in zip(self.optimizers, self._had_state):
            for p in [p for p in opt.state if p not in had]:
                del opt.state[p]
        torch._foreach_copy_(self._tensors(), self._saved)
