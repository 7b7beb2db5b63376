"""Per-image random draws: one CPU ``torch.Generator`` per image, draws stacked into a batch, so
an image's corruption depends only on its own seed (not on the batch it is in)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Gens = Sequence[torch.Generator]


def generators(seeds: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per image from ``seeds (B,)`` int64 (>= 0)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]


def per_image(gens: Gens, draw: Callable[[torch.Generator], torch.Tensor], device: torch.device) -> torch.Tensor:
    """``draw(g)`` for each image's generator, stacked: ``(B, ...)`` on ``device``."""
    return torch.stack([draw(g) for g in gens]).to(device)


def uniform(gens: Gens, shape: tuple[int, ...], lo: float, hi: float, device: torch.device) -> torch.Tensor:
    """``(B, *shape)`` uniform on ``[lo, hi)``."""
    return lo + (hi - lo) * per_image(gens, lambda g: torch.rand(shape, generator=g), device)


def normal(gens: Gens, shape: tuple[int, ...], loc: float, scale: float, device: torch.device) -> torch.Tensor:
    """``(B, *shape)`` normal with mean ``loc`` and standard deviation ``scale``."""
    return loc + scale * per_image(gens, lambda g: torch.randn(shape, generator=g), device)


def randint(gens: Gens, lo: int, hi: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """``(B, *shape)`` int64 on CPU, uniform on ``[lo, hi)`` (numpy's ``randint`` bounds)."""
    return torch.stack([torch.randint(lo, hi, shape, generator=g) for g in gens])
