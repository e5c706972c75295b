"""The augmentation's batched image ops: each takes a float batch ``[N, C, H, W]`` in [0, 1] and explicit
per-sample parameters, so tests can hold each against the torchvision reference op for the same parameters.
What to draw, and in which order, lives in `augment`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision use


def resized_crop(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop each ``(top, left, h, w)`` box, resize it to ``size`` (bicubic), mirror where ``flip``.

    ``images`` float ``[N, C, H, W]``; one batched ``grid_sample`` does crop, resize and flip together.
    Its bicubic filter is PyTorch's (a = -0.75) where the PIL reference uses a = -0.5, and pixels at the crop's
    edge read the real neighbours instead of replicated border pixels: differences of a few grey levels.
    """
    n, _, height, width = images.shape
    boxes = boxes.to(images.device, images.dtype)
    top, left, h, w = boxes.unbind(1)
    # Output pixel centres in input pixel coordinates, then to grid_sample's [-1, 1] (align_corners=False).
    steps = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size
    xs = left[:, None] + steps[None] * w[:, None]
    ys = top[:, None] + steps[None] * h[:, None]
    xs = torch.where(flip.to(images.device)[:, None], xs.flip(1), xs)
    gx = xs / width * 2 - 1
    gy = ys / height * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], -1)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, in [-0.5, 0.5]) through HSV, as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB in closed form, all three channels at once (a third of the sector-table version's cost on CPU):
    # channel c = v - v * s * clamp(min(k, 4 - k), 0, 1) with k = (n_c + 6 h) mod 6 and n = (5, 3, 1).
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6.0 * h.unsqueeze(1)) % 6.0
    return maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0, 1))


@dataclass
class JitterParams:
    """Per-sample colour-jitter draws: factors, hue shift, the order of the four ops, and whether applied."""

    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor  # [N, 4] permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
    apply: Tensor  # [N] bool


def color_jitter(x: Tensor, params: JitterParams) -> Tensor:
    """Apply each sample's four jitter ops in that sample's own random order."""
    ops = (
        (adjust_brightness, params.brightness),
        (adjust_contrast, params.contrast),
        (adjust_saturation, params.saturation),
        (adjust_hue, params.hue),
    )
    x = x.clone()
    order = params.order.to(x.device)
    apply = params.apply.to(x.device)
    for position in range(4):
        for op_index, (op, values) in enumerate(ops):
            idx = torch.nonzero(apply & (order[:, position] == op_index)).flatten()
            if idx.numel():
                x[idx] = op(x[idx], values.to(x.device)[idx])
    return x


def grayscale(x: Tensor, apply: Tensor) -> Tensor:
    return torch.where(apply.to(x.device).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def _where(x: Tensor, apply: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``op(x[i], i)`` for the samples ``i`` where ``apply``, the others unchanged: an op drawn with a low
    probability (blur 0.1, solarisation 0.2 on view 2) only costs its share of the batch."""
    index = torch.nonzero(apply.to(x.device)).flatten()
    if len(index) == len(x):
        return op(x, index)
    out = x.clone()
    if len(index):
        out[index] = op(x[index], index)
    return out


def gaussian_blur(x: Tensor, sigma: Tensor, apply: Tensor, kernel_size: int) -> Tensor:
    """Per-sample separable Gaussian blur with reflect padding (grouped convolution over the batch)."""
    return _where(x, apply, lambda y, index: _blur(y, sigma.to(x.device)[index], kernel_size))


def _blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    n, c, h, w = x.shape
    half = kernel_size // 2
    coords = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - half
    kernel = torch.exp(-0.5 * (coords[None] / sigma.to(x.device, x.dtype)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # [N, k]
    kernel = kernel.repeat_interleave(c, 0)  # [N*C, k]
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: Tensor, apply: Tensor) -> Tensor:
    """Invert pixels at or above 128/255 where ``apply``."""
    return _where(x, apply, lambda y, index: torch.where(y >= 128 / 255, 1.0 - y, y))
