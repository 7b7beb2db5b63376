"""APGD: Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML, arXiv:2003.01690, Alg. 1).

PGD with momentum whose step size needs no tuning: it starts at ``eta = 2 * eps`` and is
halved at checkpoints ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``
(fractions of ``n_iter``) when either

1. the loss went up in at most a fraction ``rho`` of the steps since the last checkpoint, or
2. the step size was not halved at the last checkpoint and the best loss has not improved since;

after a halving the iterate restarts from the best point found. The update is
``z = P(x_k + eta * s(grad))``, ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``
with ``alpha = 0.75`` (1 on the first step) and ``P`` the projection of ``ThreatModel``.
Defaults follow the paper: ``n_iter=100``, ``rho=0.75``, ``alpha=0.75``, one restart,
APGD-T over the top-9 target classes.

Losses: ``ce``; ``dlr`` (eq. 4); ``dlr-targeted`` (eq. 5). Untargeted with ``dlr-targeted``
is APGD-T: the goal stays misclassification; the loss pulls towards each of the ``n_targets``
most likely wrong classes in turn (on the points still standing). Norms: L-inf and L2.

Hot path: gradients w.r.t. the input only; samples leave the active batch the step they are
misclassified (compaction); restarts run batched as copies of the still-robust samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks._losses import ce_loss, dlr_loss, dlr_targeted_loss, margin_loss
from attacks.base import Attack, AttackResult
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

APGD_LOSSES = ("ce", "dlr", "dlr-targeted")


@dataclass
class APGDState:
    """Per-sample outputs for ``B`` original samples, filled in place by successive APGD runs."""

    x_adv: torch.Tensor       # (B, C, H, W) adversarial (or highest-loss) point so far
    success: torch.Tensor     # (B,) bool, goal reached
    best_loss: torch.Tensor   # (B,) loss of x_adv for samples not yet broken (current stage)
    queries: torch.Tensor     # (B,) int64 forward passes per sample
    forward_passes: int = 0   # batch rows through the model
    backward_passes: int = 0

    @classmethod
    def start(cls, x: torch.Tensor, success: torch.Tensor) -> APGDState:
        b = x.shape[0]
        return cls(x.clone(), success.clone(), torch.full((b,), float("-inf"), device=x.device),
                   torch.ones(b, dtype=torch.long, device=x.device), b, 0)


def _loss(name: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
          targeted_goal: bool) -> torch.Tensor:
    """Per-sample loss ``(N,)`` to maximize. DLR needs K >= 3 (targeted: K >= 4); with fewer
    classes it falls back to the (unnormalized) margin, the same direction. For a targeted goal,
    targeted DLR compares the target with the largest other logit (not with the clean label)."""
    k = logits.shape[1]
    if name == "ce":
        return -ce_loss(logits, target) if targeted_goal else ce_loss(logits, y)
    if name == "dlr":
        return dlr_loss(logits, y) if k >= 3 else margin_loss(logits, y)
    assert target is not None
    if targeted_goal:   # pull the target above the strongest other class, whichever it is now
        y = logits.detach().scatter(1, target[:, None], float("-inf")).argmax(1)
    if k >= 4:
        return dlr_targeted_loss(logits, y, target)
    z = logits.float()
    return z.gather(1, target[:, None]).squeeze(1) - z.gather(1, y[:, None]).squeeze(1)


def _goal(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, targeted_goal: bool) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == target if targeted_goal else pred != y


def apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: APGDState, tm: ThreatModel, *,
             loss: str = "ce", n_iter: int = 100, n_restarts: int = 1, rho: float = 0.75, alpha: float = 0.75,
             target: torch.Tensor | None = None, targeted_goal: bool = False,
             generator: torch.Generator | None = None) -> None:
    """One APGD run on the samples of ``state`` not yet successful; updates ``state`` in place.

    x: (B, C, H, W) clean images; y: (B,) reference labels (true labels; for a targeted goal the
    clean predictions); target: (B,) target classes or None. ``n_restarts`` random starts run
    batched as copies of each still-standing sample; a sample leaves as soon as any copy succeeds.
    """
    idx = (~state.success).nonzero().squeeze(1)                       # (M,)
    if idx.numel() == 0:
        return
    own = idx.repeat(n_restarts)                                       # (N,) owner of each copy, N = M * R
    xo, yy = x[own], y[own]                                            # (N, C, H, W), (N,)
    tt = target[own] if target is not None else None
    state.best_loss[idx] = float("-inf")

    def fwd_bwd(xa: torch.Tensor, yy: torch.Tensor, tt: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xa)                                         # (N, K)
            lv = _loss(loss, logits, yy, tt, targeted_goal)            # (N,)
            (g,) = torch.autograd.grad(lv.sum(), xa)                   # input gradient only
        state.forward_passes += xa.shape[0]
        state.backward_passes += xa.shape[0]
        return logits.detach(), lv.detach(), g.detach()

    def harvest(logits: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
        """Record successes; return the keep mask (owner still unbroken)."""
        state.queries.index_add_(0, own, torch.ones_like(own))
        hit = _goal(logits, yy, tt, targeted_goal)                     # (N,)
        if bool(hit.any()):
            first = _first_per_owner((hit & ~state.success[own]).nonzero().squeeze(1), own)
            state.x_adv[own[first]] = xa[first]
            state.success[own[hit]] = True
        return ~state.success[own]

    def ball(own: torch.Tensor) -> ThreatModel:                        # per-sample eps follows the copies
        return ThreatModel(tm.norm, tm.eps.to(x.device)[own]) if isinstance(tm.eps, torch.Tensor) else tm

    tmc = ball(own)
    xa = tmc.random_start(xo, generator)                               # (N, C, H, W)
    logits, lv, g = fwd_bwd(xa, yy, tt)
    keep = harvest(logits, xa)
    xp, xb, gb, lb, lprev = xa.clone(), xa.clone(), g.clone(), lv.clone(), lv.clone()
    n = xa.shape[0]
    eps0 = tm.eps.to(x.device, torch.float32)[own] if isinstance(tm.eps, torch.Tensor) else float(tm.eps)
    step = 2.0 * eps0 * torch.ones(n, device=x.device)                 # eta_0 = 2 eps, (N,)
    n_incr = torch.zeros(n, device=x.device)
    lb_ck, red_ck = lb.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    # checkpoints, as in the reference implementation: first after 22% of the iterations, the
    # interval then shrinks by 3% per checkpoint down to 6%.
    k, k_min, k_decr, since = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1), 0

    for i in range(n_iter):
        if not bool(keep.all()):                                      # compaction
            if not bool(keep.any()):
                return
            own, xo, yy, xa, xp, xb, g, gb = (t[keep] for t in (own, xo, yy, xa, xp, xb, g, gb))
            lb, lprev, step, n_incr, lb_ck, red_ck = (t[keep] for t in (lb, lprev, step, n_incr, lb_ck, red_ck))
            tt = tt[keep] if tt is not None else None
            tmc = ball(own)
        a = alpha if i > 0 else 1.0
        with torch.no_grad():
            z = tmc.project(tmc.step(xa, g, step), xo)
            xn = tmc.project(xa + a * (z - xa) + (1 - a) * (xa - xp), xo)
        xp, xa = xa, xn
        logits, lv, g = fwd_bwd(xa, yy, tt)
        keep = harvest(logits, xa)
        n_incr += (lv > lprev).float()
        lprev = lv
        better = lv > lb                                               # (N,)
        xb = torch.where(better.view(-1, 1, 1, 1), xa, xb)
        gb = torch.where(better.view(-1, 1, 1, 1), g, gb)
        lb = torch.where(better, lv, lb)
        since += 1
        if since == k:                                                 # checkpoint: conditions 1 and 2
            halve = (n_incr <= rho * k) | (~red_ck & (lb_ck >= lb))
            step = torch.where(halve, step / 2, step)
            xa = torch.where(halve.view(-1, 1, 1, 1), xb, xa)
            g = torch.where(halve.view(-1, 1, 1, 1), gb, g)
            red_ck, lb_ck, n_incr, since = halve, lb.clone(), torch.zeros_like(n_incr), 0
            k = max(k - k_decr, k_min)

    # unbroken samples keep their highest-loss point (over copies): per-owner max, then assign
    keep_own, lb, xb = own[keep], lb[keep], xb[keep]
    if keep_own.numel():
        best = torch.full_like(state.best_loss, float("-inf")).scatter_reduce(0, keep_own, lb, "amax")
        win = _first_per_owner(((lb >= best[keep_own]) & (lb > state.best_loss[keep_own])).nonzero().squeeze(1),
                               keep_own)
        state.x_adv[keep_own[win]] = xb[win]
        state.best_loss[keep_own[win]] = lb[win]


def _first_per_owner(cand: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """From copy indices ``cand`` (ascending), keep the first copy of each owner, so that writes
    ``out[own[c]] = ...`` have unique targets (duplicate-index writes are nondeterministic)."""
    if cand.numel() <= 1:
        return cand
    _, inv = torch.unique(own[cand], return_inverse=True)
    pos = torch.arange(cand.numel(), device=cand.device)
    first = torch.full((int(inv.max()) + 1,), cand.numel(), device=cand.device).scatter_reduce(0, inv, pos, "amin")
    return cand[first]


def top_targets(logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most likely classes other than ``y``, most likely first: ``(B, n)``."""
    z = logits.float().scatter(1, y[:, None], float("-inf"))
    return z.topk(min(n, logits.shape[1] - 1), dim=1).indices


