"""Binomial statistics for randomized smoothing.

- ``clopper_pearson_lower`` / ``clopper_pearson_upper``: exact one-sided bounds
  (Clopper & Pearson 1934), as in Cohen et al. 2019 (``_lower_confidence_bound`` in
  locuslab/smoothing ``code/core.py`` is ``proportion_confint(nA, n, alpha=2*alpha,
  method="beta")[0]``, i.e. the ``alpha`` quantile of ``Beta(nA, n - nA + 1)``).
- ``binom_test``: two-sided binomial test p-value (``scipy.stats.binomtest``), used by
  Cohen et al.'s PREDICT to decide whether to abstain.
- ``CheckpointCS``: a confidence sequence for a binomial proportion that stays valid at
  any data-dependent stopping time among a fixed geometric schedule of checkpoints:
  Clopper--Pearson at each checkpoint with ``alpha`` split over the checkpoints (union
  bound). This is the simple, provably valid confidence sequence that Voracek 2024,
  "Treatment of Statistical Estimation Problems in Randomized Smoothing for Adversarial
  Robustness" (NeurIPS), recommends for sequential certification; geometric spacing
  is the "stitching" idea of Howard, Ramdas, McAuliffe & Sekhon 2021 ("Time-uniform,
  nonparametric, nonasymptotic confidence sequences", Ann. Statist.), in its crudest
  form. With ``K`` checkpoints the price over a fixed-``n`` bound is replacing
  ``alpha`` by ``alpha / K`` (``K ~ log(n_max / first) / log(growth)``), i.e. about
  ``log K`` extra nats in the exponent -- small for ``K ~ 10-20``.

Counts may be Python ints, NumPy arrays or tensors; results are NumPy ``float64``
arrays (or floats for scalar input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import beta, binomtest

from robustkit.errors import InputError


def _arr(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")


def _check_counts(k: np.ndarray, n: np.ndarray) -> None:
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise InputError("counts must satisfy 0 <= k <= n and n >= 1")


def _out(v: np.ndarray, scalar: bool) -> Any:
    return float(v) if scalar else v


def clopper_pearson_lower(k: Any, n: Any, alpha: float) -> Any:
    """One-sided ``(1 - alpha)`` lower confidence bound for a binomial proportion.

    ``P(p < lower) <= alpha`` for every true ``p``, when ``k ~ Binomial(n, p)`` and
    ``n`` is fixed in advance. ``lower = Beta(k, n - k + 1).ppf(alpha)``; 0 when ``k = 0``.
    """
    _check_alpha(alpha)
    kk, nn = _arr(k), _arr(n)
    _check_counts(kk, nn)
    kk, nn = np.broadcast_arrays(kk, nn)
    with np.errstate(all="ignore"):
        lo = np.where(kk > 0, beta.ppf(alpha, np.maximum(kk, 1), nn - kk + 1), 0.0)
    return _out(lo, np.ndim(k) == 0 and np.ndim(n) == 0)


def clopper_pearson_upper(k: Any, n: Any, alpha: float) -> Any:
    """One-sided ``(1 - alpha)`` upper confidence bound: ``Beta(k + 1, n - k).ppf(1 - alpha)``; 1 when ``k = n``."""
    _check_alpha(alpha)
    kk, nn = _arr(k), _arr(n)
    _check_counts(kk, nn)
    kk, nn = np.broadcast_arrays(kk, nn)
    with np.errstate(all="ignore"):
        hi = np.where(kk < nn, beta.ppf(1.0 - alpha, kk + 1, np.maximum(nn - kk, 1)), 1.0)
    return _out(hi, np.ndim(k) == 0 and np.ndim(n) == 0)


def binom_test(k: Any, n: Any, p: float = 0.5) -> Any:
    """Two-sided exact binomial test p-value of ``k`` successes in ``n`` trials under ``p``
    (``scipy.stats.binomtest(k, n, p).pvalue``; vectorized by a loop)."""
    kk, nn = _arr(k), _arr(n)
    _check_counts(kk, nn)
    kk, nn = np.broadcast_arrays(kk, nn)
    pv = np.array([binomtest(int(a), int(b), p).pvalue for a, b in zip(kk.ravel(), nn.ravel())],
                  dtype=np.float64).reshape(kk.shape)
    return _out(pv, np.ndim(k) == 0 and np.ndim(n) == 0)


@dataclass(frozen=True)
class CheckpointCS:
    """Confidence sequence for a binomial proportion over a geometric checkpoint schedule.

    Samples arrive one by one (``X_1, X_2, ... ~ Bernoulli(p)`` i.i.d.); bounds are only
    *looked at* at the checkpoints ``t_1 < t_2 < ... < t_K = n_max`` with
    ``t_1 = first``, ``t_{k+1} = ceil(growth * t_k)`` (capped at ``n_max``). At checkpoint
    ``t_k`` with ``S`` successes::

        lower_k = clopper_pearson_lower(S, t_k, alpha / K)
        upper_k = clopper_pearson_upper(S, t_k, alpha / K)

    Guarantee (union bound over the ``K`` fixed checkpoints):
    ``P(exists k: p < lower_k) <= sum_k alpha / K = alpha`` and likewise for ``upper_k``.
    Hence for **any** stopping time ``tau`` taking values among the checkpoints -- however
    it depends on the data seen so far -- ``P(p < lower_tau) <= alpha``. (Jointly, both
    sides hold with probability ``>= 1 - 2 alpha``.) The schedule must not depend on the data.
    """

    n_max: int
    alpha: float
    first: int = 100
    growth: float = 1.5
    checkpoints: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if self.n_max < 1 or self.first < 1:
            raise InputError(f"n_max and first must be >= 1, got n_max={self.n_max}, first={self.first}")
        if not self.growth > 1.0:
            raise InputError(f"growth must be > 1, got {self.growth}")
        ts, t = [], min(self.first, self.n_max)
        while t < self.n_max:
            ts.append(t)
            t = max(t + 1, math.ceil(self.growth * t))
        ts.append(self.n_max)
        object.__setattr__(self, "checkpoints", tuple(ts))

    @property
    def alpha_per_look(self) -> float:
        return self.alpha / len(self.checkpoints)

    def _check_t(self, t: int) -> None:
        if int(t) not in self.checkpoints:
            raise InputError(f"t={t} is not a checkpoint of this confidence sequence {self.checkpoints}; "
                             "the guarantee only covers the fixed schedule")

    def lower(self, k: Any, t: int) -> Any:
        """Lower bound at checkpoint ``t`` (valid simultaneously over all checkpoints w.p. ``>= 1 - alpha``)."""
        self._check_t(t)
        return clopper_pearson_lower(k, t, self.alpha_per_look)

    def upper(self, k: Any, t: int) -> Any:
        """Upper bound at checkpoint ``t`` (valid simultaneously over all checkpoints w.p. ``>= 1 - alpha``)."""
        self._check_t(t)
        return clopper_pearson_upper(k, t, self.alpha_per_look)
