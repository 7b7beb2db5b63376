"""The certificate record shared by every certifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Certificate:
    """Per-sample certificates for a batch of ``B`` images.

    prediction: (B,) int64 predicted class (``-1`` where abstained).
    radius:     (B,) float certified radius in the certifier's norm (0 where abstained).
    abstained:  (B,) bool, the certifier declined to predict.
    info:       extra per-sample data (e.g. ``samples`` used, ``pA_lower``).

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
