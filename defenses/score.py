"""SCORE (Pang et al. 2022): TRADES with the squared error between probabilities (LSE).

Pang, Lin, Yang, Zhu, Yan, "Robustness and Accuracy Could Be Reconcilable by (Proper) Definition",
ICML 2022 (https://arxiv.org/abs/2202.10103); code P2333/SCORE (``without_DDPM/train_cifar.py``:
``distance_func('LSE')``, ``attack_trades_divergence``, the loss clipping; ``gowal21uncovering/utils/
trades.py``: ``trades_loss_LSE``, the 1M-DDPM-data recipe).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses._adversarial import AdversarialObjective, TargetsFn, accuracy_logs, check_positive, reduce
from defenses._divergence_ascent import divergence_ascent, squared_error
from robustkit import validate
from robustkit.errors import InputError
from robustkit.registry import DEFENSES

# "cifar10": the paper's Section 5.2 TRADES(LSE) run without extra data (without_DDPM/README.md:
# PreActResNet-18, eps 8/255, 10 steps of 2/255 from x + 0.001 * randn, lambda 6, --clip_loss 0.3,
# lr 0.05). "cifar10-ddpm": the README's 1M-DDPM-data command (beta 4, no clipping, uniform start;
# the released WRN-28-10 checkpoint, 88.61 / 61.04 clean / AA, used beta 3). "mnist": not in the paper:
# TRADES' MNIST attack with SCORE's lambda, no clipping.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 8 / 255, "steps": 10, "step_size": 2 / 255, "beta": 6.0, "clip": 0.3, "start": "normal"},
    "cifar10-ddpm": {"eps": 8 / 255, "steps": 10, "step_size": 2 / 255, "beta": 4.0, "clip": 0.0,
                     "start": "uniform"},
    "mnist": {"eps": 0.3, "steps": 40, "step_size": 0.01, "beta": 6.0, "clip": 0.0, "start": "normal"},
}


def clip_bound(clip: float, num_classes: int) -> float:
    """The code's loss floor: the squared error of ``(1 - c, c/(K-1), ...)`` to the one-hot label,
    ``c^2 + (K-1) (c/(K-1))^2 = c^2 K / (K-1)`` (0.1 for c = 0.3, K = 10)."""
    return clip * clip * num_classes / (num_classes - 1)


@DEFENSES.register("score", help="SCORE (Pang et al. 2022): TRADES with squared errors of probabilities (LSE)")
class SCORE(AdversarialObjective):
    """``max(0, ||p(x) - y||^2 + beta * ||p(x') - p(x)||^2 - b)`` with ``x'`` maximizing ``||p(x') - p(x)||^2``.

    The paper replaces TRADES' KL (and CE) by a proper metric of the output probabilities, the
    squared error ("LSE"); ``p = softmax(f)``, ``y`` the one-hot (or soft) label. Loss clipping
    (Section 5.2, the ``without_DDPM`` code's default ``--not_clip_clean`` off): the whole per-sample
    loss is floored at ``b = clip_bound(clip, K)``, so samples already fitted to within the squared
    error of a ``clip``-smoothed label stop pulling; ``clip = 0`` turns it off (the DDPM recipe).
    Inner maximization as in the code: signed steps on the summed squared error against the fixed
    clean probabilities, in eval mode (the DDPM code keeps batch norm in train mode without updating
    its statistics; we keep the project's eval-mode attacks), from ``x + 0.001 * randn`` (``"normal"``,
    the ``without_DDPM`` code) or a uniform start (the DDPM code).

    ``label_smoothing`` follows torch (``1 - s + s/K`` on the true class); the code's (``1 - s`` and
    ``s/(K-1)``) differs, but every published SCORE recipe uses 0.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (8/255, 10 steps of 2/255, beta 6, clip 0.3), ``"cifar10-ddpm"`` (beta 4,
            clip 0, uniform start) or ``"mnist"`` (0.3, 40 steps of 0.01, beta 6, clip 0).
        norm, eps, steps, step_size: the inner maximization. beta: ``lambda`` of the paper (>= 0; 0
            skips the inner maximization). clip: in ``[0, 1)``. start: ``"normal"`` or ``"uniform"``.
        label_smoothing / targets: soft labels for the clean squared error.
    """

    name = "score"
    PRESETS = PRESETS

    def __init__(self, *, preset: str | None = "cifar10", norm: str = "linf", eps: float | str | None = None,
                 steps: int | None = None, step_size: float | str | None = None, beta: float | None = None,
                 clip: float | None = None, start: str | None = None, label_smoothing: float = 0.0,
                 targets: TargetsFn | None = None) -> None:
        knobs = self._setup(preset, norm, eps, steps, step_size, label_smoothing, targets, beta=beta, clip=clip,
                            start=start)
        self.beta = check_positive("beta", knobs["beta"], allow_zero=True)
        c = knobs["clip"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c < 1.0:
            raise InputError(f"clip must be a number in [0, 1) (0: no loss clipping), got {c!r}")
        self.clip = float(c)
        self.start_at = validate.one_of("start", knobs["start"], ("normal", "uniform"))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The squared-error-maximizing ``x'`` ``(B, C, H, W)`` (eval mode); ``x`` when beta = 0."""
        if self.beta == 0:
            return x.detach()
        return divergence_ascent(self, model, x, squared_error, start=self.start_at)

    def labels(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The target distribution ``(B, K)``: ``targets``, or the (smoothed) one-hot label."""
        if self._targets is not None:
            return self._targets(x, y, num_classes).to(x.device, torch.float32)
        s = self.label_smoothing
        return F.one_hot(y, num_classes).float() * (1.0 - s) + s / num_classes

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(x)                                           # (B, K)
        k = logits.shape[1]
        probs = F.softmax(logits.float(), dim=1)                    # (B, K)
        natural = (probs - self.labels(x, y, k)).pow(2).sum(1)      # (B,)
        logits_adv = model(x_adv) if self.beta else None            # (B, K)
        robust = squared_error(logits_adv, logits) if logits_adv is not None else torch.zeros_like(natural)
        per = F.relu(natural + self.beta * robust - clip_bound(self.clip, k))  # (B,)
        loss = reduce(per, reduction)
        return loss, accuracy_logs(loss, logits, logits_adv, y, natural=natural, robust=robust)
