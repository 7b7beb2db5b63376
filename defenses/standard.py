"""Standard (non-robust) training: cross-entropy on clean inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from robustkit.registry import DEFENSES
from robustkit.validate import number


@DEFENSES.register("standard", help="cross-entropy on clean inputs (no defense)")
class Standard(Defense):
    """Plain empirical risk minimization, optionally with label smoothing."""

    name = "standard"

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = number("label_smoothing", label_smoothing, 0.0, 1.0, strict_max=True)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(x)  # (B, K)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}
