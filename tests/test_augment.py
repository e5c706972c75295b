"""The batched two-view augmentation vs the torchvision reference, op by op (issue 3): same parameter
distributions, and the same image for the same parameters (within interpolation tolerance)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from corinfomax.training import augment as A
from corinfomax.training import augment_ops as ops
from corinfomax.training.data import decode_folder
from corinfomax.training.evaluate import one_cpu_thread as one_thread

N = 4000  # draws per distribution check


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def images(cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """40 real CIFAR-10 test images as float [N, 3, 32, 32] in [0, 1]."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORINFOMAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        data = decode_folder(cifar10 / "test", 32, limit_per_class=4, progress=False)
    return data.images.float() / 255


def close_means(a: torch.Tensor, b: torch.Tensor, sigmas: float = 5.0) -> None:
    """Two samples of the same distribution: means within `sigmas` standard errors."""
    a, b = a.double(), b.double()
    se = math.sqrt(a.var() / len(a) + b.var() / len(b)) + 1e-12
    assert abs(a.mean() - b.mean()) < sigmas * se, (float(a.mean()), float(b.mean()))


def close_quantiles(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(a.double(), q), torch.quantile(b.double(), q), rtol=0, atol=tol)


# --------------------------------------------------------------------------- parameter distributions
@pytest.mark.parametrize("height,width", [(32, 32), (24, 64)])
def test_crop_boxes_follow_random_resized_crop(height: int, width: int) -> None:
    ours = A.sample_crop_boxes(N, height, width, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, height, width), A.CROP_SCALE, A.CROP_RATIO)
                        for _ in range(N)], dtype=torch.float32)
    top, left, h, w = ours.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= height).all() and (left + w <= width).all()
    for column in range(4):
        close_means(ours[:, column], ref[:, column])
        close_quantiles(ours[:, column], ref[:, column], tol=2.0)
    close_means(h * w, ref[:, 2] * ref[:, 3])


def test_crop_boxes_fall_back_to_the_centre_crop_as_torchvision_does() -> None:
    # 4 x 100 px: no try fits, so every box is the centre crop at the ratio clamped to 4/3.
    want = list(T.RandomResizedCrop.get_params(torch.empty(3, 4, 100), A.CROP_SCALE, A.CROP_RATIO))
    assert want == [0, 47, 4, 5]
    assert A.sample_crop_boxes(3, 4, 100).tolist() == [want] * 3


