"""ADR (Wu et al. 2024): adversarial training on rectified soft labels from an EMA teacher.

Wu, Wang, Chen, "Annealing Self-Distillation Rectification Improves Adversarial Training",
ICLR 2024 (https://arxiv.org/abs/2305.12118); code yuyuwu5/ADR (``src/adr.py``,
``src/advTrainer.py``, ``config/cifar10/*_adr.gin``).

Per batch, with the EMA teacher ``theta_t`` (a momentum copy of the model) at training progress
``t`` (the fraction of optimizer steps done)::

    p_t    = softmax(f_theta_t(x) / tau(t))                     # (B, K), clean x, eval mode
    lam    = clip(lam_t - (max_k p_t - p_t[y]), 0, 1)           # (B,) shrinks when the teacher is wrong
    P_rect = lam * p_t + (1 - lam) * onehot(y)                   # (B, K): replaces the hard label y
    theta_t <- decay * theta_t + (1 - decay) * theta             # after each optimizer step

``tau`` anneals (cosine) from ``temperature_high`` to ``temperature_low`` and ``lam_t`` rises
(cosine) from ``interpolation_low`` to ``interpolation_high``, both over the whole run, as the
code's ``cosine_scheduler`` (value at step ``i`` of ``N``: ``end + (start - end) * (1 + cos(pi i/N)) / 2``).
``P_rect`` replaces the hard label everywhere the base objective uses one: PGD-AT's inner PGD and
outer cross-entropy (``base="pgd-at"``), TRADES' clean cross-entropy (``base="trades"``; its KL
terms use no label). This is what the official code does; the formula above is its ``ADR.__call__``.

The teacher, as timm's ``ModelEmaV2`` in the code: a deep copy of the (unwrapped) model made at
the first step, so it starts from the initial or pretrained weights; on the model's device and
dtype; always in eval mode, no gradients, never in the optimizer. Every entry of the state dict is
averaged, batch-norm running statistics included (EMA'd, not copied). Integer buffers
(``num_batches_tracked``) are copied: ``ModelEmaV2`` writes the float average back into the
integer tensor, which freezes it; it is read only by ``momentum=None`` batch norm. The update is
``lerp`` (``e + (1 - decay) * (m - e)``), equal to the code's ``decay * e + (1 - decay) * m`` but
exact where teacher and model agree (e.g. the normalization constants).

With AWP (``weight_perturbation: awp``, the paper's ``+AWP`` rows): the wrapper calls
``before_loss`` here before it perturbs the weights and ``after_step`` after it removed the
perturbation, so the teacher is copied from and averaged with unperturbed weights only (the code's
SAM-style AWP optimizer likewise restores ``w`` before its step and the EMA update). Our AWP is Wu
et al.'s proxy-based one (``defenses/weight_perturbation.py``); the ADR code's is a SAM-like
two-step optimizer with ``rho`` 0.005: the perturbation rule differs, the ADR side does not.

Under DDP every replica holds the same weights after each step (DDP averages the gradients), so
the teacher's parameters stay identical on every rank; batch-norm running statistics are *not*
(DDP broadcasts rank 0's at each forward, then every rank updates them on its own shard), so the
teacher takes rank 0's (one broadcast per step), the buffers DDP treats as the model's and the
checkpoint holds: the teacher is identical bit for bit on every rank (tested under torchrun).

Resume: the teacher is training state: ``state_dict()`` holds it, the trainer saves it in every
checkpoint and restores it on ``resume``, so a resumed run ends as an uninterrupted one. (The
official script saves the EMA model but does not restore it on ``--restore_ckpt``.)

The WA model: the paper's reported numbers are the EMA teacher's ("+WA", the code evaluates the EMA
model). ``exported_models()`` hands the teacher to the Trainer, which saves it beside every
checkpoint as ``checkpoints/last-ema`` (and ``best-ema``: the teacher at the epoch that made
``best``), a plain model directory for ``robustkit.zoo.load`` / ``robustkit eval --model``. These
are weights only: resume reads the teacher from ``last/state.pt`` as before.

Presets (the official CIFAR-10 ResNet-18 configs): PGD-AT ``resnet18_pgd_sgd_adr.gin``: eps 8/255,
10 steps of 2/255, decay 0.995, tau 2.5 -> 2.0, lam 0.7 -> 0.95; TRADES
``resnet18_trades_sgd_adr.gin``: the same plus beta 6. With AWP the code uses tau 2.5 -> 1.5 and
lam 0.7 -> 0.85 (``resnet18_pgd_awp_adr.gin``): set them in the recipe. ``preset="mnist"`` keeps
the ADR knobs and takes the base objective's MNIST attack (eps 0.3).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from defenses._adversarial import AdversarialObjective, check_positive
from defenses.base import Defense, StepContext, replicated
from robustkit.errors import CheckpointError, InputError
from robustkit.registry import DEFENSES
from robustkit.zoo import unwrap

BASES = ("pgd-at", "trades")
# Attack settings of the official CIFAR-10 configs (PGD.eps 8, alpha 2, steps 10; TRADES the same,
# adv_beta 6). The MNIST preset is the base objective's own.
CIFAR10 = {"eps": 8 / 255, "steps": 10, "step_size": 2 / 255}


def cosine(start: float, end: float, progress: float) -> float:
    """The code's ``cosine_scheduler`` at ``progress`` in [0, 1]: ``start`` at 0, ``end`` at 1."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def rectified_labels(logits_teacher: torch.Tensor, y: torch.Tensor, temperature: float,
                     interpolation: float) -> torch.Tensor:
    """``P_rect`` ``(B, K)`` from the teacher's logits ``(B, K)`` and the labels ``y`` ``(B,)``."""
    p = F.softmax(logits_teacher.float() / temperature, dim=1)                   # (B, K)
    gap = p.max(dim=1).values - p.gather(1, y[:, None]).squeeze(1)                # (B,) >= 0
    lam = (interpolation - gap).clamp(0.0, 1.0)[:, None]                         # (B, 1)
    return lam * p + (1.0 - lam) * F.one_hot(y, p.shape[1]).to(p.dtype)


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """In place, every rank's tensors become rank 0's (the few BN buffers: one broadcast each)."""
    for t in tensors:
        dist.broadcast(t, src=0)


