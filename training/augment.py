"""The paper's asymmetric two-view augmentation, in two interchangeable implementations.

View 1 and view 2 share RandomResizedCrop (scale 0.08-1, bicubic), horizontal flip, colour jitter
(0.4, 0.4, 0.2, 0.1) applied with p 0.8, grayscale with p 0.2; they differ in Gaussian blur
(p 1.0 / 0.1) and solarisation (p 0 / 0.2).

- `PilTwoView`: the reference, torchvision transforms on one PIL image at a time (DataLoader workers),
  drawing from torch's global generator seeded per image.
- `BatchTwoView`: the same distributions on a whole uint8 batch at once, as tensor ops on the training
  device (GPU or CPU), so augmentation no longer starves the model. Each op is a function taking
  explicit per-sample parameters, so tests can compare it with the reference op for the same parameters.
  It runs in two stages: the crop (random-resized crop + flip) and the colour ops (jitter, grayscale, blur,
  solarisation, normalisation). Small cached images go through both on the device; streamed files are
  cropped per image in the loader workers (`TwoCrops`, fixed-size uint8) and only the colour stage is batched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
BLUR_P = (1.0, 0.1)
SOLARIZE_P = (0.0, 0.2)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision use


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 for 224 px as in BYOL; 3 for 32 px)."""
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 == 1 else k + 1


# --------------------------------------------------------------------------- reference (PIL)
class PilTwoView:
    """Reference two-view augmentation of one PIL image -> two normalised float tensors."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.views = [self._view(image_size, mean, std, blur_p, sol_p) for blur_p, sol_p in zip(BLUR_P, SOLARIZE_P)]

    @staticmethod
    def _view(size: int, mean, std, blur_p: float, solarize_p: float) -> T.Compose:
        return T.Compose([
            T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_P),
            T.RandomGrayscale(p=GRAYSCALE_P),
            T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=blur_p),
            T.RandomSolarize(threshold=128, p=solarize_p),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    def __call__(self, image: Image.Image, seed: int) -> tuple[Tensor, Tensor]:
        with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global generator
            torch.manual_seed(seed)
            return self.views[0](image), self.views[1](image)


# --------------------------------------------------------------------------- batched ops
def sample_crop_boxes(n: int, height: int, width: int, generator: torch.Generator | None = None,
                      attempts: int = 10) -> Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` as (top, left, h, w), drawn as torchvision draws them:
    up to ``attempts`` tries of (area scale, log-uniform ratio), else the centre crop at the clamped ratio."""
    area = height * width
    scale = torch.empty(n, attempts).uniform_(*CROP_SCALE, generator=generator) * area
    log_ratio = torch.empty(n, attempts).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(scale * ratio))
    h = torch.round(torch.sqrt(scale / ratio))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    found, first = ok.any(1), ok.float().argmax(1)
    rows = torch.arange(n)
    h_sel, w_sel = h[rows, first], w[rows, first]
    u_top, u_left = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
    top = torch.floor(u_top * (height - h_sel + 1))
    left = torch.floor(u_left * (width - w_sel + 1))
    boxes = torch.stack([top, left, h_sel, w_sel], 1)
    if found.all():  # the usual case; a test per box costs the per-image caller (loader workers) dearly
        return boxes
    # Fallback (no valid try): centre crop with the ratio clamped into range, as torchvision does.
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fw, fh = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        fh, fw = height, int(round(height * CROP_RATIO[1]))
    else:
        fw, fh = width, height
    centre = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=boxes.dtype)
    return torch.where(found[:, None], boxes, centre)


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


def sample_jitter(n: int, generator: torch.Generator | None = None) -> JitterParams:
    b, c, s, h = JITTER
    return JitterParams(
        brightness=torch.empty(n).uniform_(1 - b, 1 + b, generator=generator),
        contrast=torch.empty(n).uniform_(1 - c, 1 + c, generator=generator),
        saturation=torch.empty(n).uniform_(1 - s, 1 + s, generator=generator),
        hue=torch.empty(n).uniform_(-h, h, generator=generator),
        order=torch.rand(n, 4, generator=generator).argsort(1),
        apply=torch.rand(n, generator=generator) < JITTER_P,
    )


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


P = TypeVar("P", "ColourParams", "ViewParams", JitterParams)


def _select(params: P, index: Tensor | slice) -> P:
    """The same draws, keeping the samples at ``index`` (nested draws too)."""
    def pick(value: Any) -> Any:
        return value[index] if isinstance(value, Tensor) else _select(value, index)

    return dataclasses.replace(params, **{f.name: pick(getattr(params, f.name)) for f in dataclasses.fields(params)})


@dataclass
class ColourParams:
    """One view's per-sample draws after the crop: jitter, grayscale, blur sigma and flag, solarisation."""

    jitter: JitterParams
    gray: Tensor
    sigma: Tensor
    blur: Tensor
    solarize: Tensor