def test_jitter_factors_follow_color_jitter() -> None:
    p = A.sample_jitter(N, torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    b, c, s, h = A.JITTER
    jitter = T.ColorJitter(*A.JITTER)
    ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    draws = [T.ColorJitter.get_params(*ranges) for _ in range(N)]
    ref_order = torch.stack([d[0] for d in draws])
    for ours, index, (lo, hi) in ((p.brightness, 1, (1 - b, 1 + b)), (p.contrast, 2, (1 - c, 1 + c)),
                                  (p.saturation, 3, (1 - s, 1 + s)), (p.hue, 4, (-h, h))):
        ref = torch.tensor([d[index] for d in draws])
        assert lo <= float(ours.min()) and float(ours.max()) <= hi
        close_means(ours, ref)
        close_quantiles(ours, ref, tol=0.05 * (hi - lo))
    # Each op is equally likely at each position (a uniform random order), as in the reference.
    for position in range(4):
        for op in range(4):
            close_means((p.order[:, position] == op).float(), (ref_order[:, position] == op).float())
    assert sorted(p.order[0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("view", [0, 1])
def test_application_probabilities_match_the_paper(view: int) -> None:
    p = A.sample_view(N, 32, 32, A.BLUR_P[view], A.SOLARIZE_P[view], torch.Generator().manual_seed(2))
    c = p.colour
    for flags, want in ((p.flip, 0.5), (c.jitter.apply, A.JITTER_P), (c.gray, A.GRAYSCALE_P),
                        (c.blur, A.BLUR_P[view]), (c.solarize, A.SOLARIZE_P[view])):
        rate = float(flags.float().mean())
        assert abs(rate - want) <= 5 * math.sqrt(want * (1 - want) / N) + 1e-9, (rate, want)
    torch.manual_seed(2)
    ref_sigma = torch.tensor([T.GaussianBlur.get_params(*A.BLUR_SIGMA) for _ in range(N)])
    close_means(c.sigma, ref_sigma)
    assert A.BLUR_SIGMA[0] <= float(c.sigma.min()) and float(c.sigma.max()) <= A.BLUR_SIGMA[1]


# --------------------------------------------------------------------------- same parameters, same image
def test_resized_crop_matches_torchvision(images: torch.Tensor) -> None:
    n = len(images)
    boxes = A.sample_crop_boxes(n, 32, 32, torch.Generator().manual_seed(3))
    flip = torch.arange(n) % 2 == 0
    ours = ops.resized_crop(images, boxes, flip, 32)
    to_pil_kernel = []
    for i in range(n):
        top, left, h, w = (int(v) for v in boxes[i])
        def crop(aa: bool, i: int = i, top: int = top, left: int = left, h: int = h, w: int = w) -> torch.Tensor:
            return TF.resized_crop(images[i], top, left, h, w, [32, 32], T.InterpolationMode.BICUBIC,
                                   antialias=aa).clamp(0, 1)

        # Same filter (bicubic a=-0.75): equal away from the crop's edge, where torchvision replicates the
        # crop's border pixels while one grid_sample over the whole image reads the real neighbours.
        same = crop(False)
        same = TF.hflip(same) if flip[i] else same
        margin = max(1, math.ceil(2 * 32 / min(h, w)))
        inner = (ours[i] - same)[:, margin:-margin, margin:-margin]
        if inner.numel():
            assert float(inner.abs().max()) < 1e-4, (i, h, w)
        # The PIL reference's filter (a=-0.5, torchvision's antialias path): within interpolation tolerance.
        pil_like = crop(True)
        to_pil_kernel.append((ours[i] - (TF.hflip(pil_like) if flip[i] else pil_like)).abs())
    errors = torch.stack(to_pil_kernel)
    assert float(errors.mean()) < 0.01 and float(errors.quantile(0.99)) < 0.08
    # The full box without flip is the identity.
    full = ops.resized_crop(images, torch.tensor([[0, 0, 32, 32]] * n), torch.zeros(n, dtype=torch.bool), 32)
    torch.testing.assert_close(full, images, rtol=0, atol=1e-5)


def test_each_colour_op_matches_torchvision(images: torch.Tensor) -> None:
    n = len(images)
    factor = torch.linspace(0.6, 1.4, n)
    hue = torch.linspace(-0.1, 0.1, n)
    for ours, ref_op, values, atol in (
        (ops.adjust_brightness, TF.adjust_brightness, factor, 1e-6),
        (ops.adjust_contrast, TF.adjust_contrast, factor, 2e-3),  # luma 0.299 vs torchvision's 0.2989
        (ops.adjust_saturation, TF.adjust_saturation, factor, 2e-3),
        (ops.adjust_hue, TF.adjust_hue, hue, 1e-4),
    ):
        got = ours(images, values)
        want = torch.stack([ref_op(images[i], float(values[i])) for i in range(n)])
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=ours.__name__)


def test_color_jitter_applies_ops_in_each_samples_order(images: torch.Tensor) -> None:
    params = A.sample_jitter(len(images), torch.Generator().manual_seed(4))
    got = ops.color_jitter(images, params)
    reference = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(len(images)):
        want = images[i]
        if params.apply[i]:
            values = (params.brightness[i], params.contrast[i], params.saturation[i], params.hue[i])
            for op in params.order[i].tolist():
                want = reference[op](want, float(values[op]))
        torch.testing.assert_close(got[i], want, rtol=0, atol=3e-3)


def test_grayscale_blur_and_solarize_match_torchvision(images: torch.Tensor) -> None:
    n = len(images)
    on = torch.arange(n) % 3 != 0
    gray = ops.grayscale(images, on)
    for i in range(n):
        want = TF.rgb_to_grayscale(images[i], 3) if on[i] else images[i]
        torch.testing.assert_close(gray[i], want, rtol=0, atol=2e-3)

    sigma = torch.linspace(*A.BLUR_SIGMA, n)
    k = A.blur_kernel_size(32)
    blurred = ops.gaussian_blur(images, sigma, on, k)
    for i in range(n):
        want = TF.gaussian_blur(images[i], [k, k], [float(sigma[i])] * 2) if on[i] else images[i]
        torch.testing.assert_close(blurred[i], want, rtol=0, atol=1e-5)
    assert A.blur_kernel_size(224) == 23 and A.blur_kernel_size(32) == 3

    solar = ops.solarize(images, on)
    for i in range(n):
        want = TF.solarize(images[i], 128 / 255) if on[i] else images[i]
        torch.testing.assert_close(solar[i], want, rtol=0, atol=0)


# --------------------------------------------------------------------------- whole pipelines
def test_batched_views_look_like_the_reference_views(images: torch.Tensor) -> None:
    """Same shapes and, over many draws, the same per-channel statistics as the PIL reference."""
    from PIL import Image

    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    uint8 = (images * 255).round().to(torch.uint8).repeat(4, 1, 1, 1)
    v1, v2 = A.BatchViews(A.view_specs(32), mean, std)(uint8, torch.Generator().manual_seed(5))
    reference = A.PilTwoView(32, mean, std)
    pil = [reference(Image.fromarray(x.permute(1, 2, 0).numpy()), 5 + i) for i, x in enumerate(uint8)]
    r1, r2 = torch.stack([p[0] for p in pil]), torch.stack([p[1] for p in pil])
    assert v1.shape == r1.shape == (len(uint8), 3, 32, 32) and v1.dtype == r1.dtype == torch.float32
    for ours, ref in ((v1, r1), (v2, r2)):
        torch.testing.assert_close(ours.mean((0, 2, 3)), ref.mean((0, 2, 3)), rtol=0, atol=0.15)
        torch.testing.assert_close(ours.std((0, 2, 3)), ref.std((0, 2, 3)), rtol=0.15, atol=0)


def test_worker_crops_match_the_reference_crop_for_the_same_draws(images: torch.Tensor) -> None:
    """`Crops` (the streaming workers' stage) cuts torchvision's RandomResizedCrop + flip of the same boxes."""
    from PIL import Image

    for i, x in enumerate((images[:8] * 255).round().to(torch.uint8)):
        pil = Image.fromarray(x.permute(1, 2, 0).numpy())
        crops = A.Crops(A.view_specs(24))(pil, i)
        g = torch.Generator().manual_seed(i)  # the same draws, in the same order
        boxes, flips = A.sample_crop_boxes(2, 32, 32, g).int().tolist(), (torch.rand(2, generator=g) < 0.5).tolist()
        for crop, (top, left, h, w), flip in zip(crops, boxes, flips):
            want = TF.resized_crop(pil, top, left, h, w, [24, 24], T.InterpolationMode.BICUBIC)
            want = torch.from_numpy(np.array(TF.hflip(want) if flip else want)).permute(2, 0, 1)
            assert crop.dtype == torch.uint8 and crop.shape == (3, 24, 24)
            # Rounding in another order: under a grey level on average, a few at most where downscaling; a wrong
            # box or flip is off by tens of grey levels on average.
            diff = (crop.double() - want.double()).abs()
            assert float(diff.max()) <= 8 and float(diff.mean()) < 0.5, (i, top, left, h, w)


def test_streamed_views_look_like_the_reference_views(images: torch.Tensor) -> None:
    """Worker crops + the batched colour stage: the reference's shapes and per-channel statistics."""
    from PIL import Image

    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    uint8 = (images * 255).round().to(torch.uint8).repeat(4, 1, 1, 1)
    pils = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in uint8]
    crops = [A.Crops(A.view_specs(32))(p, 7 + i) for i, p in enumerate(pils)]
    v1, v2 = A.BatchViews(A.view_specs(32), mean, std).colour_views(
        [torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])], torch.Generator().manual_seed(7))
    reference = A.PilTwoView(32, mean, std)
    pil = [reference(p, 7 + i) for i, p in enumerate(pils)]
    r1, r2 = torch.stack([p[0] for p in pil]), torch.stack([p[1] for p in pil])
    assert v1.shape == r1.shape == (len(pils), 3, 32, 32) and v1.dtype == r1.dtype == torch.float32
    for ours, ref in ((v1, r1), (v2, r2)):
        torch.testing.assert_close(ours.mean((0, 2, 3)), ref.mean((0, 2, 3)), rtol=0, atol=0.15)
        torch.testing.assert_close(ours.std((0, 2, 3)), ref.std((0, 2, 3)), rtol=0.15, atol=0)