@DEFENSES.register("adr", help="ADR (Wu et al. 2024): PGD-AT / TRADES on rectified labels of an EMA teacher")
class ADR(Defense):
    """ADR on top of ``base`` (``"pgd-at"`` or ``"trades"``): the base objective with its hard labels
    replaced by the rectified soft labels of an EMA teacher (see the module docstring).

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        base: the objective whose labels are rectified: ``"pgd-at"`` (the paper's main rows) or
            ``"trades"``.
        preset: ``"cifar10"`` (the official configs: eps 8/255, 10 steps of 2/255, beta 6 with
            TRADES) or ``"mnist"`` (the base objective's MNIST attack: eps 0.3, 40 steps of 0.01);
            ``None`` needs explicit values.
        norm, eps, steps, step_size: the inner maximization. beta: TRADES' weight (base trades only).
        ema_decay: the teacher's momentum (0.995).
        temperature_high, temperature_low: tau anneals from high to low (2.5 -> 2.0).
        interpolation_low, interpolation_high: lam_t rises from low to high (0.7 -> 0.95).
        random_start: PGD-AT's uniform random start (True).
    """

    name = "adr"

    def __init__(self, *, base: str = "pgd-at", preset: str | None = "cifar10", norm: str = "linf",
                 eps: float | str | None = None, steps: int | None = None, step_size: float | str | None = None,
                 beta: float | None = None, ema_decay: float = 0.995, temperature_high: float = 2.5,
                 temperature_low: float = 2.0, interpolation_low: float = 0.7, interpolation_high: float = 0.95,
                 random_start: bool = True) -> None:
        if base not in BASES:
            raise InputError(f"adr: base must be one of {', '.join(BASES)}, got {base!r}")
        if beta is not None and base != "trades":
            raise InputError(f"adr: beta is TRADES' weight; it needs base='trades', got base={base!r}")
        given: dict[str, Any] = {"eps": eps, "steps": steps, "step_size": step_size}
        if preset == "cifar10":  # the ADR configs' attack (not the base's own CIFAR preset)
            given = {k: CIFAR10[k] if v is None else v for k, v in given.items()}
            beta = 6.0 if base == "trades" and beta is None else beta
        kw: dict[str, Any] = {"preset": None if preset == "cifar10" else preset, "norm": norm, **given,
                              "targets": self._targets}
        kw.update({"beta": beta} if base == "trades" else {"random_start": random_start})
        self.base_objective: AdversarialObjective = DEFENSES.get(base)(**kw)
        self.base, self.preset = base, preset or "custom"
        self.ema_decay = check_positive("ema_decay", ema_decay, allow_zero=True)
        if self.ema_decay >= 1:
            raise InputError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.temperature_high = check_positive("temperature_high", temperature_high)
        self.temperature_low = check_positive("temperature_low", temperature_low)
        for key, v in (("interpolation_low", interpolation_low), ("interpolation_high", interpolation_high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise InputError(f"{key} must be in [0, 1], got {v!r}")
        self.interpolation_low, self.interpolation_high = float(interpolation_low), float(interpolation_high)
        self.teacher: nn.Module | None = None
        self._pending: dict[str, torch.Tensor] | None = None     # a loaded teacher, until the model is known
        self._progress = 0.0
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None   # (x, P_rect) of this batch

    # -- schedules and labels --------------------------------------------------------------
    def temperature(self, progress: float) -> float:
        return cosine(self.temperature_high, self.temperature_low, progress)

    def interpolation(self, progress: float) -> float:
        return cosine(self.interpolation_low, self.interpolation_high, progress)

    def _ensure_teacher(self, model: nn.Module) -> nn.Module:
        if self.teacher is None:
            net = unwrap(model)
            teacher = copy.deepcopy(net).eval().requires_grad_(False)
            if self._pending is not None:
                try:
                    teacher.load_state_dict(self._pending)
                except RuntimeError as e:
                    raise CheckpointError(f"adr: the checkpoint's EMA teacher does not fit the model "
                                          f"({str(e).splitlines()[0][:200]})") from None
                self._pending = None
            self.teacher = teacher
        return self.teacher

    def labels(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``P_rect`` ``(B, K)`` for this batch (computed once per batch, from the clean ``x``)."""
        if self._cache is not None and self._cache[0] is x:
            return self._cache[1]
        if self.teacher is None:
            raise RuntimeError("adr: labels() before the teacher exists (call before_loss or loss first)")
        with torch.no_grad():
            probs = rectified_labels(self.teacher(x), y, self.temperature(self._progress),
                                     self.interpolation(self._progress))
        self._cache = (x, probs)
        return probs

    def _targets(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        return self.labels(x, y)  # the base objective's ``targets`` hook

    # -- the Defense protocol ----------------------------------------------------------------
    def before_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        self._progress = ctx.progress
        self._ensure_teacher(model)        # before any weight perturbation of a wrapper (AWP)
        self.base_objective.before_loss(model, x, y, ctx)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The base's adversarial examples; PGD-AT's CE ascent runs on ``P_rect`` (the code's)."""
        self._ensure_teacher(model)
        soft = self.labels(x, y) if self.base == "pgd-at" else y
        return self.base_objective.perturb(model, x, soft)

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        loss, logs = self.base_objective.objective(model, x, x_adv, y, reduction=reduction)
        return loss, {**logs, "adr_temperature": self.temperature(self._progress),
                      "adr_interpolation": self.interpolation(self._progress)}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.objective(model, x, self.perturb(model, x, y), y)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        self.base_objective.after_step(model, ctx)
        self._cache = None
        self.update_teacher(model)

    @torch.no_grad()
    def update_teacher(self, model: nn.Module) -> None:
        """``teacher <- decay * teacher + (1 - decay) * model`` over the whole state dict; under DDP
        the model's floating buffers (BN statistics, per rank) are rank 0's."""
        teacher = self._ensure_teacher(model)
        src = unwrap(model).state_dict()
        if replicated(model):  # rank 0's buffers: what DDP broadcasts each forward and the checkpoint holds
            bufs = {n for n, _ in unwrap(model).named_buffers()}
            own = {n: v.detach().clone() for n, v in src.items() if n in bufs and v.is_floating_point()}
            broadcast_from_rank0(list(own.values()))
            src = {**src, **own}
        for n, e in teacher.state_dict().items():
            m = src[n].detach()
            if e.is_floating_point():
                e.lerp_(m.to(e.dtype), 1.0 - self.ema_decay)
            else:
                e.copy_(m)

    def exported_models(self) -> dict[str, nn.Module]:
        """``{"ema": teacher}`` once the teacher exists (the Trainer saves it as ``<checkpoint>-ema``)."""
        return {"ema": self.teacher} if self.teacher is not None else {}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None:
            return {"teacher": dict(self._pending)} if self._pending is not None else {}
        return {"teacher": {n: v.detach().clone() for n, v in self.teacher.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if set(state) != {"teacher"} or not isinstance(state["teacher"], dict):
            raise CheckpointError(f"adr: expected the EMA teacher in the checkpoint's defense state, "
                                  f"got {sorted(state)}")
        self.teacher, self._pending = None, dict(state["teacher"])  # loaded into the copy at the next step

    def params(self) -> dict[str, Any]:
        inner = {k: v for k, v in self.base_objective.params().items() if k not in ("defense", "preset")}
        return {**inner, **super().params(), "defense": self.name}
