"""CPR: consistent prediction-based rejection, and the adaptive attacks that evaluate it.

Chen, Raghuram, Choi, Wu, Liang, Jha, "Stratified Adversarial Robustness with Rejection", ICML 2023
(https://arxiv.org/abs/2305.01139); code ``jfc43/stratified-adv-rej`` (``eval_cpr.py``
``ConsistentRejDefense``, ``attacks/mb_pgd_attack.py``, ``utils/constants.py``).

CPR wraps any classifier ``f``: with ``p = argmax f(x)``, an inner attack looks for the point
``x~`` of the small ball ``B(x, eps_rej)`` with the highest ``CE(f(x~), p)``; ``x`` is **rejected**
when ``argmax f(x~) != p`` (the prediction is not consistent in the ball), else ``p`` is returned.
The code's inner attack (``MBLinfPGDAttack``, ``UntargetedObjective(classification_loss)``) starts at
``x`` (``rand_init_name "zero"``), takes ``steps`` signed-gradient steps of a fixed ``step_size``
(``backtrack False``, ``momentum 0``), projects onto the ball and ``[0, 1]``, and keeps the iterate of
highest loss (the start included); we do the same with ``ThreatModel`` (so L2 works too). Its defaults:
MNIST ``eps_rej 0.1``, 20 steps of 0.01; CIFAR-10 / SVHN / GTSRB ``eps_rej 0.0055``, 10 steps of 0.001
(``PRESETS``). CPR needs no training: it is a test-time defense of any ``RobustModel``.

The adaptive attacks of the paper's evaluation (BPDA through CPR's inner attack: its perturbation
``d(x') = x~(x') - x'`` is treated as a constant, as in ``MBCONSRLinfPGDAttack.get_loss``):

- ``outer_attack`` (the code's CHCMOA): find ``x'`` in ``B(x, eps)`` that CPR *accepts* and misclassifies:
  ascend ``CE(f(x'), y) + CE(f(x' + d(x')), y)`` and, per target class ``t`` (``targets`` of them, the code
  all ``K - 1``), ``log p_t(x') + log p_t(x' + d(x'))``; every iterate is checked.
- ``inner_attack`` (the code's CLCIA): find ``x'`` in ``B(x, eps0)``, ``eps0 = alpha * eps``, that CPR
  *rejects*: ascend ``U(f(x')) + U(f(x' + d(x')))`` with the low-confidence loss
  ``U(z) = logsumexp(z) - logsumexp(100 z) / 100`` (``uniform_confidence_loss``); every iterate is checked.

The code runs 200 steps with momentum 0.9 and 5 restarts over three learning rates; we run plain PGD
with ``restarts`` random starts (the first from the uniform start, as its ``rand_init_name "random"``)
and fewer default steps, and add the registered attacks (PGD, AutoAttack) on the base model as further
outer candidates (the code's ``eval_outer_attack`` with ``auto_attack``). ``robustkit.app.reject``
combines them into the stratified metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.errors import InputError
from robustkit.modes import eval_mode
from robustkit.threat import ThreatModel, parse_eps, parse_norm
from robustkit.validate import integer, positive

# eval_cpr.py's defense_attack_params per dataset.
PRESETS: dict[str, dict[str, Any]] = {
    "mnist": {"eps_rej": 0.1, "steps": 20, "step_size": 0.01},
    "cifar10": {"eps_rej": 0.0055, "steps": 10, "step_size": 0.001},
}


@dataclass
class Rejection:
    """CPR's decision on ``B`` images: ``pred (B,)`` the base prediction, ``rejected (B,)`` bool, ``x_rej
    (B, C, H, W)`` the inner attack's highest-loss point (``x_rej - x`` is the BPDA perturbation)."""

    pred: torch.Tensor
    rejected: torch.Tensor
    x_rej: torch.Tensor


class CPR:
    """Consistent prediction-based rejection (Chen et al. 2023): ``cpr(model, x) -> Rejection``.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"mnist"`` (eps_rej 0.1, 20 steps of 0.01) or ``"cifar10"`` (0.0055, 10 steps of 0.001).
        norm: ``"linf"`` (the paper's) or ``"l2"``. eps_rej: the rejection radius. steps, step_size: the
        inner attack.
    """

    def __init__(self, *, preset: str | None = "mnist", norm: str = "linf", eps_rej: float | str | None = None,
                 steps: int | None = None, step_size: float | str | None = None) -> None:
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown CPR preset {preset!r}; valid: {', '.join(PRESETS)} (or None with explicit "
                             "eps_rej, steps, step_size)")
        base = PRESETS.get(preset or "", {})
        given = {"eps_rej": eps_rej, "steps": steps, "step_size": step_size}
        p = {k: v if v is not None else base.get(k) for k, v in given.items()}
        missing = [k for k, v in p.items() if v is None]
        if missing:
            raise InputError(f"CPR needs {', '.join(missing)} (or a preset: {', '.join(PRESETS)})")
        self.preset = preset or "custom"
        self.norm = parse_norm(norm)
        self.eps_rej = parse_eps(p["eps_rej"])
        self.steps = integer("steps", p["steps"], 0)
        self.step_size = positive("step_size", parse_eps(p["step_size"]) if isinstance(p["step_size"], str)
                                  else p["step_size"])
        self.tm = ThreatModel(self.norm, self.eps_rej)

    def params(self) -> dict[str, Any]:
        return {"rejector": "cpr", "preset": self.preset, "norm": self.norm, "eps_rej": self.eps_rej,
                "steps": self.steps, "step_size": self.step_size}

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Rejection:
        """Reject or accept each image of ``x`` ``(B, C, H, W)`` (eval mode, mode restored)."""
        x = x.detach()
        with eval_mode(model), torch.enable_grad():
            with torch.no_grad():
                pred = model(x).argmax(1)                                  # (B,)
            best, best_loss = x.clone(), torch.full((x.shape[0],), -float("inf"), device=x.device)
            x_adv = x.clone()
            for t in range(self.steps + 1):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(model(x_adv).float(), pred, reduction="none")   # (B,)
                better = loss.detach() > best_loss
                best[better], best_loss = x_adv.detach()[better], torch.where(better, loss.detach(), best_loss)
                if t == self.steps:
                    break
                (grad,) = torch.autograd.grad(loss.sum(), [x_adv])
                x_adv = self.tm.project(self.tm.step(x_adv.detach(), grad, self.step_size), x)
            with torch.no_grad():
                rejected = model(best).argmax(1) != pred                    # (B,)
        return Rejection(pred, rejected, best)


