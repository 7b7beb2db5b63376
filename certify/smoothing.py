"""Randomized smoothing: Cohen, Rosenfeld & Kolter 2019, "Certified Adversarial Robustness
via Randomized Smoothing" (ICML), Algorithm PREDICT and CERTIFY; the structure and names
(``cAHat``, ``nA``, ``pABar``) follow their ``code/core.py`` (locuslab/smoothing).

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)``,
with the noise added in **pixel space** (normalization is the model's first layer). If
``P(f(x + delta) = cA) >= pABar > 1/2`` then ``g`` predicts ``cA`` everywhere in the L2 ball of
radius ``sigma * Phi^-1(pABar)`` around ``x`` (their Theorem 1 with ``pB <= 1 - pA``).

Paper defaults (their ImageNet/CIFAR experiments): ``n0=100``, ``n=100,000``, ``alpha=0.001``;
they are this module's defaults too.

Sequential certification (``certify(..., sequential=True)``) replaces the fixed-``n`` Clopper--Pearson
bound by an anytime-valid confidence sequence (``certify.stats.CheckpointCS``; Voracek 2024,
"Treatment of Statistical Estimation Problems in Randomized Smoothing for Adversarial Robustness")
and stops each image once more samples cannot raise its radius by more than ``tol``. Its price: the
bound at ``n`` uses ``alpha / K`` (``K`` checkpoints, 19 for ``n = 100,000``), so the largest radius is
a little smaller (0.93 vs 0.95 at sigma 0.25) -- and no valid procedure can certify a radius ``r``
from all-agreeing votes with fewer than ``ln(1/alpha) / (1 - Phi(r / sigma))`` samples, so near the
fixed-``n`` maximum radius little can be saved; the savings come from everything below it.

Fast path: noise is sampled for many images in one forward batch, votes are counted with one
``bincount`` per batch, under ``torch.inference_mode`` (and optional CUDA autocast), and in
sequential mode images that have stopped leave the batch. Each image draws its noise from its
own generator (``seeds``, see ``certify/_noise.py``), so its certificate does not depend on the
other images of the call or on ``batch_size``.

``SmoothingCertifier`` (registered as ``"smoothing"``) is the ``Certifier``-protocol front of
``Smooth.certify`` used by the certification pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from certify._noise import NoiseStreams, count_votes
from certify.base import Certificate
from certify.stats import CheckpointCS, binom_test, clopper_pearson_lower
from robustkit.errors import InputError
from robustkit.modes import eval_mode
from robustkit.registry import CERTIFIERS
from robustkit.zoo import unwrap


def _check(n: int, alpha: float, batch_size: int, name: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"{name} must be an integer >= 1, got {n!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise InputError(f"alpha must be in (0, 1), got {alpha!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def validate_params(sigma: float, n0: int, n: int, alpha: float, batch_size: int = 1000,
                    tol: float | None = None) -> None:
    """Raise ``InputError`` (a ``ValueError``) saying what is allowed: ``sigma > 0``, ``1 <= n0 <= n``,
    ``0 < alpha < 1``, ``batch_size >= 1``, ``tol >= 0`` (or None)."""
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and sigma > 0):
        raise InputError(f"sigma must be a number > 0, got {sigma!r}")
    _check(n0, alpha, batch_size, "n0")
    _check(n, alpha, batch_size)
    if n0 > n:
        raise InputError(f"n0 must be <= n (1 <= n0 <= n), got n0={n0}, n={n}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
        raise InputError(f"tol must be >= 0 (an L2 radius), got {tol!r}")


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius fixed-``n`` CERTIFY can return: all ``n`` votes for ``cAHat`` give
    ``pABar = alpha ** (1 / n)``, so ``sigma * Phi^-1(alpha ** (1 / n))`` (0.95 for sigma=0.25, n=1e5, alpha=1e-3)."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def sequential_stop(nA: np.ndarray, t: int, cs: CheckpointCS, sigma: float, tol: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stopping rule of sequential CERTIFY at checkpoint ``t`` of ``cs`` for counts ``nA (A,)``.

    Returns ``(pA_lower, pA_upper, stop)``, each ``(A,)``. Stop when ``pA_upper < 1/2`` (sure abstain) or
    when ``pA_lower >= 1/2`` and the radius can grow by at most ``tol``: the cap is the smaller of
    ``r(pA_upper)`` and ``r(pA_best)``, ``pA_best`` being the final lower bound if all remaining ``n - t``
    samples voted ``cAHat``. Always stop at the last checkpoint. Validity does not depend on this rule.
    """
    lo, hi = cs.lower(nA, t), cs.upper(nA, t)
    best = clopper_pearson_lower(nA + (cs.n_max - t), cs.n_max, cs.alpha_per_look)
    gain = sigma * (norm.ppf(np.minimum(hi, best)) - norm.ppf(np.maximum(lo, 0.5)))
    stop = (hi < 0.5) | ((lo >= 0.5) & (gain <= tol)) | (t >= cs.n_max)
    return lo, hi, stop


