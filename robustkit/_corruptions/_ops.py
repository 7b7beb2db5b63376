"""Batched image operations the corruptions share, written to match the library calls of
Hendrycks & Dietterich's ``make_cifar_c.py`` (scipy / scikit-image / OpenCV / PIL / ImageMagick)
on ``(B, C, H, W)`` float tensors, on the images' device.

Border rules (named as scipy names them):

- ``nearest``: edge pixel repeated (``aaa|abcd|ddd``; skimage ``gaussian``'s default, ImageMagick's
  virtual pixels);
- ``reflect``: half-sample symmetric (``cba|abcd|dcb``; scipy ``mode='reflect'``);
- ``mirror``: whole-sample symmetric (``dcb|abcd|cba``; OpenCV's default ``BORDER_REFLECT_101``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def border_index(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer positions ``i`` (any range) into ``[0, n)`` by the border rule ``mode``."""
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "reflect":
        j = torch.remainder(i, 2 * n)
        return torch.where(j >= n, 2 * n - 1 - j, j)
    if mode == "mirror":
        j = torch.remainder(i, 2 * n - 2)
        return torch.where(j >= n, 2 * n - 2 - j, j)
    raise ValueError(f"unknown border mode {mode!r}")


def pad(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """``(..., H, W)`` -> ``(..., H + 2 ph, W + 2 pw)``; any pad width (repeats the rule if wider)."""
    h, w = x.shape[-2:]
    rows = border_index(torch.arange(-ph, h + ph, device=x.device), h, mode)
    cols = border_index(torch.arange(-pw, w + pw, device=x.device), w, mode)
    return x.index_select(-2, rows).index_select(-1, cols)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device: torch.device | None = None) -> torch.Tensor:
    """scipy's ``gaussian_filter1d`` weights: radius ``int(truncate * sigma + 0.5)``, normalized;
    ``[1]`` for ``sigma <= 1e-15`` (scipy skips the axis)."""
    if sigma <= 1e-15:
        return torch.ones(1, device=device)
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def correlate2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Each channel of ``x (B, C, H, W)`` correlated with ``kernel (kh, kw)`` (odd sizes, centred),
    borders by ``mode``; OpenCV ``filter2D`` / scipy ``correlate``."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    xp = pad(x.reshape(b * c, 1, h, w), kh // 2, kw // 2, mode)
    return F.conv2d(xp, kernel.to(x)[None, None]).reshape(b, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage ``filters.gaussian`` per channel (spatial axes only): separable, scipy's kernel."""
    k = gaussian_kernel1d(sigma, truncate, x.device)
    if k.numel() == 1:
        return x.clone()
    return correlate2d(correlate2d(x, k[:, None], mode), k[None, :], mode)


def sample_bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """``x (B, C, H, W)`` at fractional pixel coordinates ``rows, cols (B, H', W')`` (pixel centres
    at integers), bilinear, neighbours outside the image by ``mode`` -> ``(B, C, H', W')``
    (scipy ``map_coordinates(order=1)``, OpenCV ``warpAffine(INTER_LINEAR)``)."""
    b, c, h, w = x.shape
    r0, c0 = torch.floor(rows), torch.floor(cols)
    fr, fc = (rows - r0)[:, None], (cols - c0)[:, None]                  # (B, 1, H', W')
    r0, c0 = r0.long(), c0.long()
    flat = x.reshape(b, c, h * w)

    def at(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        idx = border_index(r, h, mode) * w + border_index(q, w, mode)     # (B, H', W')
        return flat.gather(2, idx.reshape(b, 1, -1).expand(b, c, -1)).reshape(b, c, *rows.shape[1:])

    top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
    bottom = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
    return top * (1 - fr) + bottom * fr


def zoom_linear(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """scipy ``ndimage.zoom(order=1)`` of the spatial axes: output ``round(n * zoom)`` pixels per
    axis, corner pixels aligned (its default ``grid_mode=False`` = ``align_corners=True``)."""
    h, w = x.shape[-2:]
    size = (max(1, round(h * zoom)), max(1, round(w * zoom)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """make_cifar_c's ``clipped_zoom``: the centre ``ceil(n / zoom)`` crop zoomed by ``zoom`` and
    trimmed back to the centre ``n`` pixels (per axis)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    z = zoom_linear(x[..., top:top + ch, left:left + cw], zoom)
    th, tw = (z.shape[-2] - h) // 2, (z.shape[-1] - w) // 2
    return z[..., th:th + h, tw:tw + w]


def motion_blur(x: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """ImageMagick ``MotionBlurImage`` (what make_cifar_c calls through Wand): a one-sided Gaussian
    kernel of width ``2 ceil(radius) + 1`` (weights ``exp(-i^2 / 2 sigma^2)``, normalized) along
    the direction ``angle_deg (B,)``, each tap offset ``ceil(i * dir - 0.5)`` pixels, virtual
    pixels = the nearest edge. ``x (B, C, H, W)``."""
    b, c, h, w = x.shape
    width = int(2 * math.ceil(radius) + 1)
    i = torch.arange(width, dtype=torch.float64)
    kernel = torch.exp(-(i * i) / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).tolist()
    a = torch.deg2rad(angle_deg.double().cpu())                                   # (B,)
    # point = width * (sin a, cos a); offset_i = ceil(i * point / |point| - 0.5)
    off_x = torch.ceil(i[None] * torch.cos(a)[:, None] - 0.5).long().to(x.device)   # (B, width) columns
    off_y = torch.ceil(i[None] * torch.sin(a)[:, None] - 0.5).long().to(x.device)   # (B, width) rows
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    out = torch.zeros_like(x)
    for t, k in enumerate(kernel):
        r = (rows[None] + off_y[:, t:t + 1]).clamp(0, h - 1)                       # (B, H)
        q = (cols[None] + off_x[:, t:t + 1]).clamp(0, w - 1)                       # (B, W)
        out += k * x[bi, ci, r[:, None, :, None], q[:, None, None, :]]
    return out


def box_resize_matrix(n_in: int, n_out: int, device: torch.device | None = None) -> torch.Tensor:
    """PIL's ``Image.BOX`` resampling along one axis as an ``(n_out, n_in)`` matrix (its
    ``precompute_coeffs``: support ``0.5 * max(n_in / n_out, 1)`` around each output centre,
    weight 1 for inputs whose centre falls in it, rows normalized)."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for i in range(lo, hi):
            u = (i - center + 0.5) / fscale
            if -0.5 <= u < 0.5:
                m[o, i] = 1.0
        m[o] /= m[o].sum()
    return m.float().to(device)


def box_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL ``resize(size, Image.BOX)`` of ``x (B, C, H, W)`` to ``size = (H', W')``."""
    h, w = x.shape[-2:]
    mh, mw = box_resize_matrix(h, size[0], x.device), box_resize_matrix(w, size[1], x.device)
    return torch.einsum("oh,bchw,pw->bcop", mh, x, mw)


def luma(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB -> ``(B, 1, H, W)`` gray, ITU-R 601 (OpenCV ``COLOR_RGB2GRAY``); a
    one-channel image is its own gray."""
    if x.shape[1] == 1:
        return x
    wts = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return torch.einsum("bchw,c->bhw", x, wts)[:, None]
