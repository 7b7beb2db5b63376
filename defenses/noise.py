"""Gaussian data augmentation: training the base classifier of randomized smoothing.

Cohen, Rosenfeld & Kolter 2019, "Certified Adversarial Robustness via Randomized Smoothing"
(ICML), Section 4 / ``code/train.py``: cross-entropy on ``x + sigma * N(0, I)`` with the same
``sigma`` later used for certification (they train with 0.12, 0.25, 0.5 and 1.0). The noise is
added in pixel space and -- as in their code -- the noisy image is **not** clipped to ``[0, 1]``,
so training matches the distribution the smoothed classifier sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from robustkit.registry import DEFENSES
from robustkit.validate import number


@DEFENSES.register("noise", help="Gaussian-noise augmentation for randomized smoothing (Cohen et al. 2019)")
class GaussianNoise(Defense):
    """Cross-entropy on ``x + sigma * eps``, ``eps ~ N(0, I)`` (pixel space, unclipped). Default ``sigma=0.25``."""

    name = "noise"

    def __init__(self, *, sigma: float = 0.25) -> None:
        self.sigma = number("sigma", sigma, 0.0)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x_noisy = x + self.sigma * torch.randn_like(x)   # (B, C, H, W), deliberately not clipped
        logits = model(x_noisy)                          # (B, K)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        return loss, {"loss": loss.detach(), "noisy_acc": acc.detach()}
