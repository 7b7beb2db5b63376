"""Weather corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019; ``make_cifar_c.py``),
with CIFAR-C's severity tables.

Frost uses the reference's frost photographs (``robustkit/_data/frost.npz``: ``frost1..5`` of
hendrycks/robustness, Apache-2.0, already resized by 0.2 as make_cifar_c does; like the
reference we draw from the first five of its six). On one-channel images the RGB layers (frost
texture, snow's gray mix) are reduced to their ITU-R 601 luma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from robustkit._corruptions import _ops, _rng
from robustkit._corruptions._base import CORRUPTIONS, level

# loc, scale, zoom, threshold, motion radius, motion sigma, blend
SNOW = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))     # image weight, frost weight
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))           # fog strength, wibble decay


@CORRUPTIONS.register("snow")
def snow(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Snow: a thresholded, zoomed Gaussian layer streaked by motion blur (angle on ``[-135, -45)``),
    added twice (once rotated by 180 degrees) to the image brightened towards ``1.5 gray + 0.5``."""
    loc, scale, zoom, thr, radius, sigma, blend = level(SNOW, severity)
    b, c, h, w = x.shape
    layer = _rng.normal(gens, (1, h, w), loc, scale, x.device).to(x.dtype)       # (B, 1, H, W)
    layer = _ops.clipped_zoom(layer, zoom)
    layer = torch.where(layer < thr, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255                           # to an 8-bit PNG, as the reference
    angle = _rng.uniform(gens, (), -135.0, -45.0, torch.device("cpu"))
    layer = torch.round(_ops.motion_blur(layer, radius, sigma, angle) * 255) / 255   # ImageMagick's 8-bit output
    bright = torch.maximum(x, _ops.luma(x) * 1.5 + 0.5)
    y = blend * x + (1 - blend) * bright
    return (y + layer + torch.rot90(layer, 2, dims=(-2, -1))).clamp(0, 1)


@lru_cache(maxsize=1)
def _frost_images() -> tuple[torch.Tensor, ...]:
    """The five frost textures, ``(3, h, w)`` float in [0, 1] each (RGB)."""
    from importlib.resources import files

    with files("robustkit").joinpath("_data/frost.npz").open("rb") as f, np.load(f) as z:
        return tuple(torch.from_numpy(z[f"frost{i}"]).permute(2, 0, 1).float() / 255 for i in range(1, 6))


def _texture(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``img`` enlarged (bilinear) if it is not larger than ``h x w`` (images over 63 px; the
    reference handles 32 px only)."""
    s = max(1.0, (h + 1) / img.shape[1], (w + 1) / img.shape[2])
    if s == 1.0:
        return img
    size = (math.ceil(img.shape[1] * s), math.ceil(img.shape[2] * s))
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]


@CORRUPTIONS.register("frost")
def frost(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Frost: ``clip(a x + b F)`` with ``F`` a random crop of a random frost photograph."""
    a, wt = level(FROST, severity)
    b, c, h, w = x.shape
    textures = [_texture(t, h, w) for t in _frost_images()]
    crops = []
    for g in gens:
        t = textures[int(torch.randint(0, 5, (), generator=g))]
        top = int(torch.randint(0, t.shape[1] - h, (), generator=g))
        left = int(torch.randint(0, t.shape[2] - w, (), generator=g))
        crops.append(t[:, top:top + h, left:left + w])
    f = torch.stack(crops).to(x)                                                  # (B, 3, H, W)
    if c == 1:
        f = _ops.luma(f)
    return (a * x + wt * f).clamp(0, 1)


def plasma_fractal(gens: Sequence[torch.Generator], mapsize: int, decay: float, device: torch.device) -> torch.Tensor:
    """make_cifar_c's ``plasma_fractal`` (diamond-square height map), one per image:
    ``(B, mapsize, mapsize)`` in [0, 1]; ``mapsize`` a power of two."""
    b = len(gens)
    m = torch.zeros(b, mapsize, mapsize, dtype=torch.float64, device=device)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: torch.Tensor) -> torch.Tensor:        # a / 4 + wibble * U(-wibble, wibble), as written
        noise = _rng.uniform(gens, tuple(a.shape[1:]), -wibble, wibble, device).double()
        return a / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]                                          # fill squares
        acc = corners + torch.roll(corners, -1, dims=1)
        acc = acc + torch.roll(acc, -1, dims=2)
        m[:, half::step, half::step] = wibbled_mean(acc)
        dr, ul = m[:, half::step, half::step], m[:, 0::step, 0::step]            # fill diamonds
        lt = dr + torch.roll(dr, 1, dims=1) + ul + torch.roll(ul, -1, dims=2)
        m[:, 0::step, half::step] = wibbled_mean(lt)
        tt = dr + torch.roll(dr, 1, dims=2) + ul + torch.roll(ul, -1, dims=1)
        m[:, half::step, 0::step] = wibbled_mean(tt)
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return (m / m.amax(dim=(1, 2), keepdim=True)).float()


@CORRUPTIONS.register("fog")
def fog(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Fog: a plasma fractal of strength ``c`` added to every channel, rescaled by ``max / (max + c)``."""
    strength, decay = level(FOG, severity)
    b, c, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()                 # next power of two (32 for 28 and 32 px)
    plasma = plasma_fractal(gens, size, decay, x.device)[:, None, :h, :w].to(x.dtype)   # (B, 1, H, W)
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + strength * plasma) * top / (top + strength)).clamp(0, 1)
