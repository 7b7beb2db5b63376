"""Catastrophic-overfitting detection for single-step adversarial training.

Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020
(https://arxiv.org/abs/2001.03994; code locuslab/fast_adversarial): FGSM training can
"catastrophically overfit": within an epoch or two the accuracy under PGD falls to ~0 while the
accuracy under the training FGSM attack *rises* (the model learns to mask the single-step
gradient). Their remedy is early stopping on the PGD accuracy of one training batch, checked each
epoch (``train_fgsm.py``: stop when it falls by more than 0.2 from the previous epoch, and keep the
previous epoch's weights; ``train_cifar.py``: by more than 0.5).

``OverfitDetector`` is that test on a stream of ``(pgd_accuracy, fgsm_accuracy)`` pairs, with two
changes: the drop is measured from the *best* PGD accuracy so far (a collapse spread over several
checks is caught too; Wong's "from the previous check" is the special case of a one-step collapse),
and by default it also requires the FGSM accuracy not to have fallen since that best check (the
signature of catastrophic overfitting: a plain divergence, where both fall, is not called one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from robustkit.validate import number


@dataclass
class OverfitDetector:
    """Flags catastrophic overfitting in a sequence of accuracy checks.

    ``update(pgd, fgsm)`` returns True at the first check where

        pgd < best_pgd - drop    and  (fgsm >= fgsm_at_best  if require_fgsm_rise)

    with ``best_pgd`` the highest PGD accuracy of the earlier checks and ``fgsm_at_best`` the
    FGSM accuracy of that check. Once detected it stays detected (``detected``, ``detected_at``).

    Args:
        drop: absolute fall of the PGD accuracy (a fraction in (0, 1]) from its best; 0.2 as in
            Wong et al.'s ``train_fgsm.py``.
        require_fgsm_rise: also require that the FGSM accuracy did not fall (default True).
    """

    drop: float = 0.2
    require_fgsm_rise: bool = True
    checks: int = 0                       # number of updates so far
    best_pgd: float = -math.inf
    fgsm_at_best: float = -math.inf
    best_check: int = -1                  # index of the check with the best PGD accuracy
    detected_at: int = -1                 # index of the check that detected it (-1: none)
    history: list[list[float]] = field(default_factory=list)  # [[pgd, fgsm], ...]

    def __post_init__(self) -> None:
        self.drop = number("co_drop (a fall of PGD accuracy, a fraction)", self.drop, 0.0, 1.0, strict_min=True)
        self.require_fgsm_rise = bool(self.require_fgsm_rise)

    @property
    def detected(self) -> bool:
        return self.detected_at >= 0

    def update(self, pgd: float, fgsm: float) -> bool:
        """Record one check (accuracies in [0, 1]); True once catastrophic overfitting is detected."""
        pgd, fgsm = float(pgd), float(fgsm)
        index, self.checks = self.checks, self.checks + 1
        self.history.append([pgd, fgsm])
        if self.detected:
            return True
        collapsed = pgd < self.best_pgd - self.drop
        if collapsed and (not self.require_fgsm_rise or fgsm >= self.fgsm_at_best):
            self.detected_at = index
            return True
        if pgd > self.best_pgd:
            self.best_pgd, self.fgsm_at_best, self.best_check = pgd, fgsm, index
        return False

    def message(self) -> str:
        """One line describing the detection (empty when nothing was detected)."""
        if not self.detected:
            return ""
        pgd, fgsm = self.history[self.detected_at]
        return (f"catastrophic overfitting: PGD accuracy on the probe batch fell from {self.best_pgd:.3f} "
                f"(check {self.best_check + 1}) to {pgd:.3f} (check {self.detected_at + 1}) while FGSM accuracy "
                f"went from {self.fgsm_at_best:.3f} to {fgsm:.3f}")

    # -- checkpoints (plain Python values: torch.load(weights_only=True) reads them) ------
    def state_dict(self) -> dict[str, Any]:
        return {"checks": self.checks, "best_pgd": self.best_pgd, "fgsm_at_best": self.fgsm_at_best,
                "best_check": self.best_check, "detected_at": self.detected_at,
                "history": [list(h) for h in self.history]}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.checks, self.best_check, self.detected_at = int(s["checks"]), int(s["best_check"]), int(s["detected_at"])
        self.best_pgd, self.fgsm_at_best = float(s["best_pgd"]), float(s["fgsm_at_best"])
        self.history = [[float(a), float(b)] for a, b in s["history"]]