class Smooth:
    """A smoothed classifier around ``base_classifier`` (a ``RobustModel``: pixel space in, logits out).

    Args:
        base_classifier: ``f``, maps ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, num_classes)``.
        num_classes: K.
        sigma: noise level (L2); Cohen et al. use 0.12, 0.25, 0.5, 1.0.
        amp: run ``f`` under autocast on CUDA (the certificate is then about the autocast ``f``).
    """

    ABSTAIN = -1

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, *, amp: bool = False) -> None:
        if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and sigma > 0):
            raise InputError(f"sigma must be a number > 0, got {sigma!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.amp = amp

    # -- PREDICT ------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, n: int = 100_000, alpha: float = 0.001, batch_size: int = 1000, *,
                seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Cohen et al. PREDICT: labels ``(B,)`` for images ``x (B, C, H, W)``, ``-1`` = abstain.

        Draws ``n`` noisy samples per image; abstains unless the two-sided binomial test of the
        top-two counts ``(nA, nA + nB)`` rejects ``p = 1/2`` at level ``alpha``.
        Guarantee: per image, the probability of returning a class other than ``g(x)`` is at
        most ``alpha`` (over the sampling).
        """
        _check(n, alpha, batch_size)
        self._check_x(x)
        counts = self._sample_noise(x, n, batch_size, self._streams(x, seeds))   # (B, K)
        top2 = counts.topk(2, dim=1)                             # values/indices (B, 2)
        count1, count2 = top2.values[:, 0], top2.values[:, 1]
        pvalue = binom_test(count1.cpu(), (count1 + count2).cpu(), 0.5)
        abstain = torch.from_numpy(pvalue > alpha).to(x.device)
        return torch.where(abstain, torch.full_like(top2.indices[:, 0], self.ABSTAIN), top2.indices[:, 0])

    # -- CERTIFY ------------------------------------------------------------------------
    def certify(self, x: torch.Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                batch_size: int = 1000, sequential: bool = False, tol: float | None = None, *,
                first: int = 100, growth: float = 1.5, seeds: torch.Tensor | None = None) -> Certificate:
        """Cohen et al. CERTIFY for a batch ``x (B, C, H, W)`` in ``[0, 1]``.

        ``n0`` selection samples pick ``cAHat``; ``n`` fresh estimation samples give ``nA`` and
        ``pABar`` = one-sided Clopper--Pearson lower bound at level ``alpha``; radius
        ``sigma * Phi^-1(pABar)``, abstain when ``pABar < 1/2``. Defaults as in the paper:
        ``n0=100, n=100_000, alpha=0.001``.

        Guarantee: per image, with probability at least ``1 - alpha`` over the sampling, if the
        certificate does not abstain then ``g`` predicts ``prediction`` at every point within L2
        distance ``radius`` of ``x``.

        ``sequential=True`` draws the estimation samples in rounds ending at the checkpoints
        ``first, growth*first, ..., n`` (defaults 100, x1.5) of a ``CheckpointCS`` (Clopper--Pearson, ``alpha`` split
        over the checkpoints by a union bound) and stops an image at the first checkpoint where

        - the upper bound ``pA_upper < 1/2`` (it will abstain anyway), or
        - ``pABar >= 1/2`` and ``min(r(pA_upper), r(pA_best)) - r(pABar) <= tol`` where
          ``r(p) = sigma * Phi^-1(p)`` and ``pA_best`` is the lower bound the image would get at
          ``n`` if every remaining sample voted ``cAHat``: its radius cannot grow by more than
          ``tol`` (``pA_upper`` is a likely cap, ``pA_best`` a sure one).

        The same ``1 - alpha`` guarantee holds: the confidence sequence covers ``pA`` at all
        checkpoints simultaneously with probability ``>= 1 - alpha``, so its lower bound at the
        (data-dependent) stopping checkpoint is valid, whatever the stopping rule. ``tol``
        (L2 radius) defaults to ``sigma / 4``; at most ``n`` estimation samples per image.

        Returns ``Certificate(prediction (B,), radius (B,), abstained (B,), info)`` with
        ``info["samples"] (B,)`` estimation samples used (``n0`` selection samples come on top)
        and ``info["pA_lower"] (B,)`` = ``pABar``; plus ``nA`` and (sequential) ``pA_upper``.
        """
        validate_params(self.sigma, n0, n, alpha, batch_size, tol)
        self._check_x(x)
        B = x.shape[0]
        streams = self._streams(x, seeds)
        cAHat = self._sample_noise(x, n0, batch_size, streams).argmax(1)   # (B,)
        if sequential:
            tol = self.sigma / 4 if tol is None else float(tol)
            nA, samples, pABar, pA_upper = self._sequential(x, cAHat, n, alpha, batch_size, tol, first, growth,
                                                            streams)
        else:
            counts = self._sample_noise(x, n, batch_size, streams)         # (B, K)
            nA = counts.gather(1, cAHat[:, None])[:, 0].cpu().numpy()      # (B,)
            samples = np.full(B, n, dtype=np.int64)
            pABar = np.asarray(clopper_pearson_lower(nA, n, alpha), dtype=np.float64).reshape(B)
            pA_upper = None
        abstained = pABar < 0.5
        radius = np.where(abstained, 0.0, self.sigma * norm.ppf(np.clip(pABar, 0.5, 1.0)))
        dev = x.device
        abst = torch.from_numpy(abstained).to(dev)
        info = {"samples": torch.from_numpy(samples).to(dev), "pA_lower": torch.from_numpy(pABar).to(dev),
                "nA": torch.as_tensor(nA, dtype=torch.long).to(dev)}
        if pA_upper is not None:
            info["pA_upper"] = torch.from_numpy(pA_upper).to(dev)
        return Certificate(prediction=torch.where(abst, torch.full_like(cAHat, self.ABSTAIN), cAHat),
                           radius=torch.from_numpy(radius).to(dev), abstained=abst, info=info)

    def _sequential(self, x: torch.Tensor, cAHat: torch.Tensor, n: int, alpha: float, batch_size: int, tol: float,
                    first: int, growth: float, streams: NoiseStreams
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rounds over the ``CheckpointCS`` schedule; returns ``nA, samples, pABar, pA_upper`` (each (B,))."""
        cs = CheckpointCS(n, alpha, first=first, growth=growth)
        B = x.shape[0]
        nA = np.zeros(B, dtype=np.int64)
        samples = np.zeros(B, dtype=np.int64)
        lo, hi = np.zeros(B), np.ones(B)
        active = np.arange(B)                                              # images still sampling
        cA = cAHat.cpu().numpy()
        t_prev = 0
        for t in cs.checkpoints:
            idx = torch.from_numpy(active).to(x.device)
            counts = self._sample_noise(x.index_select(0, idx), t - t_prev, batch_size,
                                        streams.subset(active.tolist()))    # (A, K)
            nA[active] += counts.cpu().numpy()[np.arange(active.size), cA[active]]
            samples[active] = t
            lo[active], hi[active], stop = sequential_stop(nA[active], t, cs, self.sigma, tol)
            active = active[~stop]
            t_prev = t
            if active.size == 0:
                break
        return nA, samples, lo, hi

    # -- sampling -----------------------------------------------------------------------
    def _streams(self, x: torch.Tensor, seeds: torch.Tensor | None) -> NoiseStreams:
        if seeds is None:
            seeds = torch.randint(0, 2 ** 62, (x.shape[0],), dtype=torch.int64)
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
        if seeds.shape != (x.shape[0],):
            raise InputError(f"seeds must have shape (B,) = ({x.shape[0]},), got {tuple(seeds.shape)}")
        return NoiseStreams(seeds, x.device, x.shape[1:])

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int, streams: NoiseStreams) -> torch.Tensor:
        """Votes ``(B, K)`` int64 of ``f`` on ``num`` noisy copies of each image in ``x (B, C, H, W)``."""
        return count_votes(self.base_classifier, x, self.sigma, num, self.num_classes, batch_size, streams, self.amp)

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"x must be a float image batch (B, C, H, W) in [0, 1], got {got}")


