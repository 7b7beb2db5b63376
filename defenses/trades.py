"""TRADES (Zhang et al. 2019): clean cross-entropy + beta * KL(p(clean) || p(adv)).

Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between
Robustness and Accuracy", ICML 2019 (https://arxiv.org/abs/1901.08573); code
yaodongyu/TRADES (``trades.py``, ``train_trades_cifar10.py``, ``train_trades_mnist.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defenses._adversarial import BetaObjective, accuracy_logs, kl_per_sample, reduce
from defenses._divergence_ascent import divergence_ascent
from robustkit.registry import DEFENSES

# The official scripts' defaults. CIFAR-10: eps 0.031, 10 steps of 0.007 (train_trades_cifar10.py;
# 0.031 ~ 8/255, 0.007 ~ 1.8/255 -- the AWP/RWP scripts use 8/255 and 2/255), beta 6 (the README's
# and the paper's CIFAR-10 setting, 1/lambda = 6; the script's own default is 1). MNIST: eps 0.3,
# 40 steps of 0.01, beta 1 (train_trades_mnist.py).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 0.031, "steps": 10, "step_size": 0.007, "beta": 6.0},
    "mnist": {"eps": 0.3, "steps": 40, "step_size": 0.01, "beta": 1.0},
}


@DEFENSES.register("trades", help="TRADES (Zhang et al. 2019): CE(clean) + beta * KL(clean || adv)")
class TRADES(BetaObjective):
    """``CE(f(x), y) + beta * KL(p(x) || p(x'))`` with ``x'`` maximizing the KL in the ball.

    As in the official code: the inner maximization starts at ``x + 0.001 * randn`` and
    takes ``steps`` signed-gradient steps (``ThreatModel.step``) on the summed KL against
    the clean prediction, projecting onto the ball and ``[0, 1]``, in eval mode. The outer
    KL is ``sum`` over classes and batch divided by the batch size (``KLDivLoss(size_average
    =False) / batch_size``, i.e. ``batchmean``), with gradients through both distributions.

    Details that differ from the official code (numerically equivalent or safer): the clean
    distribution of the inner loop is computed once per batch, not once per step (the model is
    fixed in eval mode); the start is clipped to ``[0, 1]``; the outer loss uses one clean forward
    for both the CE and the KL target (the code runs two identical train-mode forwards); the
    batch size divisor is the actual ``len(x)`` (the first release divided by the configured
    batch size, wrong on the last batch); L2 uses ``ThreatModel``'s normalized-gradient step
    (the code runs SGD on ``delta`` with renorm).

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (eps 0.031, 10 steps of 0.007, beta 6) or ``"mnist"`` (eps 0.3,
            40 steps of 0.01, beta 1); ``None`` needs explicit values.
        norm, eps, steps, step_size: the inner maximization. beta: ``1/lambda`` (>= 0).
        beta = 0 skips the inner maximization: plain cross-entropy training.
        label_smoothing / targets: soft labels for the clean CE (``AdversarialObjective``).
    """

    name = "trades"
    PRESETS = PRESETS

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The KL-maximizing ``x'`` ``(B, C, H, W)`` (eval mode); ``x`` itself when beta = 0."""
        x = x.detach()
        if self.beta == 0:
            return x
        return divergence_ascent(self, model, x, kl_per_sample, "normal")

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(x)                                           # (B, K)
        natural = self.ce(logits, x, y)                             # (B,)
        if self.beta == 0:
            loss = reduce(natural, reduction)
            return loss, accuracy_logs(loss, logits, None, y)
        logits_adv = model(x_adv)                                   # (B, K)
        robust = kl_per_sample(logits_adv, logits)                  # (B,)
        loss = reduce(natural + self.beta * robust, reduction)
        return loss, accuracy_logs(loss, logits, logits_adv, y, natural=natural, kl=robust)
