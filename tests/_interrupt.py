"""A simulated kill for resume tests: ``Interrupt`` wraps an objective and raises at a global
step; ``small_trainer`` is the tiny mnist5k Trainer those tests run twice (interrupted, resumed)."""

from __future__ import annotations

from typing import Any

import torch

from defenses.base import Defense
from defenses.schedules import make_schedule
from defenses.trainer import Trainer, make_optimizer
from robustkit.data import make_loader
from robustkit.runs import RunDir
from robustkit.zoo import RobustModel, create


class Interrupt(Defense):
    """Raises ``KeyboardInterrupt`` before step ``at``; otherwise transparent (hooks, loss and the
    checkpointed state are ``inner``'s, and the Trainer finds ``inner``'s epoch hooks)."""

    name = "interrupt"

    def __init__(self, inner: Defense, at: int) -> None:
        self.inner, self.at = inner, at

    def before_loss(self, model: Any, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> None:
        if ctx.step == self.at:
            raise KeyboardInterrupt
        self.inner.before_loss(model, x, y, ctx)

    def loss(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self.inner.loss(model, x, y)

    def after_step(self, model: Any, ctx: Any) -> None:
        self.inner.after_step(model, ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def small_trainer(run: RunDir, defense: Defense, checkpoint_every: int) -> tuple[RobustModel, Trainer]:
    """ibp-small, 200 mnist5k images in batches of 50, 2 epochs of SGD with a cosine schedule."""
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28))
    loader = make_loader("mnist5k", "train", batch_size=50, n=200, seed=1)
    opt = make_optimizer(model.parameters(), "sgd", 0.05, 0.9, 5e-4)
    return model, Trainer(model, defense, loader, epochs=2, optimizer=opt, schedule=make_schedule("cosine"),
                          run=run, best_by="train_acc", checkpoint_every=checkpoint_every, progress=False)
