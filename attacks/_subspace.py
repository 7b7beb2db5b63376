"""Low-dimensional search spaces for the BO attack: latent ``z`` (N, d') -> perturbation (N, C, H, W).

- ``"fft"`` (the official ``bayes_attack`` code's map): per channel, the ``dim x dim``
  lowest spatial frequencies get a cosine (real) and a sine (imaginary) coefficient
  from ``z``; an orthonormal inverse real FFT gives the perturbation.
  ``d' = 2 * C * dim**2``.
- ``"upsample"``: a ``C x dim x dim`` tile, nearest-neighbour upsampled to ``H x W``.
  ``d' = C * dim**2``.

The map is linear; the caller projects ``x + delta`` onto the eps-ball and ``[0, 1]``
(``ThreatModel.project``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from robustkit.errors import InputError

SUBSPACES = ("fft", "upsample")


def check_subspace(kind: str, dim: int, shape: Sequence[int]) -> None:
    """Raise ``InputError`` unless ``kind``/``dim`` fit images of ``shape`` (C, H, W)."""
    if kind not in SUBSPACES:
        raise InputError(f"unknown subspace {kind!r}; allowed: {', '.join(SUBSPACES)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InputError(f"dim must be a positive integer, got {dim!r}")
    _, h, w = shape
    limit = min(h, w // 2 + 1) if kind == "fft" else min(h, w)
    if dim > limit:
        raise InputError(f"dim={dim} is too large for {kind!r} on {h}x{w} images (at most {limit})")


def latent_dim(kind: str, dim: int, channels: int) -> int:
    """d', the size of the latent vector."""
    return (2 if kind == "fft" else 1) * channels * dim * dim


def to_image(z: torch.Tensor, kind: str, dim: int, shape: Sequence[int]) -> torch.Tensor:
    """Map latent ``z`` (N, d') to a perturbation (N, C, H, W) (same dtype/device as ``z``)."""
    c, h, w = shape
    n = z.shape[0]
    if kind == "upsample":
        tile = z.reshape(n, c, dim, dim)                                        # (N, C, dim, dim)
        return F.interpolate(tile, size=(h, w), mode="nearest")                  # (N, C, H, W)
    coef = torch.view_as_complex(z.reshape(n, c, dim, dim, 2).contiguous())   # (N, C, dim, dim) cos + i sin
    spec = torch.zeros(n, c, h, w // 2 + 1, dtype=coef.dtype, device=z.device)  # (N, C, H, W//2+1)
    spec[:, :, :dim, :dim] = coef
    return torch.fft.irfftn(spec, s=(h, w), dim=(-2, -1), norm="ortho")       # (N, C, H, W)
