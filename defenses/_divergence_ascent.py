"""The TRADES-style inner maximization for any divergence between the adversarial and the clean
prediction (ARoW: KL from a uniform start; SCORE: squared error between the probabilities).

TRADES itself is this loop with the KL and the ``x + 0.001 * randn`` start; the successors pick
their divergence and start without re-deriving the loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from defenses._adversarial import AdversarialObjective
from robustkit.modes import eval_mode

# divergence(logits_adv (B, K), logits_clean (B, K)) -> (B,) per-sample divergence
Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def squared_error(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """``||softmax(adv) - softmax(clean)||_2^2`` per sample ``(B,)`` (SCORE's LSE distance)."""
    return (F.softmax(logits_adv.float(), dim=1) - F.softmax(logits_clean.float(), dim=1)).pow(2).sum(1)


def divergence_ascent(obj: AdversarialObjective, model: nn.Module, x: torch.Tensor, divergence: Divergence,
                      start: str) -> torch.Tensor:
    """``x'`` ``(B, C, H, W)`` maximizing ``divergence(f(x'), f(x))`` summed over the batch in the ball of
    ``obj.tm``: ``obj.steps`` steepest-ascent steps of ``obj.step_size`` (``ThreatModel.step``), projected
    onto the ball and ``[0, 1]``, in eval mode (batch-norm statistics untouched), input gradients only.
    ``start``: ``"uniform"`` (in the ball), ``"normal"`` (``x + 0.001 * randn``) or ``"none"``."""
    x = x.detach()
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            logits_clean = model(x)                                 # (B, K), fixed target
        x_adv = obj.start(x, start)
        for _ in range(obj.steps):
            x_adv.requires_grad_(True)
            loss = divergence(model(x_adv), logits_clean).sum()
            (grad,) = torch.autograd.grad(loss, [x_adv])            # input gradient only
            x_adv = obj.tm.project(obj.tm.step(x_adv.detach(), grad, obj.step_size), x)
    return x_adv.detach()