def test_shards_of_a_global_batch_get_the_single_process_views(images: torch.Tensor) -> None:
    """Rank r of 2 (every other image) sees exactly rows r::2 of the one-process views."""
    uint8 = (images * 255).round().to(torch.uint8)
    augment = A.BatchViews(A.view_specs(32, local_views=2), (0.5,) * 3, (0.25,) * 3)
    whole = augment(uint8, torch.Generator().manual_seed(6))
    for rank in range(2):
        shard = augment(uint8[rank::2], torch.Generator().manual_seed(6), rank=rank, world=2)
        for view in range(4):
            torch.testing.assert_close(shard[view], whole[view][rank::2], rtol=0, atol=1e-5)
    # The colour stage alone (streamed crops) shards the same way.
    crops = [uint8, uint8.flip(3), uint8[..., :16, :16], uint8[..., 16:, 16:]]
    whole = augment.colour_views(crops, torch.Generator().manual_seed(6))
    for rank in range(2):
        shard = augment.colour_views([c[rank::2] for c in crops], torch.Generator().manual_seed(6),
                                     rank=rank, world=2)
        for view in range(2):
            torch.testing.assert_close(shard[view], whole[view][rank::2], rtol=0, atol=1e-5)


def test_multi_crop_views_have_their_sizes_scales_and_kinds(images: torch.Tensor) -> None:
    """Global views alternate the paper's two kinds; local crops are smaller, cut from DINO's area range, blurred
    with p 0.5 and never solarised; cached and streamed paths make the same shapes."""
    from PIL import Image

    specs = A.view_specs(32, global_views=3, local_views=2, local_size=16)
    assert [(s.size, s.blur_p, s.solarize_p) for s in specs] == [
        (32, 1.0, 0.0), (32, 0.1, 0.2), (32, 1.0, 0.0), (16, A.LOCAL_BLUR_P, 0.0), (16, A.LOCAL_BLUR_P, 0.0)]
    assert specs[0].scale == A.CROP_SCALE and specs[-1].scale == A.LOCAL_SCALE
    boxes = A.sample_crop_boxes(N, 32, 32, torch.Generator().manual_seed(8), scale_range=A.LOCAL_SCALE)
    area = boxes[:, 2] * boxes[:, 3] / 32**2
    assert float(area.max()) <= A.LOCAL_SCALE[1] * 1.2 and float(area.mean()) < 0.25  # rounding to whole pixels
    uint8 = (images * 255).round().to(torch.uint8)
    views = A.BatchViews(specs, (0.5,) * 3, (0.25,) * 3)(uint8, torch.Generator().manual_seed(9))
    assert [tuple(v.shape) for v in views] == [(len(uint8), 3, 32, 32)] * 3 + [(len(uint8), 3, 16, 16)] * 2
    crops = A.Crops(specs)(Image.fromarray(uint8[0].permute(1, 2, 0).numpy()), 0)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 3 + [(3, 16, 16)] * 2
    assert all(c.dtype == torch.uint8 for c in crops)
