"""A user's own model module, as ``--arch _user_nets:ClassName`` names it (the tests put this
directory on ``sys.path`` / ``PYTHONPATH``, as a user would put theirs).

Also the things a hostile or mistaken ``model.json`` could name: a factory function (not a class)
and a class that does not return ``(B, K)`` logits.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv3x3(width) -> ReLU -> global average pool -> linear: any input size, ``num_classes`` logits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class OtherNet(nn.Module):
    """Another architecture (two linear layers on 28x28x1): its state dict does not fit ``TinyNet``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, K)
        return self.head(self.body(x))


class Fixed56(nn.Module):
    """Takes exactly (1, 56, 56) inputs (flatten + linear), like an ImageNet net at its native size."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(56 * 56, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 56, 56) -> (B, K)
        return self.fc(x.flatten(1))


class NoLogits(nn.Module):
    """Returns (B, K, 1) instead of (B, K)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(1, 2, 3))[:, None])[..., None]


class NeedsWidth(nn.Module):
    """A constructor argument without a default (``--arch-kwargs '{"width": 4}'``)."""

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()
        self.net = TinyNet(num_classes, 1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_tiny() -> nn.Module:
    """A factory function: not an ``nn.Module`` subclass, so ``--arch`` refuses to call it."""
    return TinyNet()


try:  # pyautoattack's example code; its ``ResNet18()`` is a factory function, which --arch does not call
    from pyautoattack.examples.resnet import BasicBlock, ResNet
except ImportError:  # pyautoattack not installed: tests/test_real_cifar.py skips
    pass
else:
    class CifarResNet18(ResNet):
        """pyautoattack's CIFAR-10 ResNet-18 as a class: the three lines a user writes around a factory."""

        def __init__(self, num_classes: int = 10) -> None:
            super().__init__(BasicBlock, [2, 2, 2, 2], num_classes)
