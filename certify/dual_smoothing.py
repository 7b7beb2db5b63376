"""Dual randomized smoothing: Xia, Yu, Jiang & Ding 2024, "Mitigating the Curse of Dimensionality for
Certified Robustness via Dual Randomized Smoothing" (ICLR); official code ``xiasong0501/DRS``.

The image ``x`` (dimension ``d``) is split by pixel index into two sub-images ``x_l, x_r`` of dimension
``d / 2`` each (``robustkit.composite.checkerboard_split``: a permutation of the coordinates, so
``||delta||^2 = ||delta_l||^2 + ||delta_r||^2``). Each is smoothed *in its own lower dimension* by its
own classifier, ``p_s^c(x_s) = P(f_s(x_s + eps_s) = c)``, ``eps_s ~ N(0, sigma^2 I_{d/2})``, and the
dual classifier predicts the class of largest mean probability::

    g(x) = argmax_c (p_l^c(x_l) + p_r^c(x_r)) / 2

The radius rule. With ``r_s = sigma * Phi^-1(p_s^A)`` and the Gaussian-shift bound on each side
(``p_s^A(x_s + delta_s) >= Phi((r_s - ||delta_s||) / sigma)``, Cohen et al. 2019 / Salman et al. 2019),
``p_l^A + p_r^A > 1`` -- so ``A`` stays the argmax -- whenever ``||delta_l|| + ||delta_r|| < r_l + r_r``;
the worst split of ``||delta||`` (``||delta_l|| = ||delta_r||``) gives the certified L2 radius::

    R = (r_l + r_r) / sqrt(2) = sigma * (Phi^-1(p_l^A) + Phi^-1(p_r^A)) / sqrt(2)

It is tight for this ``g`` (two linear sub-classifiers attain it; ``tests/test_dual_smoothing.py``
checks coverage against that closed form) and scales like ``1/sqrt(m) + 1/sqrt(n)`` in the two
sub-dimensions, the rate of the paper's abstract. One side may be below 1/2 (``r_s < 0``) as long as
``r_l + r_r > 0``. **Deviation from the official code**: ``core1_lowres_2.py`` returns
``sqrt(R_l^2 + R_r^2)`` (each ``R_s`` clipped at 0), which exceeds ``R`` unless ``r_l = r_r`` and is
not implied by the two sub-certificates for this ``g`` (an adversary spending its whole budget on the
weaker side breaks it earlier); we follow the derivation above. The official code also bounds each
side at level ``alpha``; we use ``alpha / 2`` per side so that the union bound gives ``1 - alpha``. Its
sub-classifiers see the noisy sub-image scattered back into a full-size masked image (holes filled from
a 2x2 max-pool); ours see the compact ``(C, H, W/2)`` sub-image -- either is a function of the noisy
sub-image alone, which is all the certificate needs (a network can upsample inside).

The Monte-Carlo core is the one of ``certify.smoothing`` (``Smooth``: per-image noise streams, one
``bincount`` per batch, Clopper--Pearson, the sequential checkpoint confidence sequence): ``cAHat``
comes from the summed selection votes of the two branches (as in the official code), then each
branch estimates its own ``pABar`` for ``cAHat``. Image ``i``'s two branches draw from two streams
derived from ``seeds[i]``.

Defaults: Cohen et al.'s ``n0=100``, ``n=100,000``, ``alpha=0.001``, ``sigma=0.25`` (the official
README certifies at sigma 0.18 and 0.36 with ``N=10,000``; sigma is the noise per sub-image pixel).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from certify._noise import NoiseStreams
from certify.base import Certificate, image_seeds
from certify.smoothing import Smooth, validate_params
from certify.stats import clopper_pearson_lower
from robustkit.composite import DualSubimageNet, checkerboard_split, parts
from robustkit.errors import InputError
from robustkit.registry import CERTIFIERS
from robustkit.zoo import unwrap


class _Branch(nn.Module):
    """One side's pixel-space classifier of a ``(B, C, H, W/2)`` sub-image: the composite's per-channel
    normalization (it commutes with the split), then that side's ``RobustModel``."""

    def __init__(self, normalize: nn.Module, side: nn.Module) -> None:
        super().__init__()
        self.normalize, self.side = normalize, side

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, H, W/2) -> (B, K)
        return self.side(self.normalize(z))


