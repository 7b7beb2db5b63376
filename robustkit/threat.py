"""ThreatModel: the geometry of an L-inf or L2 ball in pixel space.

Every attack and every adversarial-training objective uses this one class for
random starts, steepest-ascent steps and projections; nobody re-derives them.
Images are ``(B, C, H, W)`` floats in ``[0, 1]`` (the pixel-space contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from robustkit.errors import InputError

NORMS = ("linf", "l2")
# spellings users write -> canonical name; "l1" is known (AutoAttack, dual norms) but not a ball here
_NORM_ALIASES = {"linf": "linf", "inf": "linf", "l∞": "linf", "li": "linf", "l2": "l2", "2": "l2",
                 "l1": "l1", "1": "l1"}
_DUAL = {"linf": "l1", "l1": "linf", "l2": "l2"}


def parse_norm(value: str, allowed: tuple[str, ...] = NORMS) -> str:
    """The canonical norm name (``"linf"``, ``"l2"``, ``"l1"``) of ``value`` (``"Linf"``,
    ``"L-inf"``, ``"inf"``, ``"L2"``, ...); ``InputError`` unless it is one of ``allowed``."""
    key = str(value).strip().lower().replace("-", "").replace("_", "")
    norm = _NORM_ALIASES.get(key)
    if norm not in allowed:
        raise InputError(f"unknown norm {value!r}; allowed: {', '.join(allowed)}")
    return norm


def dual_norm(norm: str) -> str:
    """The dual of an Lp norm (1/p + 1/q = 1): linf <-> l1, l2 <-> l2."""
    return _DUAL[parse_norm(norm, tuple(_DUAL))]


def lp_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ``norm`` (``linf``, ``l2`` or ``l1``) of ``v (B, ...)``: ``(B,)``."""
    flat = v.flatten(1)
    n = parse_norm(norm, tuple(_DUAL))
    if n == "linf":
        return flat.abs().amax(dim=1)
    return flat.norm(dim=1) if n == "l2" else flat.abs().sum(dim=1)


def parse_eps(value: float | int | str) -> float:
    """Parse an epsilon: a number or a string such as ``"8/255"``, ``"0.3"``.

    Raises ``InputError`` (a ``ValueError``) for anything else, for NaN/inf and for negative values.
    """
    if isinstance(value, bool):
        raise InputError(f"eps must be a number or a fraction string like '8/255', got {value!r}")
    if isinstance(value, (int, float)):
        eps = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            eps = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"eps must be a number or a fraction string like '8/255', got {value!r}") from None
    else:
        raise InputError(f"eps must be a number or a fraction string like '8/255', got {value!r}")
    if eps != eps or eps in (float("inf"), float("-inf")):
        raise InputError(f"eps must be finite, got {value!r}")
    if eps < 0:
        raise InputError(f"eps must be >= 0, got {value!r}")
    return eps


def _bnorm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast over ``(B, C, H, W)``: ``(B, 1, 1, 1)``."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """An ``eps``-ball in the ``norm`` ("linf" or "l2") intersected with ``[0, 1]``.

    ``eps`` is a float or a per-sample tensor of shape ``(B,)`` (tensor eps is used
    by robustness curves and IBP radius search).
    """

    norm: str
    eps: float | torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", parse_norm(self.norm))
        if isinstance(self.eps, torch.Tensor):
            if self.eps.dim() > 1 or bool((self.eps < 0).any()) or not bool(torch.isfinite(self.eps).all()):
                raise InputError("tensor eps must be a finite, non-negative (B,) tensor")
        else:
            object.__setattr__(self, "eps", parse_eps(self.eps))

    # -- helpers -------------------------------------------------------------
    def _eps(self, like: torch.Tensor) -> torch.Tensor | float:
        """eps as a scalar or a ``(B, 1, 1, 1)`` tensor matching ``like``."""
        if isinstance(self.eps, torch.Tensor):
            return self.eps.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
        return self.eps

    def default_step_size(self, steps: int) -> float | torch.Tensor:
        """The common heuristic ``2.5 * eps / steps`` (Madry et al. 2018)."""
        return 2.5 * (self.eps if not isinstance(self.eps, torch.Tensor) else self.eps) / max(int(steps), 1)

    # -- the three geometric operations ---------------------------------------
    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniform point of the ball around ``x`` (L-inf: uniform box; L2: uniform
        in the ball), clipped to ``[0, 1]``. Returns a new tensor ``(B, C, H, W)``."""
        eps = self._eps(x)
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * eps
        else:
            g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            g = g / _bnorm(g).clamp_min(1e-12)
            d = x[0].numel()
            r = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
            delta = g * r.view(-1, *([1] * (x.dim() - 1))) * eps
        return (x + delta).clamp_(0.0, 1.0)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float | torch.Tensor) -> torch.Tensor:
        """One steepest-ascent step (not yet projected): L-inf ``sign(g)``,
        L2 ``g / ||g||_2``. ``step_size`` is a float or a ``(B,)`` tensor."""
        if isinstance(step_size, torch.Tensor):
            step_size = step_size.to(x_adv.device, x_adv.dtype).view(-1, *([1] * (x_adv.dim() - 1)))
        if self.norm == "linf":
            return x_adv + step_size * grad.sign()
        return x_adv + step_size * grad / _bnorm(grad).clamp_min(1e-12)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project ``x_adv`` onto the ball around ``x``, then onto ``[0, 1]``.

        For L-inf, clipping to the box and then to ``[0, 1]`` is the exact
        projection onto the intersection. For L2 the result stays inside both sets
        (the box clip only shrinks the perturbation). Returns a new tensor.
        """
        eps = self._eps(x)
        delta = x_adv - x
        if self.norm == "linf":
            if isinstance(eps, torch.Tensor):
                delta = torch.maximum(torch.minimum(delta, eps), -eps)
            else:
                delta = delta.clamp(-eps, eps)
        else:
            n = _bnorm(delta)
            delta = delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    @property
    def dual(self) -> str:
        """The dual norm (``l1`` for L-inf, ``l2`` for L2): ``eps * ||w||_dual`` bounds ``w . delta``."""
        return dual_norm(self.norm)

    def norm_of(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample size of ``delta`` in this threat model's norm: ``(B,)``."""
        return lp_norm(delta, self.norm)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """``(B,)`` bool: inside the ball (up to ``tol``) and inside ``[0, 1]``."""
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else self.eps.to(x.device)
        in_ball = self.norm_of(x_adv - x) <= eps + tol
        in_box = (x_adv.flatten(1).amin(1) >= -tol) & (x_adv.flatten(1).amax(1) <= 1 + tol)
        return in_ball & in_box
