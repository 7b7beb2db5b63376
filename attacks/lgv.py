"""LGV: I-FGSM / PGD on a collection of surrogates, one member per iteration, for transferability.

Gubri, Cordy, Papadakis, Le Traon, Sen, "LGV: Boosting Adversarial Example Transferability from
Large Geometric Vicinity", ECCV 2022 (https://arxiv.org/abs/2207.13129; code
``Framartin/lgv-geometric-transferability``, ``utils/attacks.py``). The surrogates are weight
snapshots collected along a constant, high-learning-rate SGD run from a trained model
(``robustkit.app.lgv``); the attack computes iteration ``t``'s input gradient on member
``t mod K`` (the code's ``estimators[i % len(estimators)]``), so over a cycle it ascends the
average loss of the collection at the cost of one model per step.

Paper defaults (ImageNet, L-inf): eps 4/255, 50 iterations, step eps/10, no random start
(I-FGSM), cross-entropy, true labels. Like the code (and unlike our PGD, which keeps the first
iterate that fools the surrogate) the result is the *last* iterate: stopping when the surrogate
is fooled would weaken transfer. ``success`` is judged on the collection's averaged logits.

On a plain model (a collection of one) this is PGD without early exit; up to the step where
our PGD stops, the two trajectories are identical (``ThreatModel`` start / step / projection).
"""

from __future__ import annotations

import torch
from torch import nn

from attacks._compact import DEFAULT_SEED, autocast, make_generator
from attacks._losses import ce_loss
from attacks.base import Attack, AttackResult
from attacks.ensemble import members_of
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel, parse_eps, parse_norm
from robustkit.validate import integer, positive


@ATTACKS.register("lgv", help="LGV (Gubri et al. 2022): I-FGSM cycling over a model collection, for transfer")
class LGV(Attack):
    """I-FGSM / PGD whose iteration ``t`` takes its gradient on member ``t mod K`` of a
    ``ModelCollection`` (any other model: itself).

    Args (defaults: the paper's):
        norm: ``"linf"`` or ``"l2"`` ("linf").
        eps: ball radius (required; the paper: 4/255 on ImageNet).
        steps: iterations (50).
        step_size: ``None`` -> ``eps / 10``.
        random_start: start uniformly in the ball (False: I-FGSM; True: PGD).
        seed: seed of the random start (0).
        amp: autocast the forwards (False).

    Result: ``x_adv (B, C, H, W)`` the last iterate, inside the ball and ``[0, 1]``; ``success``
    the collection's (mean-logit) label differs from ``y``; ``queries`` ``steps + K`` forwards.
    """

    name = "lgv"

    def __init__(self, *, norm: str = "linf", eps: float | str, steps: int = 50, step_size: float | None = None,
                 random_start: bool = False, seed: int | None = DEFAULT_SEED, amp: bool = False) -> None:
        self.norm = parse_norm(norm)
        self.eps = parse_eps(eps)
        self.steps = integer("steps", steps, 0)
        self.step_size = self.eps / 10 if step_size is None else positive("step_size", step_size)
        self.random_start, self.amp = bool(random_start), bool(amp)
        self.seed = None if seed is None else integer("seed", seed)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        members = members_of(model)
        tm = ThreatModel(self.norm, self.eps)
        xa = tm.random_start(x, make_generator(x.device, self.seed)) if self.random_start else x.clone()
        for t in range(self.steps):
            xg = xa.detach().requires_grad_(True)
            with autocast(x.device, self.amp):
                logits = members[t % len(members)](xg)                       # (B, K)
            loss = ce_loss(logits, y).sum()
            (g,) = torch.autograd.grad(loss, xg)                              # input gradient only
            with torch.no_grad():
                xa = tm.project(tm.step(xa, g, self.step_size), x)
        with torch.no_grad(), autocast(x.device, self.amp):
            pred = model(xa).argmax(1)
        b = x.shape[0]
        k = len(members)                                                      # the final judgment: every member
        queries = torch.full((b,), self.steps + k, dtype=torch.long, device=x.device)
        return AttackResult(xa.detach(), pred != y, queries,
                            {"forward_passes": b * (self.steps + k), "backward_passes": b * self.steps, "members": k})