def dual_max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius fixed-``n`` dual CERTIFY can return: all votes for ``cAHat`` on both sides,
    ``pABar = (alpha / 2) ** (1 / n)`` each, ``R = sqrt(2) * sigma * Phi^-1(pABar)``."""
    return float(math.sqrt(2.0) * sigma * norm.ppf((alpha / 2) ** (1.0 / n)))


def dual_radius(pl: np.ndarray, pr: np.ndarray, sigma: float) -> np.ndarray:
    """``sigma * (Phi^-1(pl) + Phi^-1(pr)) / sqrt(2)`` per image (``-inf`` where a bound is 0)."""
    with np.errstate(divide="ignore"):
        return sigma * (norm.ppf(pl) + norm.ppf(pr)) / math.sqrt(2.0)


def _side_seeds(seeds: torch.Tensor, side: int) -> torch.Tensor:
    """``(B,)`` seeds of branch ``side`` (0 left, 1 right): SplitMix of each image seed and the side."""
    return torch.cat([image_seeds(int(s), [side]) for s in seeds.tolist()]) if seeds.numel() else seeds


@CERTIFIERS.register("dual-smoothing", help="dual randomized smoothing, L2 (Xia et al. 2024): two sub-images "
                                            "smoothed in half the dimension; needs a dual-subimage model")
class DualSmoothingCertifier:
    """Dual randomized smoothing CERTIFY of a ``dual-subimage`` model (``robustkit.composite``), L2, pixel space.

    Keyword-only settings, defaults as in Cohen et al. (the paper follows them): ``sigma=0.25``,
    ``n0=100``, ``n=100_000``, ``alpha=0.001``; ``batch_size`` noisy sub-images per forward pass;
    ``sequential`` / ``tol`` / ``first`` / ``growth``: ``Smooth.certify``'s anytime-valid early stopping,
    per branch (each branch's radius within ``tol``, so ``R`` within ``sqrt(2) * tol``; a branch whose upper
    bound falls below 1/2 stops there, its bound looser but valid); ``amp``: CUDA autocast.

    Guarantee: per image, with probability at least ``1 - alpha`` over the noise (``alpha / 2`` per
    branch, union bound), if the certificate does not abstain then ``g`` (the mean of the two smoothed
    branches' class probabilities) predicts ``prediction`` at every point within L2 distance ``radius``.
    ``info``: ``samples`` (sub-image forward passes per image, both branches, selection included),
    ``pA_lower_left`` / ``pA_lower_right``, ``radius_left`` / ``radius_right`` (``sigma * Phi^-1(pABar)``).
    """

    name, norm, deterministic = "dual-smoothing", "l2", False

    def __init__(self, *, sigma: float = 0.25, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                 batch_size: int = 1000, sequential: bool = False, tol: float | None = None, first: int = 100,
                 growth: float = 1.5, amp: bool = False) -> None:
        validate_params(sigma, n0, n, alpha, batch_size, tol)
        if isinstance(first, bool) or not isinstance(first, int) or first < 1:
            raise InputError(f"first must be an integer >= 1 (the first checkpoint), got {first!r}")
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth > 1:
            raise InputError(f"growth must be a number > 1 (checkpoint spacing), got {growth!r}")
        self.sigma, self.n0, self.n, self.alpha = float(sigma), int(n0), int(n), float(alpha)
        self.batch_size, self.sequential, self.amp = int(batch_size), bool(sequential), bool(amp)
        self.tol = (self.sigma / 4 if tol is None else float(tol)) if self.sequential else None
        self.first, self.growth = int(first), float(growth)

    @property
    def radius_scale(self) -> float:
        return self.sigma

    @property
    def max_radius(self) -> float:
        """The largest radius fixed-n dual CERTIFY can return with these settings."""
        return dual_max_radius(self.sigma, self.n, self.alpha)

    @property
    def guarantee(self) -> str:
        how = ", anytime-valid checkpoint confidence sequence" if self.sequential else ""
        return (f"each certificate holds with probability >= 1 - alpha = {1 - self.alpha:g} over the Monte-Carlo "
                f"noise (dual randomized smoothing, Xia et al. 2024: radius sigma*(Phi^-1(pL)+Phi^-1(pR))/sqrt(2) "
                f"from two Clopper-Pearson bounds at alpha/2{how}); it certifies the dual smoothed classifier")

    def params(self) -> dict[str, object]:
        return {"sigma": self.sigma, "n0": self.n0, "n": self.n, "alpha": self.alpha, "batch_size": self.batch_size,
                "sequential": self.sequential, "tol": self.tol, "first": self.first, "growth": self.growth,
                "amp": self.amp}

    def check_model(self, model: nn.Module) -> DualSubimageNet:
        """The ``DualSubimageNet`` of ``model``; ``InputError`` unless it is a ``dual-subimage`` model without
        ``resize`` (the pipeline calls this before any work)."""
        net = parts(model, DualSubimageNet)
        outer = unwrap(model)
        if net is None:
            raise InputError(f"dual-smoothing needs a dual-subimage model (robustkit.composite.dual_model(left, right) "
                             f"or arch dual-subimage), got {getattr(outer, 'arch', type(outer).__name__)!r}; use "
                             "--method smoothing for an ordinary classifier")
        if getattr(outer, "resize", None) is not None:
            raise InputError("dual-smoothing: the dual-subimage model must not resize its input (resize= splits "
                             "after resizing, so the sub-images would not be the image's pixels)")
        return net

    def __call__(self, model: nn.Module, x: torch.Tensor, *, seeds: torch.Tensor | None = None) -> Certificate:
        """Certificates for ``x (B, C, H, W)`` in [0, 1] (``W`` even); ``seeds (B,)`` int64 (default: torch's RNG)."""
        net, outer = self.check_model(model), unwrap(model)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"x must be a float image batch (B, C, H, W) in [0, 1], got {got}")
        shape = tuple(getattr(outer, "input_shape", ()) or ())
        if shape and tuple(x.shape[1:]) != shape:
            raise InputError(f"the dual-subimage model takes images {shape}, got x of shape {tuple(x.shape)}")
        B = x.shape[0]
        if seeds is None:
            seeds = torch.randint(0, 2 ** 62, (B,), dtype=torch.int64)
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
        if seeds.shape != (B,):
            raise InputError(f"seeds must have shape (B,) = ({B},), got {tuple(seeds.shape)}")
        k = int(outer.num_classes)
        xl, xr = checkerboard_split(x)                                            # (B, C, H, W/2) each
        sides = [(Smooth(_Branch(outer.normalize, branch), k, self.sigma, amp=self.amp), xs,
                  NoiseStreams(_side_seeds(seeds, i), x.device, xs.shape[1:]))
                 for i, (branch, xs) in enumerate(((net.left, xl), (net.right, xr)))]
        # selection: the summed votes of both branches pick cAHat (the official code's rule)
        votes = sum(sm._sample_noise(xs, self.n0, self.batch_size, st) for sm, xs, st in sides)   # (B, K)
        cAHat = votes.argmax(1)                                                   # (B,)
        pABar, samples = [], np.full(B, 2 * self.n0, dtype=np.int64)
        for sm, xs, st in sides:                                                  # estimation, alpha / 2 each
            lo, used = self._estimate(sm, xs, cAHat, st)
            pABar.append(lo)
            samples += used
        r_sides = [self.sigma * norm.ppf(np.clip(p, 1e-300, 1.0)) for p in pABar]  # (B,) each, may be < 0
        radius = dual_radius(pABar[0], pABar[1], self.sigma)                      # (B,)
        abstained = ~(radius > 0)
        radius = np.where(abstained, 0.0, radius)
        dev = x.device
        abst = torch.from_numpy(abstained).to(dev)
        info = {"samples": torch.from_numpy(samples).to(dev),
                "pA_lower_left": torch.from_numpy(pABar[0]).to(dev),
                "pA_lower_right": torch.from_numpy(pABar[1]).to(dev),
                "radius_left": torch.from_numpy(np.asarray(r_sides[0], dtype=np.float64)).to(dev),
                "radius_right": torch.from_numpy(np.asarray(r_sides[1], dtype=np.float64)).to(dev)}
        return Certificate(prediction=torch.where(abst, torch.full_like(cAHat, Smooth.ABSTAIN), cAHat),
                           radius=torch.from_numpy(radius.astype(np.float64)).to(dev), abstained=abst, info=info)

    def _estimate(self, sm: Smooth, xs: torch.Tensor, cAHat: torch.Tensor, streams: NoiseStreams
                  ) -> tuple[np.ndarray, np.ndarray]:
        """One branch's ``(pABar (B,), estimation samples (B,))`` for ``cAHat`` at level ``alpha / 2``."""
        a, B = self.alpha / 2, xs.shape[0]
        if self.sequential:
            _, used, lo, _ = sm._sequential(xs, cAHat, self.n, a, self.batch_size, self.tol, self.first,
                                            self.growth, streams)
            return np.asarray(lo, dtype=np.float64), used
        counts = sm._sample_noise(xs, self.n, self.batch_size, streams)           # (B, K)
        nA = counts.gather(1, cAHat[:, None])[:, 0].cpu().numpy()                 # (B,)
        lo = np.asarray(clopper_pearson_lower(nA, self.n, a), dtype=np.float64).reshape(B)
        return lo, np.full(B, self.n, dtype=np.int64)
