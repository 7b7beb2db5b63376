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

Under DDP (``torchrun``) the model handed to the hooks is the ``DistributedDataParallel``
wrapper: DDP averages the gradients of the *loss* over the ranks, nothing else. A hook that
derives state from its own autograd calls (AWP's proxy gradient) makes it identical on every
replica with ``average_across_replicas`` (a no-op in one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from robustkit.errors import CheckpointError


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

    def end_epoch(self, model: nn.Module, ctx: StepContext) -> dict[str, Any]:
        """Hook after each epoch's last step, before the evaluation, on every rank: metrics to log
        (fast AT's catastrophic-overfitting check, DAFA's class weights). Default: a wrapper's
        (AWP, RWP, ...) inner objective's hook, else nothing."""
        inner = getattr(self, "inner", None)
        return inner.end_epoch(model, ctx) if isinstance(inner, Defense) else {}

    def check_run(self, epochs: int) -> None:
        """Called with the run's total ``epochs`` before training starts (by the Trainer, and by the
        train pipeline before anything is written): ``InputError`` when the objective cannot do
        what it was configured for in that many epochs (DAFA's warm-up). Default: a wrapper's inner
        objective's check, else nothing."""
        inner = getattr(self, "inner", None)
        if isinstance(inner, Defense):
            inner.check_run(epochs)

    def exported_models(self) -> dict[str, nn.Module]:
        """Extra models a user may want to evaluate, by suffix (ADR's EMA teacher: ``{"ema": teacher}``):
        the Trainer saves each beside every checkpoint it writes (``checkpoints/last-ema`` beside
        ``last``), loadable with ``robustkit.zoo.load``. They must be identical on every DDP rank
        (rank 0 writes them). Default: a wrapper's inner objective's, else none."""
        inner = getattr(self, "inner", None)
        return inner.exported_models() if isinstance(inner, Defense) else {}

    @property
    def stop_training(self) -> bool:
        """True asks the Trainer to stop after this epoch (must be identical on every rank). Default:
        a wrapper's inner objective's request, else False."""
        inner = getattr(self, "inner", None)
        return isinstance(inner, Defense) and bool(inner.stop_training)

    def state_dict(self) -> dict[str, Any]:
        """Training state beyond the weights (e.g. ADR's EMA teacher), saved in every trainer
        checkpoint and restored on resume: tensors, numbers and strings only (the checkpoint is read
        with ``torch.load(weights_only=True)``). Default: none; a wrapper holding an ``inner``
        objective (AWP, RWP) returns the inner one's state under ``"inner"``."""
        inner = getattr(self, "inner", None)
        state = inner.state_dict() if isinstance(inner, Defense) else {}
        return {"inner": state} if state else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned. ``CheckpointError`` for state this objective does not hold."""
        if not state:
            return
        inner = getattr(self, "inner", None)
        if isinstance(inner, Defense) and set(state) == {"inner"}:
            inner.load_state_dict(state["inner"])
            return
        raise CheckpointError(f"the checkpoint holds training state {sorted(state)} that the objective "
                              f"{self.name!r} does not take; resume with the defense that wrote it")

    def params(self) -> dict[str, Any]:
        return {"defense": self.name, **{k: v for k, v in vars(self).items()
                                         if not k.startswith("_") and isinstance(v, (int, float, str, bool))}}


# -- DDP helpers (plain torch.distributed: defenses sit below robustkit.app) ------------
def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def replicated(model: nn.Module) -> bool:
    """True when ``model`` is a DDP replica (other ranks hold the same weights and step together)."""
    return isinstance(model, nn.parallel.DistributedDataParallel) and _group_size() > 1


def average_across_replicas(tensors: list[torch.Tensor]) -> None:
    """In place, each tensor becomes its mean over the ranks: one all-reduce per dtype over a flat
    buffer. Every rank ends with the same bits (the all-reduce returns one result to all ranks and
    the division is the same on each). No-op outside an initialized process group of size > 1."""
    if not tensors or _group_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])                   # (sum of numels,)
        dist.all_reduce(flat)                                              # sum over ranks
        flat /= dist.get_world_size()
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if _group_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
