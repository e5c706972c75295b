"""The paper's asymmetric two-view augmentation, its multi-view extension, in two implementations.

View 1 and view 2 share RandomResizedCrop (scale 0.08-1, bicubic), horizontal flip, colour jitter
(0.4, 0.4, 0.2, 0.1) applied with p 0.8, grayscale with p 0.2; they differ in Gaussian blur
(p 1.0 / 0.1) and solarisation (p 0 / 0.2).

More views (`view_specs`): further global views alternate between those two kinds; local views are small
crops (scale 0.05-0.4, DINO's local range) at a smaller side, blurred with p 0.5 and never solarised (the
multi-crop recipe of SwAV and DINO).

- `PilTwoView`: the two-view reference, torchvision transforms on one PIL image at a time (DataLoader
  workers), drawing from torch's global generator seeded per image.
- `BatchViews`: the same distributions on a whole uint8 batch at once, as tensor ops on the training
  device (GPU or CPU; the ops live in `augment_ops`), so augmentation no longer starves the model. It runs
  in two stages: the crop (random-resized crop + flip) and the colour ops (jitter, grayscale, blur,
  solarisation, normalisation). Small cached images go through both on the device; streamed files are
  cropped per image in the loader workers (`Crops`, fixed-size uint8) and only the colour stage is batched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from corinfomax.training.augment_ops import (
    JitterParams,
    color_jitter,
    gaussian_blur,
    grayscale,
    resized_crop,
    solarize,
)

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
BLUR_P = (1.0, 0.1)
SOLARIZE_P = (0.0, 0.2)
LOCAL_SCALE = (0.05, 0.4)
LOCAL_BLUR_P = 0.5


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 for 224 px as in BYOL; 3 for 32 px)."""
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 == 1 else k + 1


@dataclass(frozen=True)
class ViewSpec:
    """How one view is cut: output side, crop area range, and its blur and solarisation probabilities."""

    size: int
    scale: tuple[float, float] = CROP_SCALE
    blur_p: float = BLUR_P[0]
    solarize_p: float = SOLARIZE_P[0]


