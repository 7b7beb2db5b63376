"""The attack protocol.

An attack is a configuration object: hyperparameters are keyword-only in
``__init__``; calling it runs the attack::

    result = attack(model, x, y)     # x: (B, C, H, W) in [0, 1]; y: (B,) int64

It stores no model, prints nothing, never changes ``x`` in place, runs the model in
eval mode and restores the previous mode afterwards. ``targeted=True`` means ``y``
holds target labels. Subclasses implement ``run``; ``__call__`` validates inputs
and manages the model mode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustkit.errors import InputError
from robustkit.modes import eval_mode
from robustkit.zoo import unwrap

__all__ = ["Attack", "AttackResult", "check_inputs", "eval_mode", "num_classes_of"]


@dataclass
class AttackResult:
    """Outcome of one attack call on a batch of ``B`` samples.

    x_adv:   (B, C, H, W) adversarial images, inside the threat model and ``[0, 1]``.
    success: (B,) bool, the attack's goal was reached (untargeted: label != y;
             targeted: label == y) -- judged on ``x_adv`` itself.
    queries: (B,) int64, model evaluations spent on each sample (forward passes for
             white-box attacks; label-oracle calls for hard-label attacks).
    info:    extra per-batch or per-sample data, e.g. ``forward_passes``,
             ``backward_passes``, ``l2`` (B,), ``rho`` (B,).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def check_inputs(x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None, atol: float = 1e-6) -> None:
    """Raise ``InputError`` (a ``ValueError``; it says what is allowed) for inputs that break the
    pixel-space contract."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"x must be an image batch (B, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise InputError(f"x must be a float tensor in [0, 1], got dtype {x.dtype}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"y must be a (B,) label tensor with B={x.shape[0]}, got {shape}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"y must hold integer class labels, got dtype {y.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or inf; images must be finite values in [0, 1]")
    if x.numel() and (float(x.min()) < -atol or float(x.max()) > 1 + atol):
        raise InputError(f"x must be in [0, 1] (pixel space; normalization belongs in the model), "
                         f"got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"labels must be in [0, {num_classes - 1}], got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def num_classes_of(model: nn.Module) -> int | None:
    """``model.num_classes`` for RobustModel (and DDP-wrapped ones), else None."""
    n = getattr(unwrap(model), "num_classes", None)
    return int(n) if isinstance(n, int) else None


class Attack:
    """Base class. Subclasses set ``name``, keep hyperparameters as attributes and
    implement ``run(model, x, y) -> AttackResult``. ``x`` reaching ``run`` is
    validated and the model is in eval mode."""

    name: str = "attack"
    targeted: bool = False

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        check_inputs(x, y, num_classes_of(model))
        y = y.to(device=x.device, dtype=torch.long)
        if x.shape[0] == 0:
            return AttackResult(x.clone(), torch.zeros(0, dtype=torch.bool, device=x.device),
                                torch.zeros(0, dtype=torch.long, device=x.device))
        with eval_mode(model):
            return self.run(model, x, y)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Hyperparameters for ``results.json`` (JSON-able values only)."""
        if dataclasses.is_dataclass(self):
            items = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        else:
            items = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"attack": self.name,
                **{k: v for k, v in items.items() if isinstance(v, (int, float, str, bool, type(None)))}}
