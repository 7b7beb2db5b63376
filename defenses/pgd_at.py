"""PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018 (https://arxiv.org/abs/1706.06083).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defenses._adversarial import AdversarialObjective, TargetsFn, accuracy_logs, reduce
from robustkit.registry import DEFENSES

# The released configs (MadryLab mnist_challenge / cifar10_challenge config.json).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 8 / 255, "steps": 7, "step_size": 2 / 255},
    "mnist": {"eps": 0.3, "steps": 40, "step_size": 0.01},
}


@DEFENSES.register("pgd-at", help="PGD adversarial training (Madry et al. 2018): CE on PGD examples")
class PGDAT(AdversarialObjective):
    """``min_theta E max_{||d|| <= eps} CE(f(x + d), y)`` with the inner max by PGD.

    Inner maximization: ``steps`` PGD steps of size ``step_size`` on the cross-entropy
    from a uniform random start in the ball (``ThreatModel``), in eval mode; the last
    iterate is used. Outer loss: mean cross-entropy on the adversarial batch.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (eps 8/255, 7 steps of 2/255, Madry's CIFAR config) or
            ``"mnist"`` (eps 0.3, 40 steps of 0.01); ``None`` needs explicit values.
        norm: ``"linf"`` or ``"l2"``. eps, steps, step_size: the inner PGD.
        random_start: uniform start in the ball (True, as in Madry et al.).
        label_smoothing / targets: soft labels for the CE (see ``AdversarialObjective``).
    """

    name = "pgd-at"
    PRESETS = PRESETS

    def __init__(self, *, preset: str | None = "cifar10", norm: str = "linf", eps: float | str | None = None,
                 steps: int | None = None, step_size: float | str | None = None, random_start: bool = True,
                 label_smoothing: float = 0.0, targets: TargetsFn | None = None) -> None:
        self._setup(preset, norm, eps, steps, step_size, label_smoothing, targets)
        self.random_start = bool(random_start)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD examples ``(B, C, H, W)`` (eval mode, last iterate)."""
        return self.ce_ascent(model, x, y, start="uniform" if self.random_start else "none")

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        logits_adv = model(x_adv)                                   # (B, K)
        per = self.ce(logits_adv, x, y)                             # (B,)
        loss = reduce(per, reduction)
        return loss, accuracy_logs(loss, None, logits_adv, y)