@dataclass
class ViewParams:
    """Every random draw of one view for a batch: crop boxes, flips, then the colour stage's draws."""

    boxes: Tensor
    flip: Tensor
    colour: ColourParams


def sample_colour(n: int, blur_p: float, solarize_p: float, generator: torch.Generator | None = None) -> ColourParams:
    """Draw one view's colour-stage parameters for ``n`` images, from the reference transforms' distributions."""
    return ColourParams(
        jitter=sample_jitter(n, generator),
        gray=torch.rand(n, generator=generator) < GRAYSCALE_P,
        sigma=torch.empty(n).uniform_(*BLUR_SIGMA, generator=generator),
        blur=torch.rand(n, generator=generator) < blur_p,
        solarize=torch.rand(n, generator=generator) < solarize_p,
    )


def sample_view(n: int, height: int, width: int, blur_p: float, solarize_p: float,
                generator: torch.Generator | None = None) -> ViewParams:
    """Draw one view's parameters for ``n`` images, from the reference transforms' distributions."""
    boxes = sample_crop_boxes(n, height, width, generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return ViewParams(boxes, flip, sample_colour(n, blur_p, solarize_p, generator))


class TwoCrops:
    """The loader workers' part of the streaming pipeline: two random-resized crops (with flips) of one PIL
    image, as uint8 ``[3, size, size]`` tensors; `BatchTwoView.colour_views` finishes a batch of them.

    Boxes and flips are drawn by `sample_crop_boxes` from a generator seeded with the item's ``seed``.
    Each box is resized in uint8 with an antialiased bicubic filter, which matches the PIL reference's
    crop-then-resize to a grey level (a crop from a large image is not aliased) at half PIL's cost.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image, seed: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
        boxes = sample_crop_boxes(2, image.height, image.width, generator).int().tolist()
        flips = (torch.rand(2, generator=generator) < 0.5).tolist()
        crops = []
        for (top, left, h, w), flip in zip(boxes, flips):
            crop = F.interpolate(pixels[..., top : top + h, left : left + w], size=(self.size, self.size),
                                 mode="bicubic", antialias=True)[0]
            crops.append(crop.flip(-1) if flip else crop)
        return crops[0], crops[1]


class BatchTwoView:
    """Batched two-view augmentation of uint8 ``[N, 3, H, W]`` (any device) -> two normalised float views.

    Parameters are drawn on the CPU from ``generator``, for the global batch of ``world`` shards, and each
    shard uses its own rows: N processes with B/N images see exactly the views one process with B sees.
    """

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size = image_size
        self.kernel_size = blur_kernel_size(image_size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def apply(self, x: Tensor, p: ViewParams) -> Tensor:
        """One view of float ``x`` in [0, 1] with explicit parameters, normalised."""
        return self.colour(resized_crop(x, p.boxes, p.flip, self.size), p.colour)

    def colour(self, x: Tensor, p: ColourParams) -> Tensor:
        """The colour stage of one view of float ``x`` in [0, 1] (already cropped), normalised."""
        out = color_jitter(x, p.jitter)
        out = grayscale(out, p.gray)
        out = gaussian_blur(out, p.sigma, p.blur, self.kernel_size)
        out = solarize(out, p.solarize)
        return (out - self.mean.to(out.device)) / self.std.to(out.device)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        """Both stages: crop and colour ``images`` twice (the cached-images path)."""
        n, _, height, width = images.shape
        x = _to_float(images)
        views = []
        for blur_p, solarize_p in zip(BLUR_P, SOLARIZE_P):
            params = _shard(sample_view(n * world, height, width, blur_p, solarize_p, generator), rank, world)
            views.append(self.apply(x, params))
        return views[0], views[1]

    def colour_views(self, crops: tuple[Tensor, Tensor], generator: torch.Generator | None = None,
                     rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        """The colour stage only, of the two uint8 views `TwoCrops` made (the streaming path)."""
        n = len(crops[0])
        views = []
        for crop, blur_p, solarize_p in zip(crops, BLUR_P, SOLARIZE_P):
            params = _shard(sample_colour(n * world, blur_p, solarize_p, generator), rank, world)
            views.append(self.colour(_to_float(crop), params))
        return views[0], views[1]


def _to_float(images: Tensor) -> Tensor:
    # The default float type (float32; float64 where a test compares runs exactly, tests/test_ddp_train.py).
    return images.to(torch.get_default_dtype()).div_(255.0)


def _shard(params: P, rank: int, world: int) -> P:
    """This rank's rows (every ``world``-th sample from ``rank``) of draws made for the global batch."""
    return _select(params, slice(rank, None, world)) if world > 1 else params
