"""The tiny classifier the contract and objective tests share (CPU, milliseconds per step)."""

from __future__ import annotations

import torch
from torch import nn

from robustkit.zoo import RobustModel


def tiny_classifier(seed: int = 0, bn: bool = True) -> RobustModel:
    """conv(1->4, 3x3, stride 2) [+ BN] + ReLU + linear: (B, 1, 28, 28) -> (B, 10), untrained."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
    return RobustModel(net, "tiny", 10, (1, 28, 28), (0.5,), (0.5,))