def low_confidence_loss(logits: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``logsumexp(z) - logsumexp(scale z) / scale`` ``(B,)``: ~ ``log K'`` minus the max logit's share; large
    when the prediction is close to uniform (the code's ``uniform_confidence_loss``, scaling factor 100)."""
    z = logits.float()
    return torch.logsumexp(z, 1) - torch.logsumexp(scale * z, 1) / scale


def _bpda_pgd(model: nn.Module, cpr: CPR, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
              step_size: float, restarts: int, goal: str, generator: torch.Generator | None,
              target: torch.Tensor | None = None, found: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` bool: some checked iterate reached ``goal`` (``"accept-wrong"`` or ``"reject"``); ``found``
    (updated in place) marks images already done. Images that reached the goal leave the active batch (the
    cost tracks the images still standing). ``target (B,)``: "accept-wrong" ascends ``log p_t`` instead of the
    cross-entropy (the code's multi-targeted ``ccat_targeted_loss``)."""
    tm = ThreatModel(cpr.norm, eps)
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if found is None else found
    for _ in range(restarts):
        idx = (~found).nonzero().squeeze(1)                                 # (A,) images still standing
        if idx.numel() == 0:
            break
        x0, y0 = x[idx], y[idx]
        t0 = None if target is None else target[idx]
        x_adv = tm.random_start(x0, generator)
        for t in range(steps + 1):
            rej = cpr(model, x_adv)                                         # (A,) decisions at the iterate
            hit = (~rej.rejected & (rej.pred != y0)) if goal == "accept-wrong" else rej.rejected
            found[idx[hit]] = True
            keep = ~hit
            if t == steps or not bool(keep.any()):
                break
            idx, x0, y0, x_adv = idx[keep], x0[keep], y0[keep], x_adv[keep]
            t0 = None if t0 is None else t0[keep]
            shift = (rej.x_rej[keep] - x_adv).detach()                      # BPDA: CPR's perturbation, constant
            with eval_mode(model), torch.enable_grad():
                u = x_adv.detach().requires_grad_(True)
                z, zt = model(u), model(u + shift)                          # (A, K) each
                if goal == "accept-wrong" and t0 is not None:
                    loss = -F.cross_entropy(z.float(), t0, reduction="sum") - \
                        F.cross_entropy(zt.float(), t0, reduction="sum")
                elif goal == "accept-wrong":
                    loss = F.cross_entropy(z.float(), y0, reduction="sum") + \
                        F.cross_entropy(zt.float(), y0, reduction="sum")
                else:
                    loss = (low_confidence_loss(z) + low_confidence_loss(zt)).sum()
                (grad,) = torch.autograd.grad(loss, [u])
            x_adv = tm.project(tm.step(u.detach(), grad, step_size), x0)
    return found


def outer_attack(model: nn.Module, cpr: CPR, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 20,
                 step_size: float | None = None, restarts: int = 1, targets: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B,)`` bool: a point of ``B(x, eps)`` that CPR accepts and ``model`` misclassifies was found
    (step default ``2.5 eps / steps``). The untargeted run, then ``targets`` targeted runs, one per wrong class
    in the order of ``f(x)``'s logits (the code's CHCMOA runs every wrong class: ``targets = K - 1``), each on the
    images still standing."""
    step = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    found = _bpda_pgd(model, cpr, x, y, eps, steps, step, restarts, "accept-wrong", generator)
    if targets and x.shape[0]:
        with torch.no_grad(), eval_mode(model):
            z = model(x).float()                                            # (B, K)
        z[torch.arange(x.shape[0]), y] = -float("inf")
        order = z.argsort(1, descending=True)                               # (B, K) wrong classes first
        for k in range(min(int(targets), z.shape[1] - 1)):
            if bool(found.all()):
                break
            _bpda_pgd(model, cpr, x, y, eps, steps, step, restarts, "accept-wrong", generator, order[:, k], found)
    return found


def inner_attack(model: nn.Module, cpr: CPR, x: torch.Tensor, y: torch.Tensor, *, eps0: float, steps: int = 20,
                 step_size: float | None = None, restarts: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B,)`` bool: a point of ``B(x, eps0)`` that CPR rejects was found (``eps0 = 0``: ``x`` itself)."""
    if eps0 == 0:
        return cpr(model, x).rejected
    step = 2.5 * eps0 / max(steps, 1) if step_size is None else step_size
    return _bpda_pgd(model, cpr, x, y, eps0, steps, step, restarts, "reject", generator)
