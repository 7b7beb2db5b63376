"""EMMA (Hu et al. 2023): efficient margin maximisation for Lipschitz-certified training.

Hu, Zou, Wang, Fredrikson, "Unlocking Deterministic Robustness Certification on ImageNet",
NeurIPS 2023 (https://arxiv.org/abs/2301.12549), Sec. 4; code ``hukkai/liresnet``
(``models/margin_layer.py: emma_loss``, ``train.py: eps_fn``). With logits shifted so
``z_y = 0``, ``K_yj = L_body * ||W_y - W_j||`` the Lipschitz constant of the margin
``z_y - z_j`` (``L_body``: the network before its last linear layer ``W``), every non-target
logit is pushed up by the worst case over an ``eps``-ball, with a per-class radius that stops at
the class's current margin:

    eps_j = clip(-z_j / (eps * K_yj), 0.01, 1)   (no gradient)
    loss  = CE(z + eps_j * eps * K_y, y)

At ``eps = 0`` this is plain cross-entropy. Training radius schedule of the official code: over
the first ``ramp_fraction`` (1/2) of training ``eps_train`` goes linearly from ``min_ratio * eps``
(0.1) to ``max_ratio * eps`` (3.0) and stays there; the official code steps it per epoch, we use
the continuous progress (``StepContext.progress``). CIFAR-10 / ImageNet use eps = 36/255.

``L_body`` comes from ``robustkit._lipschitz_nets.lipschitz_split``: the training estimate for the
built-in Lipschitz nets (``sll-small``, ``liresnet-small``; LiResConv blocks use power iteration
as the official code does), or the product of per-layer norms for a plain Conv2d/Linear/ReLU
``nn.Sequential``. Its gradient flows, so training also keeps the constant small. The logged
``certified_acc`` is the batch's certified accuracy at the *training* radius with that estimate
(a progress indicator; certificates use ``lipschitz_bound()``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses._adversarial import check_positive, resolve_preset
from defenses.base import Defense, StepContext
from robustkit._lipschitz_nets import lipschitz_split
from robustkit.modes import eval_mode
from robustkit.registry import DEFENSES
from robustkit.threat import parse_eps
from robustkit.validate import number

# cifar10: the official configs (configs/cifar10.yaml: eps 36/255, min_eps 0.1, max_eps 3.0; the ramp
# over the first half of training in train.py). mnist: GloRo's small MNIST radius (Leino et al. 2021,
# eps 0.3) with the same schedule -- not a setting of the EMMA paper, which has no MNIST experiment.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 36 / 255, "min_ratio": 0.1, "max_ratio": 3.0, "ramp_fraction": 0.5},
    "mnist": {"eps": 0.3, "min_ratio": 0.1, "max_ratio": 3.0, "ramp_fraction": 0.5},
}


def emma_logits(logits: torch.Tensor, y: torch.Tensor, k_y: torch.Tensor, eps: float) -> torch.Tensor:
    """EMMA's worst-case logits ``(B, K)``: ``z - z_y`` plus ``eps_j * eps * K_yj`` per class.

    logits ``(B, K)``, y ``(B,)``, k_y ``(B, K)`` the margin constants ``K_yj`` (0 at ``j = y``)."""
    z = logits - logits.gather(1, y.view(-1, 1))                       # (B, K), z_y = 0
    margin = eps * k_y                                                 # (B, K)
    eps_j = (-z / margin.clamp_min(1e-8)).clamp(0.01, 1.0).detach()    # (B, K), the official clip
    return z + eps_j * margin


@DEFENSES.register("emma", help="EMMA (Hu et al. 2023): CE on logits pushed up by eps * L_yj, for Lipschitz nets")
class EMMA(Defense):
    """The EMMA loss with the official radius schedule.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (eps 36/255) or ``"mnist"`` (eps 0.3), both with the official
            schedule (0.1 -> 3.0 times eps over the first half of training); ``None`` needs all.
        eps: the L2 certification radius (pixel space), e.g. 0.141 or "36/255".
        min_ratio, max_ratio: ``eps_train`` ramps ``min_ratio * eps -> max_ratio * eps``.
        ramp_fraction: share of training the ramp takes (0 = ``max_ratio * eps`` from the start).

    Without ``before_loss`` (used outside the Trainer) the final radius ``max_ratio * eps`` applies.
    """

    name = "emma"
    PRESETS = PRESETS

    def __init__(self, *, preset: str | None = "cifar10", eps: float | str | None = None,
                 min_ratio: float | None = None, max_ratio: float | None = None,
                 ramp_fraction: float | None = None) -> None:
        p = resolve_preset(PRESETS, preset, eps=eps, min_ratio=min_ratio, max_ratio=max_ratio,
                           ramp_fraction=ramp_fraction)
        self.preset = preset or "custom"
        self.eps = parse_eps(p["eps"])
        self.min_ratio = check_positive("min_ratio", p["min_ratio"], allow_zero=True)
        self.max_ratio = check_positive("max_ratio", p["max_ratio"], allow_zero=True)
        self.ramp_fraction = number("ramp_fraction", p["ramp_fraction"], 0.0, 1.0)
        self._eps_train = self.eps_at(1.0)

    def eps_at(self, progress: float) -> float:
        """``eps_train`` after ``progress`` (in [0, 1]) of training."""
        ratio = 1.0 if self.ramp_fraction == 0 else min(progress / self.ramp_fraction, 1.0)
        return self.eps * (self.min_ratio + (self.max_ratio - self.min_ratio) * ratio)

    def check_model(self, model: nn.Module) -> None:
        """``InputError`` unless ``model`` has the split EMMA needs (the train pipeline asks before it writes
        anything). Eval mode and no gradient: nothing is updated (LiResConv's power-iteration state)."""
        with torch.no_grad(), eval_mode(model):
            lipschitz_split(model)

    def before_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        self._eps_train = self.eps_at(ctx.progress)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(x)                                              # (B, K)
        lc, w = lipschitz_split(model)                                 # scalar, (K, d)
        pairwise = (w.unsqueeze(1) - w.unsqueeze(0)).norm(dim=-1)      # (K, K): ||W_i - W_j||
        k_y = lc * pairwise[y]                                         # (B, K)
        worst = emma_logits(logits, y, k_y, self._eps_train)           # (B, K)
        loss = F.cross_entropy(worst, y)
        with torch.no_grad():
            z = logits - logits.gather(1, y.view(-1, 1))
            others = F.one_hot(y, logits.shape[1]).bool()
            certified = (z + self._eps_train * k_y).masked_fill(others, -float("inf")).amax(1) < 0
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean().detach(),
                      "certified_acc": certified.float().mean(), "eps_train": self._eps_train,
                      "lipschitz": float(lc.detach())}
