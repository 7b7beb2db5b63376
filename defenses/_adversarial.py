"""Shared pieces of the adversarial objectives (PGD-AT, TRADES, MART).

Every adversarial objective is split in two so weight perturbation (AWP/RWP) can
reuse one set of adversarial examples for its proxy step and for the real loss::

    x_adv = objective.perturb(model, x, y)                 # inner maximization, eval mode
    loss, logs = objective.objective(model, x, x_adv, y)   # outer loss, model in its own mode
    loss, logs = objective.loss(model, x, y)               # both (the Defense protocol)

``objective(..., reduction="none")`` returns the per-sample loss ``(B,)`` whose mean is
the ``"mean"`` loss (RWP selects samples by it). The inner loops use ``ThreatModel`` for
steps and projections, take gradients w.r.t. the input only (``autograd.grad``: no
parameter ``.grad`` is touched) and run in eval mode, so batch-norm running statistics
are not updated by the attack; the previous mode is restored per module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from robustkit import validate
from robustkit.errors import InputError
from robustkit.modes import eval_mode
from robustkit.threat import ThreatModel, parse_eps, parse_norm

# targets(x, y, num_classes) -> (B, K) probabilities; e.g. ADR-style rectified soft labels.
TargetsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> Any:
    """Validate a hyperparameter: ``InputError`` naming it and what is allowed."""
    if integer:
        return validate.integer(name, value, minimum=0 if allow_zero else 1)
    return validate.number(name, value, 0.0, strict_min=not allow_zero)


def resolve_preset(presets: dict[str, dict[str, Any]], preset: str | None, **given: Any) -> dict[str, Any]:
    """Explicit (non-``None``) values override the preset's; ``preset=None`` needs all of them."""
    if preset is not None and preset not in presets:
        raise InputError(f"unknown preset {preset!r}; allowed: {', '.join(presets)} (or None with explicit values)")
    base = dict(presets[preset]) if preset is not None else {}
    base.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in given if k not in base]
    if missing:
        raise InputError(f"preset=None needs explicit {', '.join(missing)}")
    return base


