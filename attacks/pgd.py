"""Projected gradient descent (PGD), L-inf and L2, with restarts and per-sample early exit.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018 (https://arxiv.org/abs/1706.06083). DLR loss: Croce & Hein,
"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020 (https://arxiv.org/abs/2003.01690). PGD is the shared attack loop
(``attacks._loop``) with a fixed step.
"""

from __future__ import annotations

import torch
from torch import nn

from attacks._compact import DEFAULT_SEED, compact_every, make_generator
from attacks._loop import FixedStep, LoopOptions, Record, run
from attacks._losses import check_classes, loss_fn
from attacks.base import Attack, AttackResult, num_classes_of
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel, parse_eps, parse_norm
from robustkit.validate import integer, one_of, positive

PGD_LOSSES = ("ce", "dlr", "margin")


@ATTACKS.register("pgd", help="PGD (Madry et al. 2018), L-inf / L2, restarts, CE / DLR / margin loss")
class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) on an ``eps``-ball in ``norm``.

    Each step ascends the loss with the threat model's steepest-ascent step (L-inf:
    ``sign(g)``; L2: ``g / ||g||_2``) and projects onto the ball and ``[0, 1]``
    (``ThreatModel.project``). Gradients are taken w.r.t. the input only.

    Args (defaults):
        norm: ``"linf"`` or ``"l2"`` ("linf").
        eps: ball radius; a number or a string such as ``"8/255"`` (required).
        steps: gradient steps per restart (10).
        step_size: step length; ``None`` -> ``2.5 * eps / steps`` (Madry et al. 2018).
        restarts: random restarts; each later restart runs, batched, only on the samples
            still standing (1).
        random_start: start uniformly inside the ball (True, as in Madry et al.).
        loss: ``"ce"``, ``"dlr"`` (Croce & Hein 2020; needs >= 3 classes, targeted >= 4,
            else ``InputError``) or ``"margin"`` (C&W-style) ("ce"); see ``attacks._losses``.
        targeted: ``y`` holds target labels; the loss is descended towards them (False).
            Targeted DLR is eq. 5 against the strongest non-target class of each iterate.
        early_stop: samples that succeeded leave the active batch (index compaction), so
            per-step work tracks the samples still standing (True).
        amp: autocast the forward (bf16; fp16 on CUDA GPUs without bf16) (False).
        channels_last: feed inputs in channels_last memory format; convert the model with
            ``model.to(memory_format=torch.channels_last)`` yourself (False).
        seed: seed of the random starts on ``x.device`` (0); ``None`` uses the global RNG.

    Result: ``x_adv (B, C, H, W)`` -- per sample the *first* successful iterate (in both
    early-stop modes, so they agree), else the highest-loss iterate over all restarts --
    always inside the ball and ``[0, 1]``. Success is read from the forward pass that also
    computes the gradient (iterate ``t``'s logits tell whether iterate ``t`` succeeds), plus
    one final forward for the last iterate: a restart costs ``steps + 1`` forwards and
    ``steps`` backwards per sample that stays active. ``queries (B,)`` counts forward passes
    per sample; ``info["forward_passes"]`` / ``info["backward_passes"]`` are sample-weighted
    totals (sum over samples of passes), ``info["model_calls"]`` counts batched calls.
    """

    name = "pgd"

    def __init__(self, *, norm: str = "linf", eps: float | str, steps: int = 10, step_size: float | None = None,
                 restarts: int = 1, random_start: bool = True, loss: str = "ce", targeted: bool = False,
                 early_stop: bool = True, amp: bool = False, channels_last: bool = False,
                 seed: int | None = DEFAULT_SEED) -> None:
        self.norm = parse_norm(norm)
        self.eps = parse_eps(eps)
        self.steps = integer("steps", steps, 0)
        self.restarts = integer("restarts", restarts, 1)
        self.step_size = None if step_size is None else positive("step_size", step_size)
        self.loss = one_of("loss", loss, PGD_LOSSES)
        self.random_start, self.targeted, self.early_stop = bool(random_start), bool(targeted), bool(early_stop)
        self.amp, self.channels_last = bool(amp), bool(channels_last)
        self.seed = None if seed is None else integer("seed", seed)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        name = "dlr-targeted" if self.targeted and self.loss == "dlr" else self.loss
        check_classes(name, num_classes_of(model))
        tm = ThreatModel(self.norm, self.eps)
        rule = FixedStep(self.step_size if self.step_size is not None else float(tm.default_step_size(self.steps)))
        opts = LoopOptions(compact_every(x.device) if self.early_stop else None, self.amp, self.channels_last,
                           make_generator(x.device, self.seed))
        record = Record.start(x)
        for r in range(self.restarts):
            owners = torch.arange(x.shape[0], device=x.device) if r == 0 else (~record.fooled).nonzero().squeeze(1)
            if owners.numel() == 0:
                break
            run(model, x, y, record, tm, rule, loss_fn(name, self.targeted), self.steps, owners, opts,
                targeted=self.targeted, random_start=self.random_start)
        x_adv = tm.project(record.x, x)  # a no-op up to rounding: the guarantee, in one place
        return AttackResult(x_adv, record.fooled, record.queries, record.info())
