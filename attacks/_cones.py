"""Direction-constrained PGD for adversarial sparsity (``attacks.sparsity``): the per-image
directions, the two constraint sets and the step rule that runs them on the shared loop.

Every *row* is one (image, direction) pair. The constraint of a row is

- L2: the cone of half-angle ``theta`` around a unit axis ``u``, intersected with the sphere of
  radius ``eps`` (the official code rescales every iterate to norm ``eps`` exactly);
- L-inf: the vertex ``eps * s`` of the ball (``s`` a random sign vector) on every coordinate but
  the first ``k`` of a random permutation, which move freely in ``[-eps, eps]``.

Both then meet ``[0, 1]`` (the box clip comes last, as in the official code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from robustkit.threat import ThreatModel

Rows = dict[str, torch.Tensor]


def image_seed(seed: int, index: int) -> int:
    """The seed of one image's directions: a fixed hash of ``(seed, image index)``, so the
    directions do not depend on batching."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 12_345) % (2**63 - 1)


def directions(norm: str, shape: tuple[int, ...], n: int, seed: int,
               index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` random directions for one image of ``shape (C, H, W)`` (CPU, float32).

    L2: unit axes uniform on the sphere ``(n, C, H, W)`` and ``None``. L-inf: sign vectors
    ``(n, C, H, W)`` in ``{-1, 1}`` and permutations of the ``C*H*W`` coordinates ``(n, d)``
    (the order in which coordinates are freed)."""
    g = torch.Generator().manual_seed(image_seed(seed, index))
    if norm == "l2":
        u = torch.randn((n, *shape), generator=g)
        return u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(shape))), None
    d = math.prod(shape)
    s = torch.randint(0, 2, (n, *shape), generator=g).float() * 2 - 1
    perm = torch.rand((n, d), generator=g).argsort(dim=1)
    return s, perm


def free_mask(perm: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(R, d)`` bool: the first ``k[r]`` coordinates of permutation ``perm[r]`` are free."""
    rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm))
    return rank < k.view(-1, 1)


def cone_project(delta: torch.Tensor, axis: torch.Tensor, theta: torch.Tensor, radius: float) -> torch.Tensor:
    """The point of norm ``radius`` in the cone of half-angle ``theta (R,)`` around the unit
    ``axis (R, ...)`` closest in angle to ``delta (R, ...)``: ``delta`` rescaled if inside,
    else ``radius * (cos(theta) u + sin(theta) p)`` with ``p`` the unit part of ``delta``
    orthogonal to ``u`` (the exact projection; the official code's moves only part-way)."""
    d, u = delta.flatten(1), axis.flatten(1)                                 # (R, D)
    n = d.norm(dim=1, keepdim=True)                                          # (R, 1)
    a = (d * u).sum(1, keepdim=True)                                         # (R, 1) component along u
    perp = d - a * u
    pn = perp.norm(dim=1, keepdim=True)
    cos_t, sin_t = torch.cos(theta).view(-1, 1), torch.sin(theta).view(-1, 1)
    inside = a >= n * cos_t
    edge = cos_t * u + sin_t * perp / pn.clamp_min(1e-12)
    out = torch.where(inside, d / n.clamp_min(1e-12), torch.where(pn > 1e-12, edge, u))
    out = torch.where(n > 1e-12, out, u)                                     # no direction yet: the axis
    return (radius * out).view_as(delta)


@dataclass(frozen=True)
class DirectedStart(ThreatModel):
    """The threat model of a batch of rows whose "random" start is fixed: ``x0 + start`` in the
    box (the official code starts every row at ``eps * u`` / ``eps * s``)."""

    start: torch.Tensor | None = None                                         # (R, C, H, W)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.start is None or self.start.shape != x.shape:
            held = None if self.start is None else tuple(self.start.shape)
            raise RuntimeError(f"DirectedStart holds starts for {held}, the loop asked for {tuple(x.shape)} "
                               "(one copy per row expected)")
        return (x + self.start).clamp(0.0, 1.0)


@dataclass
class ConeStep:
    """One PGD step inside each row's constraint (``attacks._loop.StepRule``): the steepest-ascent
    step of the norm (L2: ``g / ||g||``, L-inf: ``sign(g)``), the box clip, then the projection
    onto the row's constraint and the box again. Per-row tensors are indexed by ``rows["own"]``
    (row ids of this batch), so compaction leaves them as they are."""

    norm: str
    eps: float
    eta: float
    axis: torch.Tensor                 # (R, C, H, W): L2 unit axes / L-inf sign vectors
    theta: torch.Tensor | None = None  # (R,) L2 half-angles
    free: torch.Tensor | None = None   # (R, d) L-inf free coordinates
    uses_loss = False

    def step(self, t: int, rows: Rows, tm: ThreatModel) -> torch.Tensor:
        own, x, x0 = rows["own"], rows["x"], rows["x0"]
        if self.norm == "l2":
            xs = x + self.eta * rows["g"] / rows["g"].flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = cone_project(xs.clamp(0.0, 1.0) - x0, self.axis[own], self.theta[own], self.eps)
        else:
            xs = (x + self.eta * rows["g"].sign()).clamp(0.0, 1.0)
            free = self.free[own].view_as(x)
            delta = torch.where(free, (xs - x0).clamp(-self.eps, self.eps), self.eps * self.axis[own])
        return (x0 + delta).clamp(0.0, 1.0)