def view_specs(image_size: int, global_views: int = 2, local_views: int = 0, local_size: int = 0,
               global_scale: tuple[float, float] = CROP_SCALE,
               local_scale: tuple[float, float] = LOCAL_SCALE) -> list[ViewSpec]:
    """The global views (the paper's two kinds, alternating) at ``image_size``, then the local ones at
    ``local_size`` (0: half the image size)."""
    kinds = list(zip(BLUR_P, SOLARIZE_P))
    specs = [ViewSpec(image_size, global_scale, *kinds[v % 2]) for v in range(global_views)]
    local = local_size or image_size // 2
    return specs + [ViewSpec(local, local_scale, LOCAL_BLUR_P, 0.0) for _ in range(local_views)]


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
                      attempts: int = 10, scale_range: tuple[float, float] = CROP_SCALE) -> Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` as (top, left, h, w), drawn as torchvision draws them:
    up to ``attempts`` tries of (area scale, log-uniform ratio), else the centre crop at the clamped ratio."""
    area = height * width
    scale = torch.empty(n, attempts).uniform_(*scale_range, generator=generator) * area
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
                generator: torch.Generator | None = None, scale_range: tuple[float, float] = CROP_SCALE) -> ViewParams:
    """Draw one view's parameters for ``n`` images, from the reference transforms' distributions."""
    boxes = sample_crop_boxes(n, height, width, generator, scale_range=scale_range)
    flip = torch.rand(n, generator=generator) < 0.5
    return ViewParams(boxes, flip, sample_colour(n, blur_p, solarize_p, generator))


class Crops:
    """The loader workers' part of the streaming pipeline: one random-resized crop (with flip) of one PIL image
    per view, as uint8 ``[3, side, side]`` tensors; `BatchViews.colour_views` finishes a batch of them.

    Boxes and flips are drawn by `sample_crop_boxes` from a generator seeded with the item's ``seed``.
    Each box is resized in uint8 with an antialiased bicubic filter, which matches the PIL reference's
    crop-then-resize to a grey level (a crop from a large image is not aliased) at half PIL's cost.
    """

    def __init__(self, specs: list[ViewSpec]) -> None:
        self.specs = specs

    def __call__(self, image: Image.Image, seed: int) -> tuple[Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
        boxes = self._boxes(image.height, image.width, generator)
        flips = (torch.rand(len(self.specs), generator=generator) < 0.5).tolist()
        crops = []
        for spec, box, flip in zip(self.specs, boxes, flips):
            top, left, h, w = box
            crop = F.interpolate(pixels[..., top : top + h, left : left + w], size=(spec.size, spec.size),
                                 mode="bicubic", antialias=True)[0]
            crops.append(crop.flip(-1) if flip else crop)
        return tuple(crops)

    def _boxes(self, height: int, width: int, generator: torch.Generator) -> list[list[int]]:
        """One box per view; views of one crop scale are drawn in one call, as the two-view pipeline always did."""
        scales = [spec.scale for spec in self.specs]
        if len(set(scales)) == 1:
            return sample_crop_boxes(len(scales), height, width, generator, scale_range=scales[0]).int().tolist()
        return [sample_crop_boxes(1, height, width, generator, scale_range=scale)[0].int().tolist()
                for scale in scales]


class BatchViews:
    """Batched augmentation of uint8 ``[N, 3, H, W]`` (any device) -> one normalised float batch per view.

    Parameters are drawn on the CPU from ``generator``, view after view, for the global batch of ``world``
    shards, and each shard uses its own rows: N processes with B/N images see exactly the views one process
    with B sees.
    """

    def __init__(self, specs: list[ViewSpec], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.specs = specs
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def apply(self, x: Tensor, p: ViewParams, spec: ViewSpec) -> Tensor:
        """One view of float ``x`` in [0, 1] with explicit parameters, normalised."""
        return self.colour(resized_crop(x, p.boxes, p.flip, spec.size), p.colour)

    def colour(self, x: Tensor, p: ColourParams) -> Tensor:
        """The colour stage of one view of float ``x`` in [0, 1] (already cropped), normalised."""
        out = color_jitter(x, p.jitter)
        out = grayscale(out, p.gray)
        out = gaussian_blur(out, p.sigma, p.blur, blur_kernel_size(x.shape[-1]))
        out = solarize(out, p.solarize)
        return (out - self.mean.to(out.device)) / self.std.to(out.device)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 rank: int = 0, world: int = 1) -> list[Tensor]:
        """Both stages: crop and colour ``images`` once per view (the cached-images path)."""
        n, _, height, width = images.shape
        x = _to_float(images)
        views = []
        for spec in self.specs:
            params = sample_view(n * world, height, width, spec.blur_p, spec.solarize_p, generator, spec.scale)
            views.append(self.apply(x, _shard(params, rank, world), spec))
        return views

    def colour_views(self, crops: list[Tensor], generator: torch.Generator | None = None,
                     rank: int = 0, world: int = 1) -> list[Tensor]:
        """The colour stage only, of the uint8 views `Crops` made (the streaming path)."""
        n = len(crops[0])
        views = []
        for crop, spec in zip(crops, self.specs):
            params = _shard(sample_colour(n * world, spec.blur_p, spec.solarize_p, generator), rank, world)
            views.append(self.colour(_to_float(crop), params))
        return views


def _to_float(images: Tensor) -> Tensor:
    # The default float type (float32; float64 where a test compares runs exactly, tests/test_ddp_train.py).
    return images.to(torch.get_default_dtype()).div_(255.0)


def _shard(params: P, rank: int, world: int) -> P:
    """This rank's rows (every ``world``-th sample from ``rank``) of draws made for the global batch."""
    return _select(params, slice(rank, None, world)) if world > 1 else params
