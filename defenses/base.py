"""The defense protocol: an objective, not a training loop.

    loss, logs = defense.loss(model, x, y)   # scalar loss, dict of floats for metrics

The ``Trainer`` (``defenses/trainer.py``) calls, per batch::

    defense.before_loss(model, x, y, ctx)    # e.g. AWP perturbs the weights
    loss, logs = defense.loss(model, x, y)
    loss.backward(); optimizer.step()
    defense.after_step(model, ctx)           # e.g. AWP removes the perturbation

``ctx`` is a ``StepContext`` (epoch, step, progress, optimizer) so schedules
(eps ramps, AWP warm-up) can depend on training progress. ``model`` is in train
mode when ``loss`` is called; objectives with an inner maximization switch to eval
mode for the attack and back (batch-norm statistics are not updated by the attack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class StepContext:
    epoch: int                 # 0-based epoch index
    epochs: int                # total epochs of the run
    step: int                  # global optimizer step (0-based)
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer | None = None

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]: ``step / (epochs * steps_per_epoch)``."""
        total = max(self.epochs * self.steps_per_epoch, 1)
        return min(self.step / total, 1.0)


class Defense:
    """Base class for training objectives registered in ``DEFENSES``."""

    name: str = "defense"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def before_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        """Hook before the loss of each batch (default: nothing)."""

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Hook after each optimizer step (default: nothing)."""

    def params(self) -> dict[str, Any]:
        return {"defense": self.name, **{k: v for k, v in vars(self).items()
                                         if not k.startswith("_") and isinstance(v, (int, float, str, bool))}}
