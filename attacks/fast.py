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

from attacks.apgd import APGDState, apgd_run, apgd_targeted_run, finish
from attacks.base import Attack, AttackResult
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

EXTRAS = ("apgd-dlr", "apgd-ce")


@ATTACKS.register("fast", help="batched early-exit ensemble: APGD-CE + APGD-T (top-k targets), AutoAttack-like")
class FastEnsemble(Attack):
    """APGD-CE then APGD-T over the top-``n_targets`` classes, on the remaining points only.

    Args (keyword-only): ``norm``, ``eps``; ``n_iter`` (100, per stage and target);
    ``n_targets`` (3); ``extra`` (None, ``"apgd-dlr"`` or ``"apgd-ce"``); ``rho`` (0.75);
    ``seed`` (0). Untargeted only.

    Returns ``AttackResult``: ``x_adv (B, C, H, W)`` inside the ball and ``[0, 1]``,
    ``success (B,)``, ``queries (B,)``; ``info["broken_by"]`` names, per sample, the stage that
    broke it (``"clean"`` for points misclassified without attack, ``None`` if still robust),
    and ``info["robust_after"]`` the robust accuracy after each stage.
    """

    name = "fast"

    def __init__(self, *, norm: str = "linf", eps: float | str = 8 / 255, n_iter: int = 100, n_targets: int = 3,
                 extra: str | None = None, rho: float = 0.75, seed: int | None = 0) -> None:
        self._tm = ThreatModel(norm, eps)
        if extra is not None and extra not in EXTRAS:
            raise ValueError(f"unknown extra stage {extra!r}; allowed: None, {', '.join(EXTRAS)}")
        for key, v in (("n_iter", n_iter), ("n_targets", n_targets)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        self.norm, self.eps = self._tm.norm, float(self._tm.eps)
        self.n_iter, self.n_targets, self.extra, self.rho, self.seed = n_iter, n_targets, extra, rho, seed

    def stages(self) -> list[str]:
        return ["apgd-ce", "apgd-t"] + ([self.extra] if self.extra else [])

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        tm = self._tm
        gen = None if self.seed is None else torch.Generator(device=x.device).manual_seed(int(self.seed))
        with torch.no_grad():
            logits0 = model(x)                                         # (B, K)
        state = APGDState.start(x, logits0.argmax(1) != y)
        broken_by: list[str | None] = ["clean" if s else None for s in state.success.tolist()]
        b = x.shape[0]
        robust_after = {"clean": float((~state.success).sum()) / b}
        kw = dict(n_iter=self.n_iter, rho=self.rho, generator=gen)
        for stage in self.stages():
            before = state.success.clone()
            if stage == "apgd-t":
                apgd_targeted_run(model, x, y, logits0, state, tm, n_targets=self.n_targets, **kw)
            else:
                apgd_run(model, x, y, state, tm, loss=stage.removeprefix("apgd-"), **kw)
            for i in (state.success & ~before).nonzero().squeeze(1).tolist():
                broken_by[i] = stage
            robust_after[stage] = float((~state.success).sum()) / b
        x_adv, success = finish(model, x, state, tm, y, targeted=False)
        broken_by = [b if s else None for b, s in zip(broken_by, success.tolist())]
        return AttackResult(x_adv, success, state.queries,
                            {"forward_passes": state.forward_passes, "backward_passes": state.backward_passes,
                             "broken_by": broken_by, "robust_after": robust_after})