@CERTIFIERS.register("smoothing", help="randomized smoothing, L2 (Cohen et al. 2019); sequential option")
class SmoothingCertifier:
    """Cohen et al. 2019 CERTIFY of the smoothed classifier ``g`` around ``model`` (L2, pixel space).

    Keyword-only settings, defaults as in the paper: ``sigma=0.25``, ``n0=100``, ``n=100_000``,
    ``alpha=0.001``; ``batch_size`` noisy rows per forward pass; ``sequential`` / ``tol``: the
    anytime-valid early stopping of ``Smooth.certify``; ``amp``: CUDA autocast.

    Guarantee: per image, with probability at least ``1 - alpha`` over the noise, if the
    certificate does not abstain then ``g`` predicts ``prediction`` within L2 distance ``radius``.
    ``info["samples"]``: noise samples used per image, ``n0`` selection + estimation.
    """

    name, norm, deterministic = "smoothing", "l2", False

    def __init__(self, *, sigma: float = 0.25, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                 batch_size: int = 1000, sequential: bool = False, tol: float | None = None,
                 amp: bool = False) -> None:
        validate_params(sigma, n0, n, alpha, batch_size, tol)
        self.sigma, self.n0, self.n, self.alpha = float(sigma), int(n0), int(n), float(alpha)
        self.batch_size, self.sequential, self.amp = int(batch_size), bool(sequential), bool(amp)
        self.tol = (self.sigma / 4 if tol is None else float(tol)) if self.sequential else None

    @property
    def radius_scale(self) -> float:
        return self.sigma

    @property
    def max_radius(self) -> float:
        """The largest radius fixed-n CERTIFY can return with these settings."""
        return max_radius(self.sigma, self.n, self.alpha)

    @property
    def guarantee(self) -> str:
        how = ", anytime-valid checkpoint confidence sequence)" if self.sequential else ")"
        return (f"each certificate holds with probability >= 1 - alpha = {1 - self.alpha:g} over the Monte-Carlo "
                f"noise (Cohen et al. 2019, Thm 1 + Clopper-Pearson{how}; it certifies the smoothed classifier")

    def params(self) -> dict[str, object]:
        return {"sigma": self.sigma, "n0": self.n0, "n": self.n, "alpha": self.alpha, "batch_size": self.batch_size,
                "sequential": self.sequential, "tol": self.tol, "amp": self.amp}

    def __call__(self, model: nn.Module, x: torch.Tensor, *, seeds: torch.Tensor | None = None) -> Certificate:
        """Certificates for ``x (B, C, H, W)`` in [0, 1]; ``seeds (B,)`` int64 (default: from torch's RNG)."""
        k = getattr(unwrap(model), "num_classes", None)
        if not isinstance(k, int):
            with torch.no_grad(), eval_mode(model):
                k = int(model(x[:1]).shape[1])
        cert = Smooth(model, k, self.sigma, amp=self.amp).certify(
            x, self.n0, self.n, self.alpha, self.batch_size, self.sequential, self.tol, seeds=seeds)
        info = dict(cert.info or {})
        info["samples"] = info["samples"] + self.n0
        return Certificate(cert.prediction, cert.radius, cert.abstained, info)