class AdversarialObjective(Defense):
    """Base of the objectives with an inner maximization over an ``eps``-ball.

    Subclasses set ``PRESETS`` (name -> ``eps``, ``steps``, ``step_size`` and their own knobs
    such as ``beta``), call ``_setup`` from ``__init__`` and implement ``perturb`` and
    ``objective``. ``label_smoothing`` / ``targets`` replace the hard labels of the
    cross-entropy terms (the hook for ADR-style soft labels).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def _setup(self, preset: str | None, norm: str, eps: float | str | None, steps: int | None,
               step_size: float | str | None, label_smoothing: float, targets: TargetsFn | None,
               **knobs: Any) -> dict[str, Any]:
        """The one preset ``__init__``: resolve ``preset`` against ``PRESETS`` (explicit values win),
        validate and set ``preset``, ``norm``, ``eps``, ``steps``, ``step_size``, the label hook and
        ``tm``; returns the resolved ``knobs`` (e.g. ``{"beta": 6.0}``) for the subclass to check."""
        p = resolve_preset(self.PRESETS, preset, eps=eps, steps=steps, step_size=step_size, **knobs)
        self.preset = preset or "custom"
        self.norm = parse_norm(norm)
        self.eps = parse_eps(p["eps"])
        self.steps = check_positive("steps", p["steps"], integer=True, allow_zero=True)
        step_size = p["step_size"]
        if isinstance(step_size, str):  # "2/255"-style, like eps
            step_size = parse_eps(step_size)
        self.step_size = check_positive("step_size", step_size)
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0.0 <= label_smoothing < 1.0:
            raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if targets is not None and not callable(targets):
            raise InputError(f"targets must be a callable (x, y, num_classes) -> (B, K) or None, got {targets!r}")
        if targets is not None and label_smoothing:
            raise InputError("give either label_smoothing or targets, not both")
        self.label_smoothing = float(label_smoothing)
        self._targets = targets
        self.tm = ThreatModel(self.norm, self.eps)
        return {k: p[k] for k in knobs}

    # -- the protocol -------------------------------------------------------------
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.objective(model, x, self.perturb(model, x, y), y)

    # -- helpers ------------------------------------------------------------------
    def ce(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy ``(B,)`` against hard, smoothed or ``targets`` labels."""
        if self._targets is not None:
            probs = self._targets(x, y, logits.shape[1]).to(logits.device, torch.float32)  # (B, K)
            return F.cross_entropy(logits.float(), probs, reduction="none")
        return F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=self.label_smoothing)

    def start(self, x: torch.Tensor, how: str, tm: ThreatModel | None = None) -> torch.Tensor:
        """Starting point of the inner maximization, inside the ball (``tm``, default ``self.tm``) and ``[0, 1]``."""
        tm = self.tm if tm is None else tm
        if how == "uniform":
            return tm.random_start(x)
        if how == "normal":  # TRADES / MART code: x + 0.001 * N(0, I) (clipped here to keep [0, 1])
            return tm.project(x + 0.001 * torch.randn_like(x), x)
        return x.clone()

    def ce_ascent(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: str,
                  tm: ThreatModel | None = None, step_size: float | torch.Tensor | None = None) -> torch.Tensor:
        """PGD on the cross-entropy, returning the *last* iterate (as in Madry et al. / MART),
        not the first successful one that ``attacks.PGD`` keeps. ``start``: ``"uniform"`` in the
        ball, ``"normal"`` (``x + 0.001 * randn``, the MART/TRADES code) or ``"none"`` (at ``x``).
        ``tm`` / ``step_size`` override the objective's own (e.g. per-sample ``(B,)`` budgets)."""
        tm = self.tm if tm is None else tm
        step = self.step_size if step_size is None else step_size
        x = x.detach()
        with eval_mode(model), torch.enable_grad():
            x_adv = self.start(x, start, tm)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(model(x_adv).float(), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, [x_adv])                # input gradient only
                x_adv = tm.project(tm.step(x_adv.detach(), grad, step), x)
        return x_adv.detach()


class BetaObjective(AdversarialObjective):
    """The shared ``__init__`` of the objectives weighted by ``beta`` (TRADES, MART); their
    class docstrings give the presets and the meaning of each argument."""

    def __init__(self, *, preset: str | None = "cifar10", norm: str = "linf", eps: float | str | None = None,
                 steps: int | None = None, step_size: float | str | None = None, beta: float | None = None,
                 label_smoothing: float = 0.0, targets: TargetsFn | None = None) -> None:
        knobs = self._setup(preset, norm, eps, steps, step_size, label_smoothing, targets, beta=beta)
        self.beta = check_positive("beta", knobs["beta"], allow_zero=True)


def kl_per_sample(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """``KL(p(clean) || p(adv))`` summed over classes: ``(B,)``. Gradient flows through both
    arguments, as in the TRADES code (``KLDivLoss(log_softmax(adv), softmax(clean))``)."""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1),
                    reduction="none").sum(1)


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")  # a caller's bug, not user input


def accuracy_logs(loss: torch.Tensor, logits: torch.Tensor | None, logits_adv: torch.Tensor | None,
                  y: torch.Tensor, **extra: torch.Tensor) -> dict[str, Any]:
    """Detached metrics for the trainer: ``loss``, ``acc`` (clean), ``adv_acc``, extras."""
    logs: dict[str, Any] = {"loss": loss.detach().mean()}
    if logits is not None:
        logs["acc"] = (logits.detach().argmax(1) == y).float().mean()
    if logits_adv is not None:
        logs["adv_acc"] = (logits_adv.detach().argmax(1) == y).float().mean()
    logs.update({k: v.detach().mean() for k, v in extra.items()})
    return logs
