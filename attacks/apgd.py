"""APGD: Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML, arXiv:2003.01690, Alg. 1).

The shared attack loop (``attacks._loop``) plus APGD's step-size rule and momentum. The step
size starts at ``eta = 2 * eps`` and is halved at checkpoints ``p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (fractions of ``n_iter``) when either

1. the loss went up in at most a fraction ``rho`` of the steps since the last checkpoint, or
2. the step size was not halved at the last checkpoint and the best loss has not improved since;

after a halving the iterate restarts from the best point found (Sec. 3.2). The update is
``z = P(x_k + eta * s(grad))``, ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``
with ``alpha = 0.75`` (1 on the first step) and ``P`` the projection of ``ThreatModel``.
Defaults follow the paper: ``n_iter=100``, ``rho=0.75``, ``alpha=0.75``, one restart,
APGD-T over the top-9 target classes.

Losses: ``ce``; ``dlr`` (eq. 4); ``dlr-targeted`` (eq. 5); see ``attacks._losses`` (DLR needs
>= 3 classes, targeted DLR >= 4). Untargeted with ``dlr-targeted`` is APGD-T: the goal stays
misclassification; the loss pulls towards each of the ``n_targets`` most likely wrong classes
in turn (on the points still standing). Norms: L-inf and L2. Random restarts run batched as
copies of the still-standing samples; a sample leaves as soon as any copy succeeds.
"""

from __future__ import annotations

import torch
from torch import nn

from attacks._compact import DEFAULT_SEED, compact_every, expand_as_image, make_generator
from attacks._loop import LoopOptions, Record, Rows, judge, logits_counted, run
from attacks._losses import check_classes, loss_fn
from attacks.base import Attack, AttackResult
from robustkit.errors import InputError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel
from robustkit.validate import integer, number, one_of

APGD_LOSSES = ("ce", "dlr", "dlr-targeted")


class APGDStep:
    """APGD's step-size rule and momentum (Alg. 1, Sec. 3.2), a ``StepRule`` of the shared loop.

    Checkpoint intervals as in the reference implementation: ``int(0.22 n_iter)``, then 3% of
    ``n_iter`` shorter each time, never below 6% -- the paper's ``p_{j+1} - p_j`` (for
    ``n_iter = 100`` the checkpoints are 22, 41, 57, 70, 80, 87, 93, 99). Condition 1 counts
    ``f(x_{i+1}) > f(x_i)`` over the interval and halves when the count is ``<= rho * k``
    (the reference code's ``<=``). ``x_max`` / ``f_max`` are the loop's per-row best point and
    loss (``bx``, ``bl``): the same until a row reaches the goal, after which its path no longer
    matters; the rule keeps the gradient at ``x_max`` itself (``gb``).
    """

    uses_loss = True

    def __init__(self, n_iter: int, eps: float, rho: float = 0.75, alpha: float = 0.75) -> None:
        self.eps, self.rho, self.alpha = eps, rho, alpha
        self.k = max(int(0.22 * n_iter), 1)                               # current checkpoint interval
        self.k_min, self.k_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
        self.since = 0                                                    # steps since the last checkpoint

    def step(self, t: int, r: Rows, tm: ThreatModel) -> torch.Tensor:
        x, g = r["x"], r["g"]                                             # (N, C, H, W)
        if t == 0:
            n = x.shape[0]
            r["xp"], r["gb"], r["lprev"] = x, g, r["loss"]
            r["eta"] = torch.full((n,), 2.0 * self.eps, device=x.device)  # eta_0 = 2 eps, (N,)
            r["n_incr"] = torch.zeros(n, device=x.device)
            r["lb_ck"], r["red_ck"] = r["bl"], torch.zeros(n, dtype=torch.bool, device=x.device)
        else:
            r["n_incr"] = r["n_incr"] + (r["loss"] > r["lprev"]).float()
            r["lprev"] = r["loss"]
            r["gb"] = torch.where(expand_as_image(r["better"], g), g, r["gb"])
            self.since += 1
            if self.since == self.k:                                      # checkpoint: conditions 1 and 2
                halve = (r["n_incr"] <= self.rho * self.k) | (~r["red_ck"] & (r["lb_ck"] >= r["bl"]))
                r["eta"] = torch.where(halve, r["eta"] / 2, r["eta"])
                h = expand_as_image(halve, x)
                x, g = torch.where(h, r["bx"], x), torch.where(h, r["gb"], g)
                r["red_ck"], r["lb_ck"], r["n_incr"] = halve, r["bl"], torch.zeros_like(r["n_incr"])
                self.since, self.k = 0, max(self.k - self.k_decr, self.k_min)
        a = self.alpha if t > 0 else 1.0
        z = tm.project(tm.step(x, g, r["eta"]), r["x0"])
        xn = tm.project(x + a * (z - x) + (1 - a) * (x - r["xp"]), r["x0"])
        r["xp"] = x
        return xn