def apgd_targeted_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits0: torch.Tensor,
                      state: APGDState, tm: ThreatModel, *, n_targets: int = 9, **kw: object) -> None:
    """APGD-T (Croce & Hein 2020, Sec. 5): targeted DLR towards the ``n_targets`` most likely wrong
    classes of the clean logits ``logits0 (B, K)``, one target after the other, each on the samples
    still standing; the goal is misclassification."""
    targets = top_targets(logits0, y, n_targets)                       # (B, T)
    for j in range(targets.shape[1]):
        apgd_run(model, x, y, state, tm, loss="dlr-targeted", target=targets[:, j], targeted_goal=False,
                 **kw)  # type: ignore[arg-type]


def finish(model: nn.Module, x: torch.Tensor, state: APGDState, tm: ThreatModel, y: torch.Tensor,
           targeted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Final projection via ``ThreatModel`` and success judged on ``x_adv`` itself (one forward)."""
    x_adv = tm.project(state.x_adv, x)
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    state.queries += 1
    state.forward_passes += x.shape[0]
    return x_adv, (pred == y) if targeted else (pred != y)


def _generator(x: torch.Tensor, seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))


@ATTACKS.register("apgd", help="Auto-PGD (Croce & Hein 2020): CE / DLR / targeted DLR, step-size free")
class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020). Norms ``linf``, ``l2``.

    Args (keyword-only):
        norm, eps:   threat model (``eps`` a float or a string like ``"8/255"``).
        n_iter:      iterations per run (100).
        n_restarts:  random starts, run batched (1).
        loss:        ``ce`` (default), ``dlr`` or ``dlr-targeted`` (APGD-T when untargeted).
        n_targets:   APGD-T target classes (9, as AutoAttack standard).
        rho, alpha:  checkpoint condition threshold (0.75) and momentum (0.75).
        targeted:    ``y`` holds target labels; losses: ``ce`` (-CE to the target) or
                     ``dlr-targeted`` (towards the target, away from the clean prediction).
        seed:        seed of the random starts (None: the global RNG).

    Shapes: ``x (B, C, H, W)`` in ``[0, 1]``, ``y (B,)``; returns ``AttackResult`` with
    ``x_adv`` inside the ball and ``[0, 1]``; unbroken samples get their highest-loss point.
    """

    name = "apgd"

    def __init__(self, *, norm: str = "linf", eps: float | str = 8 / 255, n_iter: int = 100, n_restarts: int = 1,
                 loss: str = "ce", n_targets: int = 9, rho: float = 0.75, alpha: float = 0.75,
                 targeted: bool = False, seed: int | None = 0) -> None:
        self._tm = ThreatModel(norm, eps)
        if loss not in APGD_LOSSES:
            raise ValueError(f"unknown APGD loss {loss!r}; allowed: {', '.join(APGD_LOSSES)}")
        if targeted and loss == "dlr":
            raise ValueError("targeted APGD uses loss 'ce' or 'dlr-targeted', not the untargeted 'dlr'")
        for key, v in (("n_iter", n_iter), ("n_restarts", n_restarts), ("n_targets", n_targets)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        if not 0 < rho <= 1 or not 0 < alpha <= 1:
            raise ValueError(f"rho and alpha must be in (0, 1], got rho={rho}, alpha={alpha}")
        self.norm, self.eps = self._tm.norm, float(self._tm.eps)
        self.n_iter, self.n_restarts, self.loss, self.n_targets = n_iter, n_restarts, loss, n_targets
        self.rho, self.alpha, self.targeted, self.seed = rho, alpha, targeted, seed

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        tm, gen = self._tm, _generator(x, self.seed)
        with torch.no_grad():
            logits0 = model(x)                                         # (B, K)
        pred0 = logits0.argmax(1)
        state = APGDState.start(x, (pred0 == y) if self.targeted else (pred0 != y))
        kw = dict(n_iter=self.n_iter, n_restarts=self.n_restarts, rho=self.rho, alpha=self.alpha, generator=gen)
        if self.targeted:            # reference label: the clean prediction; target: y
            apgd_run(model, x, pred0, state, tm, loss=self.loss, target=y, targeted_goal=True, **kw)
        elif self.loss == "dlr-targeted":
            apgd_targeted_run(model, x, y, logits0, state, tm, n_targets=self.n_targets, **kw)
        else:
            apgd_run(model, x, y, state, tm, loss=self.loss, **kw)
        x_adv, success = finish(model, x, state, tm, y, self.targeted)
        return AttackResult(x_adv, success, state.queries,
                            {"forward_passes": state.forward_passes, "backward_passes": state.backward_passes})
