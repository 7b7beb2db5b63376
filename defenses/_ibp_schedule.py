"""Warm-up / ramp-up schedules of IBP and CROWN-IBP training, as functions of training progress.

Gowal et al. 2018 (MNIST, their released code): 60k steps, 2k warm-up steps on the nominal
loss only (eps = 0, kappa = 1), then 10k ramp-up steps in which eps grows linearly
0 -> eps_train and kappa falls linearly 1 -> kappa_final = 0.5; constant afterwards. As
fractions of training: warm-up 2/60 = 1/30, ramp-up 10/60 = 1/6 (the defaults below).
Zhang et al. 2020 (CROWN-IBP) additionally ramp beta, the weight of the CROWN-IBP bound,
1 -> 0 over the same ramp (their "CROWN-IBP 1 -> 0" setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from robustkit.errors import InputError
from robustkit.validate import number

WARMUP_FRACTION = 2_000 / 60_000
RAMP_FRACTION = 10_000 / 60_000


def ramp(progress: float, start: float, end: float, warmup: float, length: float) -> float:
    """``start`` until ``warmup``, then linear to ``end`` over ``length``, then ``end`` (progress in [0, 1])."""
    if progress <= warmup:
        return float(start)
    if length <= 0 or progress >= warmup + length:
        return float(end)
    t = (progress - warmup) / length
    return float(start + t * (end - start))


@dataclass(frozen=True)
class IBPSchedule:
    """eps, kappa and beta as functions of the fraction of training done."""

    eps_train: float
    kappa_final: float = 0.5
    warmup_fraction: float = WARMUP_FRACTION
    ramp_fraction: float = RAMP_FRACTION
    beta_start: float = 1.0
    beta_end: float = 0.0

    def __post_init__(self) -> None:
        number("eps_train", self.eps_train, 0.0)
        number("kappa_final", self.kappa_final, 0.0, 1.0)
        if self.warmup_fraction < 0 or self.ramp_fraction < 0 or self.warmup_fraction + self.ramp_fraction > 1:
            raise InputError("warmup_fraction and ramp_fraction must be >= 0 and sum to at most 1, got "
                             f"{self.warmup_fraction} and {self.ramp_fraction}")

    def eps(self, progress: float) -> float:
        """0 during warm-up, linear to ``eps_train`` over the ramp."""
        return ramp(progress, 0.0, self.eps_train, self.warmup_fraction, self.ramp_fraction)

    def kappa(self, progress: float) -> float:
        """Weight of the nominal cross-entropy: 1 during warm-up, linear to ``kappa_final``."""
        return ramp(progress, 1.0, self.kappa_final, self.warmup_fraction, self.ramp_fraction)

    def beta(self, progress: float) -> float:
        """Weight of the CROWN-IBP bound in the bound mix (CROWN-IBP only): ``beta_start -> beta_end``."""
        return ramp(progress, self.beta_start, self.beta_end, self.warmup_fraction, self.ramp_fraction)

    def in_warmup(self, progress: float) -> bool:
        return progress < self.warmup_fraction
