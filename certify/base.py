"""The certificate record and the ``Certifier`` protocol shared by every certifier.

A certifier is a configuration object (hyperparameters keyword-only in ``__init__``, no model
stored) called as ``certifier(model, x, *, seeds=None) -> Certificate``. It never changes ``x``,
runs the model in eval mode and restores the mode. Randomized certifiers draw the noise of
image ``i`` from its own generator seeded with ``seeds[i]`` (``image_seeds(run_seed, index)``),
so an image's certificate depends only on the run seed and its dataset index -- not on the
other images of the call, the chunking or the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Certificate:
    """Per-sample certificates for a batch of ``B`` images.

    prediction: (B,) int64 predicted class (``-1`` where abstained).
    radius:     (B,) float64 certified radius in the certifier's norm (0 where abstained).
    abstained:  (B,) bool, the certifier declined to predict.
    info:       extra per-sample data, each ``(B,)`` (e.g. ``samples`` used, ``pA_lower``).

    IBP certificates are deterministic. Randomized-smoothing certificates hold with
    probability at least ``1 - alpha`` over the Monte-Carlo noise.
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    abstained: torch.Tensor
    info: dict | None = None

    def certified_accuracy(self, y: torch.Tensor, radius: float) -> float:
        """Fraction of samples predicted correctly, not abstained, with radius >= ``radius``."""
        ok = (self.prediction.cpu() == y.cpu()) & ~self.abstained.cpu() & (self.radius.cpu() >= radius)
        return float(ok.float().mean()) if ok.numel() else 0.0


@runtime_checkable
class Certifier(Protocol):
    """What the certification pipeline (``robustkit.app.certify``) needs from a certifier.

    name:          the registry name (``CERTIFIERS``).
    norm:          ``"l2"`` | ``"linf"``, the norm of ``Certificate.radius``.
    deterministic: True if the certificate is a proof (IBP); False if it holds with
                   probability ``>= 1 - alpha`` over the noise (smoothing).
    radius_scale:  the natural radius unit (sigma for smoothing, the threat eps for IBP);
                   the report's radius grid is ``robustkit.report.radius_grid(radius_scale)``.
    guarantee:     one sentence: what a certificate means.
    params():      the JSON-able settings (the resume key, the report).
    """

    name: str
    norm: str
    deterministic: bool

    @property
    def radius_scale(self) -> float: ...

    @property
    def guarantee(self) -> str: ...

    def params(self) -> dict[str, Any]: ...

    def __call__(self, model: nn.Module, x: torch.Tensor, *, seeds: torch.Tensor | None = None) -> Certificate: ...


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def image_seeds(seed: int, index: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64 generator seeds, one per image, from the run ``seed`` and the dataset ``index``
    of each image: SplitMix64 (Steele et al. 2014) of ``seed * golden + index``, so neighbouring
    images and neighbouring run seeds get unrelated streams. Always >= 0."""
    idx = torch.as_tensor(index, dtype=torch.int64).cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(int(seed) % 2**64) * _GOLDEN + idx + np.uint64(1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(1)).astype(np.int64))
