"""Rays of perturbations for the hard-label BO attack: latent direction -> image at scale ``t``.

A latent pattern ``p = map(z)`` (N, C, H, W) fixes a ray ``t -> x(t)`` of images, with ``t`` the
perturbation size in units of ``eps``; ``x(1)`` is the candidate inside the threat model:

- L-inf (the official code's projection): ``u = clamp(p, -eps, eps) / eps``, ``|u| <= 1``, and
  ``x(t) = clip(x + t * eps * u, 0, 1)``. ``x(1)`` is exactly ``clip(x + clamp(p, -eps, eps))``.
- L2: ``u = p / ||p||`` and ``x(t) = clip(x + s * u, 0, 1)`` with ``s`` solved (bisection, no
  model calls) so that ``||x(t) - x||_2 = t * eps``: the perturbation that reaches ``[0, 1]``
  uses the whole budget, rather than losing the clipped part as ``clip(x + eps * u)`` would.

``ray_distance`` measures, with label queries only, how far along the ray the label flips: the
graded objective of the attack (in the spirit of the boundary distance of Cheng et al., "Query-
Efficient Hard-label Black-box Attack: An Optimization-based Approach", ICLR 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Fooled = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (A,C,H,W), rows (A,)) -> (A,) bool


def direction(p: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Unit direction ``u`` (N, C, H, W) of pattern ``p`` (N, C, H, W); see the module docstring."""
    if norm == "linf":
        return p.clamp(-eps, eps) / eps
    return p / p.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def point(x: torch.Tensor, u: torch.Tensor, t: torch.Tensor | float, norm: str, eps: float,
          iters: int = 40) -> torch.Tensor:
    """The image at scale ``t`` (N,) (or a float) along direction ``u`` from ``x`` (N, C, H, W)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0]).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    if norm == "linf":
        return (x + t * eps * u).clamp(0.0, 1.0)
    target = t.flatten() * eps                                                  # (N,) wanted L2 norm
    lo = torch.zeros_like(target)
    hi = torch.full_like(target, 2.0 * math.prod(x.shape[1:]) ** 0.5)        # past it every pixel is clipped
    for _ in range(iters):                                                      # n(s) = ||clip(x+su)-x|| rises in s
        mid = (lo + hi) / 2
        n = ((x + mid.view(-1, 1, 1, 1) * u).clamp(0.0, 1.0) - x).flatten(1).norm(dim=1)
        lo, hi = torch.where(n <= target, mid, lo), torch.where(n <= target, hi, mid)
    return (x + lo.view(-1, 1, 1, 1) * u).clamp(0.0, 1.0)                       # lower bracket: norm <= t*eps


def ray_distance(fooled: Fooled, x: torch.Tensor, u: torch.Tensor, rows: torch.Tensor, t_best: torch.Tensor,
                 left: torch.Tensor, norm: str, eps: float, steps: int,
                 check_first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label-only distance along each ray, relative to the incumbent ``t_best`` (A,) > 1.

    Query order per image, each query only while the image has budget ``left`` (A,):
    1. ``x(t_best)``: not fooled means the ray is no better than the incumbent (one query), and,
       the label being taken as monotone along the ray, that ``x(1)`` is not adversarial either;
    2. else ``x(1)``: the success check inside the threat model;
    3. else ``steps`` log-scale bisection queries between ``1`` and ``t_best``.
    Rows with ``check_first`` (A,) bool ask ``x(1)`` before ``x(t_best)``: cheaper while most rays
    reach ``t_best`` (far incumbents, e.g. the initial design), and a success costs one query.
    Returns ``success`` (A,) bool, ``t_hi`` (A,) the smallest scale known to fool (``t_best`` if
    none is known; 1 on success), ``reached`` (A,) bool: the ray fools at ``t_best`` (else its
    distance is only known to exceed ``t_best``).
    """
    left = left.clone()
    none = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def ask(m: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:          # (A,) bool, False where not asked
        m = m & (left > 0)
        out = none.clone()
        if bool(m.any()):
            out[m] = fooled(point(x[m], u[m], t[m] if isinstance(t, torch.Tensor) else t, norm, eps), rows[m])
            left.sub_(m.long())
        return out

    first = none if check_first is None else check_first
    success = ask(first, 1.0)
    far = ask(~success, t_best)
    success |= ask(far & ~first, 1.0)
    reached = success | far
    lo, hi = torch.ones_like(t_best), t_best.clone()                            # (A,) scale brackets
    m = reached & ~success
    for _ in range(steps):
        m = m & (left > 0)
        if not bool(m.any()):
            break
        mid = (lo * hi).sqrt()                                                  # geometric midpoint
        f = ask(m, mid)
        hi, lo = torch.where(m & f, mid, hi), torch.where(m & ~f, mid, lo)
    hi[success] = 1.0
    return success, hi, reached
