"""Doubly-robust instance reweighting (Sow et al. 2024): KL-regularized DRO weights over the
per-sample adversarial losses.

Sow, Lin, Wang, Liang, "Doubly Robust Instance-Reweighted Adversarial Training", ICLR 2024
(https://openreview.net/forum?id=OF5x1dzWSS, arXiv 2308.00311; the issue calls it "Xu et al. 2023").
The authors' code is in the paper's supplement, not in a public repository we could read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from defenses._adversarial import AdversarialObjective, TargetsFn, accuracy_logs, check_positive, reduce
from defenses.base import replicated
from robustkit.registry import DEFENSES

# The attack is PGD-AT's (the paper builds on the bilevel PGD-AT formulation): CIFAR-10 eps 8/255,
# 10 steps of 2/255 from a uniform start; MNIST-like: eps 0.3, 40 steps of 0.01. r = 1: see the class.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 8 / 255, "steps": 10, "step_size": 2 / 255, "r": 1.0},
    "mnist": {"eps": 0.3, "steps": 40, "step_size": 0.01, "r": 1.0},
}


def dro_weights(losses: torch.Tensor, r: float, model: nn.Module | None = None) -> torch.Tensor:
    """The closed-form maximizer of ``sum_i w_i l_i - r KL(w || uniform)`` over the simplex:
    ``w = softmax(l / r)`` ``(B,)``, detached. Under DDP (``model`` a replica) the softmax runs over
    the *global* batch (one max and one sum all-reduce), and each rank's weights are multiplied by
    the number of ranks, so DDP's gradient average equals the 1-process gradient of the global batch."""
    z = losses.detach().float() / r                                  # (B,)
    if model is None or not replicated(model):
        return torch.softmax(z, dim=0)
    m = z.max().clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)                        # global max (stable exp)
    e = torch.exp(z - m)                                            # (B,)
    total = e.sum()
    dist.all_reduce(total)                                          # global sum
    return e / total * dist.get_world_size()


@DEFENSES.register("doubly-robust", help="doubly-robust instance reweighting (Sow et al. 2024): "
                   "softmax(CE_adv / r)-weighted PGD-AT")
class DoublyRobust(AdversarialObjective):
    """``sum_i w_i CE(f(x'_i), y_i)`` with ``w = softmax(CE(f(x'), y) / r)`` over the batch, ``x'`` by PGD.

    The paper's outer problem (Eq. 5) is ``min_theta max_{w in simplex} sum_i w_i l_i(theta, x'_i) -
    r KL(w || 1/n)``; its inner max has the closed form ``w_i = exp(l_i / r) / sum_j exp(l_j / r)``,
    so the objective is ``r log(mean_i exp(l_i / r))`` (Eq. 6). Its gradient is
    ``sum_i w_i grad l_i`` with ``w`` held fixed, which is what this objective computes (weights
    detached): the least robust samples get exponentially more weight; ``r -> inf`` is PGD-AT,
    ``r -> 0`` trains on the worst sample only.

    Where we differ from the paper (which we could only read in summary, the code not at all):
    * the normalizer ``sum_j exp(l_j / r)`` is taken over the batch (the global batch under DDP), not
      over the whole training set through the CID algorithm's moving-average estimate, so the method
      is stateless (nothing to checkpoint; resume is exact as for PGD-AT);
    * the attack is plain PGD on the cross-entropy, not the paper's log-barrier-penalized attack
      (a device of its convergence proof);
    * ``r = 1`` is our default, not checked against the paper's experiment section.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (eps 8/255, 10 steps of 2/255, r 1) or ``"mnist"`` (eps 0.3, 40 steps of
            0.01, r 1); ``None`` needs explicit values.
        norm, eps, steps, step_size: the inner PGD. r: the KL regularization strength (> 0).
        label_smoothing / targets: soft labels for the adversarial CE.
    """

    name = "doubly-robust"
    PRESETS = PRESETS

    def __init__(self, *, preset: str | None = "cifar10", norm: str = "linf", eps: float | str | None = None,
                 steps: int | None = None, step_size: float | str | None = None, r: float | None = None,
                 label_smoothing: float = 0.0, targets: TargetsFn | None = None) -> None:
        knobs = self._setup(preset, norm, eps, steps, step_size, label_smoothing, targets, r=r)
        self.r = float(check_positive("r", knobs["r"]))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD-CE examples ``(B, C, H, W)`` from a uniform start (eval mode, last iterate)."""
        return self.ce_ascent(model, x, y, start="uniform")

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        logits_adv = model(x_adv)                                   # (B, K)
        ce = self.ce(logits_adv, x, y)                              # (B,)
        w = dro_weights(ce, self.r, model)                          # (B,), sums to 1 (x ranks under DDP)
        loss = reduce(len(ce) * w * ce, reduction)                  # mean: sum_i w_i l_i
        return loss, accuracy_logs(loss, None, logits_adv, y, ce=ce, max_weight=w.max() / w.sum())
