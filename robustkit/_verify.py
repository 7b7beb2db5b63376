"""What the evaluation engine checks before it counts a claimed success (``robustkit.evaluate``):
the ball a claim must lie in, the containment test (``ThreatModel.contains``), and the seeded
per-image targets of targeted attacks."""

from __future__ import annotations

from typing import Any

import torch

from robustkit.errors import InputError
from robustkit.threat import NORMS, ThreatModel, lp_norm, parse_norm


def targets(y: torch.Tensor, index: torch.Tensor, num_classes: int, seed: int, salt: int = 0) -> torch.Tensor:
    """A wrong class per point ``(B,)``, a fixed integer hash of ``(seed, image index, salt)``: the
    same target for the same image however the data is batched, sharded or resumed."""
    if num_classes < 2:
        raise InputError(f"targeted attacks need >= 2 classes, the model has {num_classes}")
    h = (index.long() * 2654435761 + (int(seed) % 2**20) * 40503 + int(salt) * 9973) % 2**31
    h = ((h ^ (h >> 15)) * 73244475) % 2**31                                   # (B,) mixed, no overflow
    return (y + 1 + h.to(y.device) % (num_classes - 1)) % num_classes


def inside(norm: str | None, eps: float | None, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: ``x_adv`` in the ``eps``-ball around ``x`` and in ``[0, 1]``."""
    if eps is None or norm is None:       # a minimum-norm attack without a budget: only the box applies
        return ThreatModel("linf", 1.0).contains(x_adv, x)   # every [0, 1] point is within L-inf 1 of x
    norm = parse_norm(norm, (*NORMS, "l1"))
    if norm in NORMS:
        return ThreatModel(norm, eps).contains(x_adv, x)
    # L1 (AutoAttack only) is not a ThreatModel ball; the box test is still the ThreatModel's
    return ThreatModel("linf", 1.0).contains(x_adv, x) & (lp_norm(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-5)


def ball_of(atk: Any, threat: ThreatModel | None) -> tuple[str | None, float | None]:
    """The ball an attack's claims are checked against: ``threat`` if given, else the attack's own."""
    if threat is not None:
        return threat.norm, float(threat.eps)
    eps = getattr(atk, "eps", None)
    return getattr(atk, "norm", None), (None if eps is None else float(eps))
