"""Fake attacks for the evaluation-engine tests: they lie about success, or run per sample."""

from __future__ import annotations

import torch
from torch import nn

from attacks.base import Attack, AttackResult


class Liar(Attack):
    """Claims success on every point with an ``x_adv`` that must not count:

    - ``outside``: ``1 - x`` (the label may well flip, but it is far outside any small ball);
    - ``clean``: ``x`` itself (inside the ball, the label does not flip);
    - ``box``: a real PGD adversarial with one corner pixel set to ``-0.01`` (label flipped where
      PGD succeeded, inside the ball for MNIST's black corners, outside ``[0, 1]``).
    """

    name = "liar"

    def __init__(self, *, norm: str = "linf", eps: float = 0.1, how: str = "outside") -> None:
        self.norm, self.eps, self.how = norm, float(eps), how

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        if self.how == "outside":
            x_adv = 1.0 - x
        elif self.how == "box":
            from attacks.pgd import PGD

            x_adv = PGD(norm=self.norm, eps=self.eps - 0.011, steps=10, seed=0)(model, x, y).x_adv.clone()
            x_adv[:, 0, 0, 0] = -0.01
        else:
            x_adv = x.clone()
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


class WrongTarget(Attack):
    """Targeted in name only: moves away from the model's clean label (untargeted PGD, inside the
    ball) and claims every point, whichever class it lands on. Records the targets it was given."""

    name = "wrong-target"
    targeted = True

    def __init__(self, *, eps: float = 0.3) -> None:
        from attacks.pgd import PGD

        self.norm, self.eps, self.inner, self.seen = "linf", eps, PGD(eps=eps, steps=10, seed=0), []

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        self.seen.append(y.clone())
        with torch.no_grad():
            y0 = model(x).argmax(1)
        res = self.inner(model, x, y0)
        return AttackResult(res.x_adv, torch.ones_like(res.success), res.queries)
