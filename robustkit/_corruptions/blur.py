"""Blur corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019; ``make_cifar_c.py``), with
CIFAR-C's severity tables. Where the reference calls a library we follow that library's rule
(see ``_ops``); glass blur keeps the reference's uint8 rounding between its two blurs and its
sequential pixel swaps (exact, batched over images)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from robustkit._corruptions import _ops, _rng
from robustkit._corruptions._base import CORRUPTIONS, level

DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))          # disk radius, alias blur
GLASS = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, max delta, iterations
MOTION = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))                         # ImageMagick radius, sigma
# np.arange(1, top, 0.01) as in the reference (float rounding: 1.06 and 1.11 are included, 1.16 .. 1.26 not)
ZOOM = tuple(np.arange(1, top, 0.01).tolist() for top in (1.06, 1.11, 1.16, 1.21, 1.26))


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """make_cifar_c's ``disk``: the normalized aliased disk ``x^2 + y^2 <= r^2`` on a 17 x 17 grid
    (radius <= 8; else ``2r + 1``), smoothed by OpenCV's 3 x 3 (5 x 5 if r > 8) Gaussian
    (sigma ``alias_blur``, mirror borders)."""
    half, ks = (8, 3) if radius <= 8 else (int(radius), 5)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    d = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).double()
    d /= d.sum()
    g = torch.exp(-((torch.arange(ks, dtype=torch.float64) - ks // 2) ** 2) / (2 * alias_blur ** 2))
    g /= g.sum()
    return _ops.correlate2d(d[None, None].float(), (g[:, None] * g[None, :]).float(), "mirror")[0, 0]


@CORRUPTIONS.register("defocus_blur")
def defocus_blur(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Defocus: each channel convolved with an anti-aliased disk (OpenCV ``filter2D``, mirror borders)."""
    r, alias = level(DEFOCUS, severity)
    return _ops.correlate2d(x, disk_kernel(r, alias), "mirror").clamp(0, 1)


@CORRUPTIONS.register("glass_blur")
def glass_blur(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Frosted glass: Gaussian blur, rounded down to 8 bits, then for ``iterations`` passes every
    pixel ``(h, w)`` from the bottom-right corner up (``h, w = n - delta .. delta + 1``) takes the
    value of a random neighbour ``(h + dy, w + dx)``, ``dx, dy`` uniform on ``[-delta, delta)``;
    blurred again.

    The reference means to *swap* the two pixels (``x[h, w], x[h', w'] = x[h', w'], x[h, w]``),
    but on its RGB arrays ``x[h, w]`` is a numpy view, so the second assignment writes the
    neighbour's value back to itself: CIFAR-10-C's glass blur copies, it does not swap. We follow
    what the reference computes (so accuracies are comparable with CIFAR-10-C), for every channel
    count (a true swap would only have happened on 2-D gray arrays, which CIFAR-C never had)."""
    sigma, delta, iters = level(GLASS, severity)
    b, c, h, w = x.shape
    y = torch.floor(_ops.gaussian_blur(x, sigma) * 255).clamp(0, 255)         # np.uint8(... * 255)
    rows, cols = list(range(h - delta, delta, -1)), list(range(w - delta, delta, -1))
    d = _rng.randint(gens, -delta, delta, (iters, len(rows), len(cols), 2)).to(x.device)  # (B, it, R, W', 2)
    bi = torch.arange(b, device=x.device)
    for it in range(iters):
        for i, hh in enumerate(rows):
            for j, ww in enumerate(cols):
                hp, wp = hh + d[:, it, i, j, 1], ww + d[:, it, i, j, 0]       # (B,), (B,)
                y[:, :, hh, ww] = y[bi, :, hp, wp]                             # (B, C): see the docstring
    return _ops.gaussian_blur(y / 255, sigma).clamp(0, 1)


@CORRUPTIONS.register("motion_blur")
def motion_blur(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Motion: ImageMagick's motion blur (radius, sigma) at an angle uniform on ``[-45, 45)`` degrees."""
    radius, sigma = level(MOTION, severity)
    angle = _rng.uniform(gens, (), -45.0, 45.0, torch.device("cpu"))
    return _ops.motion_blur(x, radius, sigma, angle).clamp(0, 1)


@CORRUPTIONS.register("zoom_blur")
def zoom_blur(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Zoom: the mean of the image and its centre zooms by ``1, 1.01, ..`` (``clipped_zoom``)."""
    factors = level(ZOOM, severity)
    out = x.clone()
    for z in factors:
        out += _ops.clipped_zoom(x, z)
    return (out / (len(factors) + 1)).clamp(0, 1)
