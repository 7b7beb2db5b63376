"""Fast ensemble: a cheap stand-in for AutoAttack's standard version (Croce & Hein 2020).

Stages, each only on the points still standing (batched, early exit, compaction):

1. APGD-CE, ``n_iter`` iterations, one random start;
2. APGD-T: targeted DLR towards the ``n_targets`` most likely wrong classes (3 by default;
   AutoAttack uses 9), one target after the other;
3. optional ``extra``: ``"apgd-dlr"`` (untargeted DLR, a fresh random start) or
   ``"apgd-ce"`` (a second CE random start).

AutoAttack standard adds FAB-T and Square (5,000 queries) after stage 2; on most
non-obfuscated models they break few extra points but cost most of the time. The aim is
AutoAttack's robust accuracy within a point at <= 1/5 of its wall-clock; the benchmark
``benchmarks/fast_vs_autoattack.py`` measures both. Norms: ``linf``, ``l2``.
"""

from __future__ import annotations

import torch
from torch import nn

from attacks._compact import DEFAULT_SEED, compact_every, make_generator
from attacks._loop import LoopOptions, Record, logits_counted
from attacks._losses import check_classes
from attacks.apgd import apgd_stage, apgd_targeted, finish
from attacks.base import Attack, AttackResult
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel
from robustkit.validate import integer, number, one_of

EXTRAS = ("apgd-dlr", "apgd-ce")


@ATTACKS.register("fast", help="batched early-exit ensemble: APGD-CE + APGD-T (top-k targets), AutoAttack-like")
class FastEnsemble(Attack):
    """APGD-CE then APGD-T over the top-``n_targets`` classes, on the remaining points only.

    Args (keyword-only): ``norm``, ``eps``; ``n_iter`` (100, per stage and target);
    ``n_targets`` (3); ``extra`` (None, ``"apgd-dlr"`` or ``"apgd-ce"``); ``rho`` (0.75);
    ``amp``, ``channels_last`` (False, as in APGD); ``seed`` (0). Untargeted only. APGD-T's
    targeted DLR needs >= 4 classes (``InputError`` otherwise, before any attack work).

    Returns ``AttackResult``: ``x_adv (B, C, H, W)`` inside the ball and ``[0, 1]``,
    ``success (B,)``, ``queries (B,)``; ``info["broken_by"]`` names, per sample, the stage that
    broke it (``"clean"`` for points misclassified without attack, ``None`` if still robust),
    and ``info["robust_after"]`` the robust accuracy after each stage.
    """

    name = "fast"

    def __init__(self, *, norm: str = "linf", eps: float | str = 8 / 255, n_iter: int = 100, n_targets: int = 3,
                 extra: str | None = None, rho: float = 0.75, amp: bool = False, channels_last: bool = False,
                 seed: int | None = DEFAULT_SEED) -> None:
        self._tm = ThreatModel(norm, eps)
        self.extra = None if extra is None else one_of("extra", extra, EXTRAS)
        self.n_iter, self.n_targets = integer("n_iter", n_iter, 1), integer("n_targets", n_targets, 1)
        self.rho = number("rho", rho, 0.0, 1.0, strict_min=True)
        self.norm, self.eps = self._tm.norm, float(self._tm.eps)
        self.amp, self.channels_last = bool(amp), bool(channels_last)
        self.seed = None if seed is None else integer("seed", seed)

    def stages(self) -> list[str]:
        return ["apgd-ce", "apgd-t"] + ([self.extra] if self.extra else [])

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        tm = self._tm
        opts = LoopOptions(compact_every(x.device), self.amp, self.channels_last, make_generator(x.device, self.seed))
        record = Record.start(x)
        logits0 = logits_counted(model, x, record, opts)                     # (B, K)
        for stage in self.stages():
            check_classes("dlr-targeted" if stage == "apgd-t" else stage.removeprefix("apgd-"), logits0.shape[1])
        record.fooled = logits0.argmax(1) != y
        broken_by: list[str | None] = ["clean" if s else None for s in record.fooled.tolist()]
        b = x.shape[0]
        robust_after = {"clean": float((~record.fooled).sum()) / b}
        kw = dict(n_iter=self.n_iter, rho=self.rho)
        for stage in self.stages():
            before = record.fooled.clone()
            if stage == "apgd-t":
                apgd_targeted(model, x, y, logits0, record, tm, opts, n_targets=self.n_targets, **kw)
            else:
                apgd_stage(model, x, y, record, tm, opts, loss=stage.removeprefix("apgd-"), **kw)
            for i in (record.fooled & ~before).nonzero().squeeze(1).tolist():
                broken_by[i] = stage
            robust_after[stage] = float((~record.fooled).sum()) / b
        x_adv, success = finish(model, x, y, record, tm, opts, targeted=False)
        broken_by = [b if s else None for b, s in zip(broken_by, success.tolist())]
        info = {**record.info(), "broken_by": broken_by, "robust_after": robust_after}
        return AttackResult(x_adv, success, record.queries, info)
