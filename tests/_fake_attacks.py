"""Fake attacks for the evaluation-engine tests: they lie about success, or run per sample."""

from __future__ import annotations

import torch
from torch import nn

from attacks.base import Attack, AttackResult


class Liar(Attack):
    """Claims success on every point with an ``x_adv`` that must not count:

    - ``outside``: ``1 - x`` (the label may well flip, but it is far outside any small ball);
    - ``clean``: ``x`` itself (inside the ball, the label does not flip);
    - ``box``: ``x`` with one pixel pushed to ``-0.01`` (inside the ball, outside ``[0, 1]``).
    """

    name = "liar"

    def __init__(self, *, norm: str = "linf", eps: float = 0.1, how: str = "outside") -> None:
        self.norm, self.eps, self.how = norm, float(eps), how

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        if self.how == "outside":
            x_adv = 1.0 - x
        else:
            x_adv = x.clone()
            if self.how == "box":
                x_adv[:, 0, 0, 0] = -0.01
        b = x.shape[0]
        return AttackResult(x_adv, torch.ones(b, dtype=torch.bool, device=x.device),
                            torch.ones(b, dtype=torch.long, device=x.device))


class PerSample(Attack):
    """Runs ``inner`` on one point at a time, so each point's result cannot depend on which other
    points share its batch (what makes chained and independent modes comparable exactly)."""

    def __init__(self, inner: Attack, name: str) -> None:
        self.inner, self.name = inner, name
        self.norm, self.eps = inner.norm, inner.eps
        self.targeted = bool(getattr(inner, "targeted", False))

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        parts = [self.inner(model, x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]
        return AttackResult(torch.cat([p.x_adv for p in parts]), torch.cat([p.success for p in parts]),
                            torch.cat([p.queries for p in parts]))