def apgd_stage(model: nn.Module, x: torch.Tensor, label: torch.Tensor, record: Record, tm: ThreatModel,
               opts: LoopOptions, *, loss: str = "ce", n_iter: int = 100, n_restarts: int = 1, rho: float = 0.75,
               alpha: float = 0.75, target: torch.Tensor | None = None, targeted: bool = False) -> None:
    """One APGD run on the samples of ``record`` not yet fooled (``n_restarts`` batched copies each).

    x: (B, C, H, W) clean images; label: (B,) true labels, or target classes when ``targeted``;
    target: (B,) classes for untargeted ``dlr-targeted`` (APGD-T), else None.
    """
    owners = (~record.fooled).nonzero().squeeze(1)                         # (M,)
    if owners.numel() == 0:
        return
    record.new_stage(owners)
    run(model, x, label, record, tm, APGDStep(n_iter, float(tm.eps), rho, alpha), loss_fn(loss, targeted), n_iter,
        owners, opts, copies=n_restarts, target=target, targeted=targeted)


def top_targets(logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most likely classes other than ``y``, most likely first: ``(B, n)``."""
    z = logits.float().scatter(1, y[:, None], float("-inf"))
    return z.topk(min(n, logits.shape[1] - 1), dim=1).indices


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits0: torch.Tensor, record: Record,
                  tm: ThreatModel, opts: LoopOptions, *, n_targets: int = 9, **kw: object) -> None:
    """APGD-T (Croce & Hein 2020, Sec. 5): targeted DLR towards the ``n_targets`` most likely wrong
    classes of the clean logits ``logits0 (B, K)``, one target after the other, each on the samples
    still standing; the goal is misclassification."""
    targets = top_targets(logits0, y, n_targets)                           # (B, T)
    for j in range(targets.shape[1]):
        apgd_stage(model, x, y, record, tm, opts, loss="dlr-targeted", target=targets[:, j], **kw)  # type: ignore[arg-type]


def finish(model: nn.Module, x: torch.Tensor, label: torch.Tensor, record: Record, tm: ThreatModel,
           opts: LoopOptions, targeted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Final projection via ``ThreatModel`` and success judged on ``x_adv`` itself (one forward)."""
    x_adv = tm.project(record.x, x)
    return x_adv, judge(model, x_adv, label, targeted, record, opts)


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
                     ``dlr-targeted`` (towards the target, away from the strongest other class).
        early_stop:  samples that succeeded leave the active batch (True).
        amp, channels_last: autocast the forward (bf16 / fp16) and channels_last inputs (False).
        seed:        seed of the random starts (0; None: the global RNG).

    Shapes: ``x (B, C, H, W)`` in ``[0, 1]``, ``y (B,)``; returns ``AttackResult`` with
    ``x_adv`` inside the ball and ``[0, 1]`` (per sample the first successful iterate, else the
    highest-loss point of the last stage) and ``success`` judged on ``x_adv`` (one extra forward).
    """

    name = "apgd"

    def __init__(self, *, norm: str = "linf", eps: float | str = 8 / 255, n_iter: int = 100, n_restarts: int = 1,
                 loss: str = "ce", n_targets: int = 9, rho: float = 0.75, alpha: float = 0.75,
                 targeted: bool = False, early_stop: bool = True, amp: bool = False, channels_last: bool = False,
                 seed: int | None = DEFAULT_SEED) -> None:
        self._tm = ThreatModel(norm, eps)
        self.loss = one_of("loss", loss, APGD_LOSSES)
        if targeted and self.loss == "dlr":
            raise InputError("targeted APGD uses loss 'ce' or 'dlr-targeted', not the untargeted 'dlr'")
        self.n_iter, self.n_restarts = integer("n_iter", n_iter, 1), integer("n_restarts", n_restarts, 1)
        self.n_targets = integer("n_targets", n_targets, 1)
        self.rho, self.alpha = number("rho", rho, 0.0, 1.0, strict_min=True), number("alpha", alpha, 0.0, 1.0,
                                                                                     strict_min=True)
        self.norm, self.eps = self._tm.norm, float(self._tm.eps)
        self.targeted, self.early_stop = bool(targeted), bool(early_stop)
        self.amp, self.channels_last = bool(amp), bool(channels_last)
        self.seed = None if seed is None else integer("seed", seed)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        tm = self._tm
        opts = LoopOptions(compact_every(x.device) if self.early_stop else None, self.amp, self.channels_last,
                           make_generator(x.device, self.seed))
        record = Record.start(x)
        logits0 = logits_counted(model, x, record, opts)                     # (B, K)
        check_classes(self.loss, logits0.shape[1])
        pred0 = logits0.argmax(1)
        record.fooled = (pred0 == y) if self.targeted else (pred0 != y)
        kw = dict(n_iter=self.n_iter, n_restarts=self.n_restarts, rho=self.rho, alpha=self.alpha)
        if self.loss == "dlr-targeted" and not self.targeted:
            apgd_targeted(model, x, y, logits0, record, tm, opts, n_targets=self.n_targets, **kw)
        else:
            apgd_stage(model, x, y, record, tm, opts, loss=self.loss, targeted=self.targeted, **kw)
        x_adv, success = finish(model, x, y, record, tm, opts, self.targeted)
        return AttackResult(x_adv, success, record.queries, record.info())
