"""DAFA (Lee et al. 2024): class-wise loss weights and eps from inter-class similarities.

Lee, Lee, Park, Lee, "DAFA: Distance-Aware Fair Adversarial Training", ICLR 2024
(https://arxiv.org/abs/2401.12532); code rucy74/DAFA (``utils.calculate_class_weights``,
``losses.trades_loss`` / ``madry_loss``, ``train.py``, ``arguments.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses._adversarial import AdversarialObjective, accuracy_logs, check_positive, kl_per_sample, reduce
from defenses.base import StepContext, average_across_replicas
from defenses.trades import PRESETS as TRADES_PRESETS
from robustkit.errors import CheckpointError, InputError
from robustkit.modes import eval_mode
from robustkit.registry import DEFENSES
from robustkit.threat import ThreatModel

# The official defaults (arguments.py, scripts/trades_dafa.sh): the TRADES attack (eps 0.031, 10 steps
# of 0.007, beta 6), lambda 1.0 on CIFAR-10 (1.5 on CIFAR-100 / STL-10), weights computed after epoch 70
# of 110. MNIST: TRADES' MNIST attack, weights after epoch 2 (our choice: short MNIST runs).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {**TRADES_PRESETS["cifar10"], "lamb": 1.0, "warmup": 70},
    "mnist": {**TRADES_PRESETS["mnist"], "lamb": 1.0, "warmup": 2},
}


def class_weights(similarity: torch.Tensor, lamb: float) -> torch.Tensor:
    """DAFA weights ``(K,)`` from ``similarity`` ``(K, K)``, row ``i`` = mean softmax over class ``i``.

    ``w_i = 1 + lamb * sum_{j != i} s_ij * s_jj * (+1 if s_ii < s_jj else -1)``: a class that is
    harder than a class it is confused with (lower own-class probability) gains weight, the easier
    one loses it (``calculate_class_weights``; ties count as "easier", as in the code's ``else``)."""
    s = similarity.double()
    diag = s.diagonal()                                                 # (K,)
    sign = torch.where(diag[:, None] < diag[None, :], 1.0, -1.0).double()   # (K, K): [i, j]
    sign.fill_diagonal_(0.0)
    return 1.0 + lamb * (sign * s * diag[None, :]).sum(1)


@DEFENSES.register("dafa", help="DAFA (Lee et al. 2024): TRADES / PGD-AT with class-wise weights and eps "
                                "from inter-class similarities after a warm-up")
class DAFA(AdversarialObjective):
    """TRADES (``base="trades"``) or PGD-AT (``base="pgd"``) with class-wise weights ``w_y``.

    Until the end of epoch ``warmup`` (1-based, as ``train.py``'s ``epoch == dafa_warmup``) every
    ``w_y`` is 1 (plain TRADES / PGD-AT). During that epoch the softmax of the outer adversarial
    logits (train mode, as the code's ``memory_dict``) is summed per true class; at its end (the
    Trainer's ``end_epoch`` hook) the per-class means give the similarity matrix and ``class_weights``
    the weights, fixed for the rest of training. The weights then scale, per sample of class ``y``,
    the eps and the step size of the inner maximization (``w_y * eps``, ``w_y * step_size``) and the
    cross-entropy: TRADES ``mean(w_y * CE(f(x), y)) + beta * KL`` (the KL is not weighted, as in the
    code), PGD-AT ``mean(w_y * CE(f(x'), y))``.

    Differences from the official code: its ``madry_loss`` takes a second, unweighted step to the
    plain eps ball after the weighted one in each iteration (so the class-wise eps has no effect for
    PGD); we follow the paper (class-wise eps only). The code averages over every training image;
    we average the per-class sums of the epoch (the same). A class absent from the warm-up epoch
    has an all-zero similarity row (the code would fail). A weight below 0 (large lamb) gives a zero
    ball for that class (the code would invert its ball); the CE weight keeps its sign, as in the code. PGD starts
    at ``x + 0.001 * randn``.

    The statistics are taken once per batch, from the first ``objective`` call after ``before_loss``:
    the Trainer's loss, or, under a weight-perturbation wrapper (AWP, RWP, SAM, AMP), the wrapper's
    first proxy evaluation, which runs at the unperturbed weights on the same ``x'``. So DAFA with
    or without AWP records the same statistics on the same batches (the wrapper's later calls, at
    perturbed weights, and the Trainer's loss there are not counted: before this was fixed, AWP
    counted every image twice, RWP ``iterations + 1`` times, most of them at perturbed weights).

    A run must outlast the warm-up: ``check_run`` (called by the Trainer and the train pipeline
    before anything is written) raises ``InputError`` when ``warmup >= epochs``, since the weights
    would never be used and the run would silently be plain TRADES / PGD-AT. (The CIFAR preset's
    warm-up is 70 of 110 epochs; a shorter run needs ``warmup`` set, e.g. the same 70/110 fraction.)

    DDP: the per-class sums and counts are averaged over the ranks (``average_across_replicas``)
    before the weights are computed, so every replica holds the same weights. The weights and the
    running sums are training state (``state_dict``), saved in checkpoints.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (eps 0.031, 10 steps of 0.007, beta 6, lamb 1, warmup 70) or ``"mnist"``.
        base: ``"trades"`` or ``"pgd"``. beta: the TRADES weight (ignored by ``"pgd"``).
        lamb: DAFA's lambda (>= 0). warmup: epochs before the weights are computed (>= 1).
    """

    name = "dafa"
    PRESETS = PRESETS

    def __init__(self, *, preset: str | None = "cifar10", base: str = "trades", norm: str = "linf",
                 eps: float | str | None = None, steps: int | None = None, step_size: float | str | None = None,
                 beta: float | None = None, lamb: float | None = None, warmup: int | None = None) -> None:
        knobs = self._setup(preset, norm, eps, steps, step_size, 0.0, None, beta=beta, lamb=lamb, warmup=warmup)
        if base not in ("trades", "pgd"):
            raise InputError(f"base must be 'trades' or 'pgd', got {base!r}")
        self.base = base
        self.beta = check_positive("beta", knobs["beta"], allow_zero=True)
        self.lamb = check_positive("lamb", knobs["lamb"], allow_zero=True)
        self.warmup = check_positive("warmup", knobs["warmup"], integer=True)
        self._weights: torch.Tensor | None = None      # (K,) once computed
        self._sums: torch.Tensor | None = None         # (K, K) float64: summed softmax per true class
        self._counts: torch.Tensor | None = None       # (K,) float64
        self._collect = False      # this epoch is the warm-up one
        self._pending = False      # this batch's statistics are still to be taken (one objective call)

    @property
    def weights(self) -> torch.Tensor | None:
        """The class weights ``(K,)`` (None during the warm-up)."""
        return self._weights

    def _sample_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        return None if self._weights is None else self._weights.to(y.device, torch.float32)[y]   # (B,)

    # -- the objective ---------------------------------------------------------------
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x'`` ``(B, C, H, W)`` in the class-wise ball (eval mode); ``x`` when TRADES' beta = 0."""
        x = x.detach()
        if self.base == "trades" and self.beta == 0:
            return x
        w = self._sample_weights(y)
        w = None if w is None else w.clamp_min(0.0)                  # a ball needs eps >= 0
        tm = self.tm if w is None else ThreatModel(self.norm, w * self.eps)
        step = self.step_size if w is None else w * self.step_size
        with eval_mode(model), torch.enable_grad():
            target = F.softmax(model(x).float(), 1).detach() if self.base == "trades" else None   # (B, K)
            x_adv = tm.project(x + 0.001 * torch.randn_like(x), x)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv).float()                               # (B, K)
                if target is None:
                    loss = F.cross_entropy(logits, y, reduction="sum")
                else:
                    loss = F.kl_div(F.log_softmax(logits, 1), target, reduction="sum")
                (grad,) = torch.autograd.grad(loss, [x_adv])                # input gradient only
                x_adv = tm.project(tm.step(x_adv.detach(), grad, step), x)
        return x_adv.detach()

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        w = self._sample_weights(y)
        logits_adv = model(x_adv)                                   # (B, K)
        if self._pending:  # once per batch: the first call (unperturbed weights, see the class docstring)
            self._pending = False
            self._record(logits_adv, y)
        if self.base == "pgd":
            ce = self.ce(logits_adv, x, y)                          # (B,)
            loss = reduce(ce if w is None else w * ce, reduction)
            return loss, accuracy_logs(loss, None, logits_adv, y)
        logits = model(x)                                           # (B, K)
        natural = self.ce(logits, x, y)                             # (B,)
        robust = kl_per_sample(logits_adv, logits)                  # (B,)
        loss = reduce((natural if w is None else w * natural) + self.beta * robust, reduction)
        return loss, accuracy_logs(loss, logits, logits_adv, y, natural=natural, kl=robust)

    # -- the warm-up statistics --------------------------------------------------------
    def _record(self, logits_adv: torch.Tensor, y: torch.Tensor) -> None:
        if not self._collect:
            return
        k = logits_adv.shape[1]
        probs = F.softmax(logits_adv.detach().double(), 1)          # (B, K)
        if self._sums is None or self._sums.shape != (k, k):
            self._sums = torch.zeros(k, k, dtype=torch.float64, device=probs.device)
            self._counts = torch.zeros(k, dtype=torch.float64, device=probs.device)
        assert self._counts is not None
        self._sums = self._sums.to(probs.device).index_add_(0, y, probs)
        self._counts = self._counts.to(probs.device).index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    def before_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        self._collect = self._weights is None and ctx.epoch + 1 == self.warmup
        self._pending = self._collect

    def check_run(self, epochs: int) -> None:
        """``InputError`` unless the warm-up ends before the run's last epoch (``warmup < epochs``)."""
        if self.warmup < epochs:
            return
        hint = (f"set defense.params.warmup below {epochs}, e.g. {max(1, round(epochs * 70 / 110))} "
                "(the paper's 70 of 110 epochs)" if epochs > 1 else "DAFA needs at least 2 epochs")
        raise InputError(f"dafa: warmup {self.warmup} needs a run longer than its {epochs} epoch(s): the class "
                         f"weights are computed after epoch {self.warmup} and used from the next one, so this "
                         f"run would be plain {self.base} throughout; {hint}")

    def end_epoch(self, model: nn.Module, ctx: StepContext) -> dict[str, Any]:
        """After epoch ``warmup``: the class weights from the epoch's statistics (every rank)."""
        self._collect = self._pending = False
        if self._weights is not None or ctx.epoch + 1 != self.warmup or self._sums is None:
            return {}
        assert self._counts is not None
        average_across_replicas([self._sums, self._counts])        # identical on every rank
        similarity = self._sums / self._counts.clamp_min(1.0)[:, None]     # (K, K)
        self._weights = class_weights(similarity, self.lamb).float()
        self._sums = self._counts = None
        return {"dafa_weight_min": float(self._weights.min()), "dafa_weight_max": float(self._weights.max())}

    # -- training state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for key, value in (("weights", self._weights), ("sums", self._sums), ("counts", self._counts)):
            if value is not None:
                state[key] = value.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"weights", "sums", "counts"}
        if unknown or (("sums" in state) != ("counts" in state)):
            raise CheckpointError(f"the checkpoint holds training state {sorted(state)} that 'dafa' does not "
                                  f"take (allowed: weights, sums with counts); resume with the defense that wrote it")
        self._weights = state["weights"].float() if "weights" in state else None
        self._sums = state["sums"].double() if "sums" in state else None
        self._counts = state["counts"].double() if "counts" in state else None
