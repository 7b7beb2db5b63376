"""Noise corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019; ``make_cifar_c.py``).

Severity tables are CIFAR-C's (the ImageNet-C ones, which PyPI ``imagecorruptions`` ships, are
about twice as strong and meant for 224-px images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from robustkit._corruptions import _rng
from robustkit._corruptions._base import CORRUPTIONS, level

GAUSSIAN = (0.04, 0.06, 0.08, 0.09, 0.10)        # noise std, pixel space
SHOT = (500, 250, 100, 75, 50)                   # photons per unit intensity (Poisson rate scale)
IMPULSE = (0.01, 0.02, 0.03, 0.05, 0.07)         # fraction of values set to 0 or 1


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Additive Gaussian noise, ``clip(x + N(0, c^2))``."""
    c = level(GAUSSIAN, severity)
    return (x + _rng.normal(gens, tuple(x.shape[1:]), 0.0, c, x.device).to(x.dtype)).clamp(0, 1)


@CORRUPTIONS.register("shot_noise")
def shot_noise(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Poisson (shot) noise, ``clip(Poisson(c x) / c)``."""
    c = level(SHOT, severity)
    rate = (x.detach().float().cpu() * c).clamp_min(0)                      # (B, C, H, W)
    k = torch.stack([torch.poisson(r, generator=g) for r, g in zip(rate, gens)])
    return (k / c).to(x).clamp(0, 1)


@CORRUPTIONS.register("impulse_noise")
def impulse_noise(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Salt-and-pepper noise (skimage ``random_noise(mode='s&p', amount=c)``): each value is
    replaced with probability ``c``, by 1 or 0 with equal odds."""
    c = level(IMPULSE, severity)
    u = _rng.uniform(gens, (2, *x.shape[1:]), 0.0, 1.0, x.device)           # (B, 2, C, H, W)
    flipped, salt = u[:, 0] < c, u[:, 1] < 0.5
    out = x.clone()
    out[flipped & salt] = 1.0
    out[flipped & ~salt] = 0.0
    return out
