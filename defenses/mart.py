"""MART (Wang et al. 2020): misclassification-aware adversarial risk.

Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness Requires Revisiting
Misclassified Examples", ICLR 2020 (https://openreview.net/forum?id=rklOg6EFwS); code
YisenWang/MART (``mart.py``, ``train_wideresnet.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses._adversarial import BetaObjective, accuracy_logs, reduce
from robustkit.registry import DEFENSES

# CIFAR-10: the official mart_loss defaults (eps 0.031, 10 steps of 0.007, beta 6). MNIST is not
# in the MART code: its attack settings are TRADES' MNIST ones, beta stays MART's 6.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 0.031, "steps": 10, "step_size": 0.007, "beta": 6.0},
    "mnist": {"eps": 0.3, "steps": 40, "step_size": 0.01, "beta": 6.0},
}


@DEFENSES.register("mart", help="MART (Wang et al. 2020): BCE(adv) + beta * KL * (1 - p_y(clean))")
class MART(BetaObjective):
    """``BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x))`` on PGD examples ``x'``.

    As in the official code: the inner maximization is PGD on the cross-entropy from
    ``x + 0.001 * randn`` (last iterate), in eval mode. The boosted CE is
    ``CE(x', y) - log(1.0001 - p_{y'}(x') + 1e-12)`` with ``y'`` the most likely wrong class
    of ``x'``; the KL term is weighted per sample by ``1.0000001 - p_y(x)`` and averaged over
    the batch; gradients flow through the clean probabilities in both places.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (eps 0.031, 10 steps of 0.007, beta 6) or ``"mnist"``
            (eps 0.3, 40 steps of 0.01, beta 6); ``None`` needs explicit values.
        norm, eps, steps, step_size: the inner PGD. beta: weight of the KL term (>= 0).
        label_smoothing / targets: soft labels for the adversarial CE term (the margin term
            keeps the hard labels).
    """

    name = "mart"
    PRESETS = PRESETS

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD-CE examples ``(B, C, H, W)`` from ``x + 0.001 * randn`` (eval mode, last iterate)."""
        return self.ce_ascent(model, x, y, start="normal")

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(x).float()                                   # (B, K)
        logits_adv = model(x_adv).float()                           # (B, K)
        adv_probs = F.softmax(logits_adv, dim=1)                    # (B, K)
        top2 = adv_probs.argsort(dim=1)[:, -2:]                     # (B, 2) second, first
        wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # (B,) best wrong class
        margin = -torch.log(1.0001 - adv_probs.gather(1, wrong[:, None]).squeeze(1) + 1e-12)  # (B,)
        bce = self.ce(logits_adv, x, y) + margin                    # (B,)
        nat_probs = F.softmax(logits, dim=1)                        # (B, K)
        true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)     # (B,)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)  # (B,)
        per = bce + self.beta * kl * (1.0000001 - true_probs)
        loss = reduce(per, reduction)
        return loss, accuracy_logs(loss, logits, logits_adv, y, bce=bce, kl=kl)
