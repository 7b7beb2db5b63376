"""IBP certified training (Gowal et al. 2018) and CROWN-IBP training (Zhang et al. 2020).

Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training
Verifiably Robust Models" (arXiv:1810.12715), Eq. (6):

    loss = kappa * CE(z(x), y) + (1 - kappa) * CE(z_hat(x, eps), y)

with the worst-case logits ``z_hat_j = -m_j`` where ``m_j`` lower-bounds ``z_y - z_j`` over the
eps-ball (last-layer elision; ``z_hat_y = 0``). Their MNIST schedule (the defaults, as
fractions of training): nominal loss only for the first 1/30 (2k of 60k steps), then over
1/6 (10k steps) eps ramps 0 -> eps_train = 1.1 * eps and kappa 1 -> 0.5.

``crown_ibp=True`` (Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably
Robust Neural Networks", arXiv:1906.06316, Eq. 9) uses ``beta * m_CROWN-IBP + (1 - beta) * m_IBP``
with beta ramping 1 -> 0 over the same ramp.

The default fractions assume a long run (Gowal et al.: 60k steps, so 2k + 10k). On short runs
(a few hundred steps) they ramp eps within a few dozen steps and the net can collapse to a
constant prediction; use e.g. ``warmup_fraction=0.1, ramp_fraction=0.4`` there
(``benchmarks/ibp.py`` does).

Bounds are computed with the model in train mode, so the net must be BN-free and
dropout-free (ibp-small/medium/large are); anything else raises ``UnsupportedLayerError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certify.ibp import ibp_and_crown_margins, margin_bounds, worst_case_logits
from defenses._ibp_schedule import RAMP_FRACTION, WARMUP_FRACTION, IBPSchedule
from defenses.base import Defense, StepContext
from robustkit.registry import DEFENSES
from robustkit.threat import parse_eps


@DEFENSES.register("ibp", help="IBP certified training (Gowal et al. 2018); crown_ibp=True for CROWN-IBP")
class IBPTraining(Defense):
    """``kappa * CE(nominal) + (1 - kappa) * CE(worst-case logits)`` with eps/kappa (and beta) ramps.

    Args (keyword-only):
        eps: the test eps (L-inf, pixel space), e.g. 0.1 or "0.1".
        eps_train: the eps trained at after the ramp (default ``1.1 * eps``, Gowal et al. on MNIST).
        kappa_final: final weight of the nominal loss (default 0.5).
        warmup_fraction: share of training on the nominal loss only (default 1/30).
        ramp_fraction: share of training over which eps and kappa ramp (default 1/6).
        crown_ibp: mix in CROWN-IBP bounds with weight beta (default False: pure IBP).
        beta_start, beta_end: the beta ramp (default 1 -> 0, "CROWN-IBP 1 -> 0").
        norm: "linf" (default) or "l2".

    Without ``before_loss`` (used outside the Trainer) the final values apply.
    """

    name = "ibp"

    def __init__(self, *, eps: float | str, eps_train: float | str | None = None, kappa_final: float = 0.5,
                 warmup_fraction: float = WARMUP_FRACTION, ramp_fraction: float = RAMP_FRACTION,
                 crown_ibp: bool = False, beta_start: float = 1.0, beta_end: float = 0.0, norm: str = "linf") -> None:
        self.eps = parse_eps(eps)
        self.eps_train = 1.1 * self.eps if eps_train is None else parse_eps(eps_train)
        self.kappa_final, self.crown_ibp, self.norm = float(kappa_final), bool(crown_ibp), norm
        self.warmup_fraction, self.ramp_fraction = float(warmup_fraction), float(ramp_fraction)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.schedule = IBPSchedule(self.eps_train, self.kappa_final, self.warmup_fraction, self.ramp_fraction,
                                    self.beta_start, self.beta_end)
        self.set_progress(1.0)

    def set_progress(self, progress: float) -> None:
        """Set eps, kappa and beta for the given fraction of training done."""
        s = self.schedule
        self._eps, self._kappa, self._beta = s.eps(progress), s.kappa(progress), s.beta(progress)

    def before_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        self.set_progress(ctx.progress)

    def bounds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """Margin lower bounds ``(B, K)`` at ``eps`` (IBP, or the beta mix with CROWN-IBP)."""
        if not self.crown_ibp or self._beta <= 0:
            return margin_bounds(model, x, y, eps, self.norm)
        ibp, crown = ibp_and_crown_margins(model, x, y, eps, self.norm)
        return self._beta * crown + (1 - self._beta) * ibp

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(x)                                                    # (B, K)
        nominal = F.cross_entropy(logits, y)
        logs = {"nominal_ce": nominal.detach(), "acc": (logits.argmax(1) == y).float().mean().detach(),
                "eps": self._eps, "kappa": self._kappa}
        if self._kappa >= 1.0:                                                # warm-up: nominal loss only
            logs["loss"] = nominal.detach()
            return nominal, logs
        margin_lb = self.bounds(model, x, y, self._eps)                       # (B, K), 0 at y
        robust = F.cross_entropy(worst_case_logits(margin_lb), y)
        loss = self._kappa * nominal + (1 - self._kappa) * robust
        verified = (margin_lb.masked_fill(F.one_hot(y, margin_lb.shape[1]).bool(), 1.0) > 0).all(1)
        logs.update(loss=loss.detach(), robust_ce=robust.detach(), verified_acc=verified.float().mean().detach())
        if self.crown_ibp:
            logs["beta"] = self._beta
        return loss, logs
