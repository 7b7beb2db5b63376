"""Fast adversarial training (Wong et al. 2020): FGSM from a uniform random start, cross-entropy.

Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020
(https://arxiv.org/abs/2001.03994); code locuslab/fast_adversarial (``CIFAR10/train_fgsm.py``,
``CIFAR10/train_cifar.py``). The rest of the recipe is the LR schedule (``cyclic`` in
``defenses.schedules``) and early stopping on catastrophic overfitting (``defenses._overfit``),
checked here in the Trainer's ``end_epoch`` hook on a fixed probe batch.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from defenses._adversarial import AdversarialObjective, TargetsFn, accuracy_logs, check_positive, reduce
from defenses._lap import layer_scales, perturb_layers, step_direction
from defenses._overfit import OverfitDetector
from defenses.base import StepContext, average_across_replicas, gather_objects, replicated
from robustkit.errors import InputError
from robustkit.modes import eval_mode
from robustkit.registry import DEFENSES
from robustkit.threat import parse_eps
from robustkit.zoo import unwrap

# CIFAR-10: eps 8/255, alpha 10/255 = 1.25 eps (train_fgsm.py --epsilon 8 --alpha 10; the paper's
# 1.25 eps). MNIST: eps 0.3, alpha 0.375 = 1.25 eps (the paper's MNIST setting). The probe check is
# train_fgsm.py's early-stopping PGD: 5 steps of 2/255 = eps/4 (eps/4 for MNIST too), one restart.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 8 / 255, "step_size": 10 / 255},
    "mnist": {"eps": 0.3, "step_size": 0.375},
}


@DEFENSES.register("fast-at", help="fast AT (Wong et al. 2020): FGSM from a random start, step 1.25 eps, "
                                   "with catastrophic-overfitting detection")
class FastAT(AdversarialObjective):
    """``CE(f(x + delta), y)`` with ``delta`` one FGSM step from a uniform random start.

    Inner step (Wong et al., Algorithm 3): ``delta ~ U(-eps, eps)`` (``ThreatModel.random_start``,
    clipped to ``[0, 1]`` as in ``train_fgsm.py``), one signed-gradient step of ``alpha`` on the
    cross-entropy, projection onto the ball and ``[0, 1]``. Outer loss: mean CE on ``x + delta``.

    Catastrophic-overfitting check (``co_check``): after every ``co_every`` epochs (the Trainer's
    ``end_epoch`` hook), PGD (``co_steps`` steps of ``co_step_size``, random start) and this FGSM
    attack are run on a probe batch (the first ``co_batch`` images of the first training batch, as
    in the official code), in eval mode with a private generator (deterministic; the training RNG
    is untouched). ``OverfitDetector(co_drop)`` flags a fall of the PGD accuracy by more than
    ``co_drop`` from its best while the FGSM accuracy did not fall: the epoch record then gets
    ``co_detected = 1`` and a warning is issued. With ``early_stop`` (Wong et al.'s remedy) the
    weights of the last healthy check are put back and training stops (``stop_training``);
    the checkpoint written for that epoch holds the restored weights.

    Differences from the official code (which we follow otherwise): the FGSM gradient is taken in
    eval mode like every objective here (the code runs it in train mode, so batch-norm statistics
    see the FGSM start points too); the collapse is measured from the best PGD accuracy, not only
    from the previous epoch's (see ``defenses._overfit``); ``train_cifar.py`` additionally clips
    gradients at 0.5 (``grad_clip`` in the recipe) and peaks the LR at 2/5 of training.

    Under DDP the probe is the *global* first batch: every rank's ``co_batch`` first images are
    gathered once (rank order) and every rank holds and probes all of them (with ``co_batch`` at
    least the per-rank batch, the images of the one-process probe with the same global batch). The
    two accuracies are then averaged over the ranks (``average_across_replicas``: the same bits on
    every rank even if kernels were not deterministic) before the detector sees them, so every
    rank takes the same decision and stops at the same epoch (tested under torchrun). Since the
    probe is the same on every rank, the checkpoint's copy (written by rank 0) is right for every
    rank on resume; the restored weights are identical too (DDP keeps the replicas equal).

    LAP (``lap_beta > 0``; Lin et al., "Layer-Aware Analysis of Catastrophic Overfitting: Revealing
    the Pseudo-Robust Shortcut Dependency", ICML 2024, https://arxiv.org/abs/2405.16262; code
    tmllab/2024_ICML_LAP): before each step the conv / linear weights move by a layer-aware amount
    ``lambda_l * lap_beta * ||w_l|| * d_l / ||d_l||``, ``lambda_l = 1 - (ln l / ln L) ** lap_gamma``
    (the first layer the most, layer ``L`` not at all), ``d`` the optimizer's step direction at the
    FGSM start point; the training loss is taken there and the move is kept (see ``defenses._lap``).
    The one forward/backward at the start point gives both the FGSM input gradient and the weight
    gradient, as in the code. The code's recipes (``README.md``, PreAct ResNet-18, 30 epochs, cyclic
    LR to 0.2, SGD momentum 0.9, wd 5e-4, ``lap_gamma`` 0.3, ``L`` = 21 = its number of conv / linear
    weights): R-LAP (this objective: ``init="uniform"``, alpha 1.25 eps) ``lap_beta`` 0.002 / 0.03 /
    0.05 / 0.3 at eps 8 / 12 / 16 / 32 (/255); V-LAP (``init="zero"``, alpha = eps) 0.03 / 0.058 /
    0.07 / 0.48; its N-LAP (N-FGSM: noise in 2 eps, no projection) has no counterpart here.
    Differences: the gradients are taken in eval mode (the code: train mode); the optimizer's step
    is computed, not taken on a copy (the same for SGD; ``-g`` for other optimizers); ``lap_layers``
    defaults to the model's own number of such weights (the code hard-codes 21 / 35 / 50 per
    architecture). Under DDP the weight gradient is averaged over the ranks first (every replica
    moves identically); resume needs no extra state (the momentum buffers are the optimizer's).
    I could read the code and the abstract, not the paper's Algorithm 1: the sign (the move follows
    the optimizer's step, a descent direction) and the missing restore are the code's.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (eps 8/255, alpha 10/255) or ``"mnist"`` (eps 0.3, alpha 0.375).
        norm, eps, step_size: the threat model and ``alpha`` (1.25 eps in the paper). An ``eps`` given
            without ``step_size`` keeps the preset's ratio: ``alpha = 1.25 eps`` (not the preset's absolute
            alpha, which a one-step attack would clip to a plain FGSM at a smaller eps).
        init: ``"uniform"`` (the paper) or ``"zero"`` (plain FGSM training, which overfits).
        co_check, co_every, co_batch, co_steps, co_step_size (None: eps/4), co_drop, co_fgsm_rise,
        co_seed: the overfitting check. early_stop: restore and stop on detection.
        lap_beta (0: off), lap_gamma (0.3), lap_layers (None: the model's count): LAP.
        label_smoothing / targets: soft labels for the CE (see ``AdversarialObjective``).
    """

    name = "fast-at"
    PRESETS = PRESETS

    def __init__(self, *, preset: str | None = "cifar10", norm: str = "linf", eps: float | str | None = None,
                 step_size: float | str | None = None, init: str = "uniform", co_check: bool = True,
                 co_every: int = 1, co_batch: int = 128, co_steps: int = 5, co_step_size: float | None = None,
                 co_drop: float = 0.2, co_fgsm_rise: bool = True, co_seed: int = 0, early_stop: bool = False,
                 lap_beta: float = 0.0, lap_gamma: float = 0.3, lap_layers: int | None = None,
                 label_smoothing: float = 0.0, targets: TargetsFn | None = None) -> None:
        if eps is not None and step_size is None and preset in PRESETS:   # keep the preset's alpha / eps (1.25)
            p = PRESETS[preset]
            step_size = p["step_size"] / p["eps"] * parse_eps(eps)
        self._setup(preset, norm, eps, 1, step_size, label_smoothing, targets)
        if init not in ("uniform", "zero"):
            raise InputError(f"init must be 'uniform' or 'zero', got {init!r}")
        self.init = init
        self.co_check, self.early_stop, self.co_fgsm_rise = bool(co_check), bool(early_stop), bool(co_fgsm_rise)
        self.co_every = check_positive("co_every", co_every, integer=True)
        self.co_batch = check_positive("co_batch", co_batch, integer=True)
        self.co_steps = check_positive("co_steps", co_steps, integer=True)
        self.co_step_size = check_positive("co_step_size", co_step_size if co_step_size is not None
                                           else self.eps / 4)
        self.co_seed = check_positive("co_seed", co_seed, integer=True, allow_zero=True)
        self.lap_beta = check_positive("lap_beta", lap_beta, allow_zero=True)
        self.lap_gamma = check_positive("lap_gamma", lap_gamma)
        self.lap_layers = None if lap_layers is None else check_positive("lap_layers", lap_layers, integer=True)
        self._lap_batch: tuple[torch.Tensor, torch.Tensor] | None = None   # (x, x_adv) of this step
        self._detector = OverfitDetector(co_drop, co_fgsm_rise)
        self.co_drop = self._detector.drop
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None   # (P, C, H, W), (P,)
        self._healthy: dict[str, torch.Tensor] | None = None           # weights of the last healthy check
        self._stop = False

    @property
    def stop_training(self) -> bool:
        """True once catastrophic overfitting was detected with ``early_stop`` (the Trainer stops)."""
        return self._stop

    # -- the objective ---------------------------------------------------------------
    def fgsm(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """``x + delta`` ``(B, C, H, W)``: one step of ``step_size`` from the start (eval mode)."""
        x = x.detach()
        with eval_mode(model), torch.enable_grad():
            x_adv = self.tm.random_start(x, generator) if self.init == "uniform" else x.clone()
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [x_adv])                    # input gradient only
            x_adv = self.tm.project(self.tm.step(x_adv.detach(), grad, self.step_size), x)
        return x_adv.detach()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._lap_batch is not None and self._lap_batch[0] is x:  # LAP made it in before_loss
            return self._lap_batch[1]
        return self.fgsm(model, x, y)

    # -- LAP ---------------------------------------------------------------------------
    def lap_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 optimizer: torch.optim.Optimizer | None) -> torch.Tensor:
        """LAP: the FGSM point ``x + delta`` ``(B, C, H, W)``, and (in place) the layer-aware move of the
        weights, from one forward/backward at the start point (eval mode, on the unwrapped model)."""
        net = unwrap(model)
        params, layers = self._lap_params(net)
        x = x.detach()
        with eval_mode(net), torch.enable_grad():
            x0 = self.tm.random_start(x) if self.init == "uniform" else x.clone()
            x0.requires_grad_(True)
            loss = F.cross_entropy(net(x0).float(), y)                       # the code's mean CE
            gx, *gw = torch.autograd.grad(loss, [x0, *params], allow_unused=True)
        x_adv = self.tm.project(self.tm.step(x0.detach(), gx, self.step_size), x)
        grads = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(gw, params)]
        if replicated(model):
            average_across_replicas(grads)                             # the global batch's gradient
        perturb_layers(params, step_direction(optimizer, params, grads), self.lap_beta,
                       layer_scales(len(params), layers, self.lap_gamma))
        return x_adv.detach()

    def _lap_params(self, model: nn.Module) -> tuple[list[nn.Parameter], int]:
        """LAP's perturbed tensors (conv / linear weights: more than one dimension, ``weight`` in the name,
        trainable) in parameter order, and ``L`` (``lap_layers``, default their number)."""
        params = [p for n, p in unwrap(model).named_parameters() if p.dim() > 1 and "weight" in n and p.requires_grad]
        layers = self.lap_layers if self.lap_layers is not None else len(params)
        if len(params) > layers:
            raise InputError(f"fast-at: lap_layers ({layers}) must be at least the model's number of conv / linear "
                             f"weights ({len(params)}); leave it unset to use that number")
        return params, layers

    def check_model(self, model: nn.Module) -> None:
        """``InputError`` when LAP's ``lap_layers`` is below the model's number of conv / linear weights (the
        train pipeline asks before anything is written)."""
        if self.lap_beta > 0:
            self._lap_params(model)

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        logits_adv = model(x_adv)                                   # (B, K)
        loss = reduce(self.ce(logits_adv, x, y), reduction)
        return loss, accuracy_logs(loss, None, logits_adv, y)

    # -- the catastrophic-overfitting check --------------------------------------------
    def before_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        self._lap_batch = (x, self.lap_step(model, x, y, ctx.optimizer)) if self.lap_beta > 0 else None
        if self.co_check and self._probe is None:  # the first training batch (train_fgsm.py: first_batch)
            px, py = x[:self.co_batch].detach().clone(), y[:self.co_batch].detach().clone()   # (P, C, H, W), (P,)
            if replicated(model):  # every rank's slice, in rank order: the same probe on every rank
                parts = gather_objects((px.cpu(), py.cpu()))
                px = torch.cat([p[0] for p in parts]).to(x.device)       # (W * P, C, H, W)
                py = torch.cat([p[1] for p in parts]).to(y.device)       # (W * P,)
            self._probe = (px, py)

    def probe_accuracies(self, model: nn.Module) -> tuple[float, float]:
        """(PGD accuracy, FGSM accuracy) on the probe batch, averaged over DDP ranks."""
        acc = self._local_accuracies(unwrap(model))                  # (2,)
        if replicated(model):
            average_across_replicas([acc])
        return float(acc[0]), float(acc[1])

    def _local_accuracies(self, net: nn.Module) -> torch.Tensor:
        """``[PGD accuracy, FGSM accuracy]`` ``(2,)`` of ``net`` on this rank's copy of the probe."""
        assert self._probe is not None
        device = next(net.parameters()).device
        x, y = (t.to(device) for t in self._probe)                  # (P, C, H, W), (P,)
        g = torch.Generator(device=device).manual_seed(self.co_seed)
        tm = self.tm
        with eval_mode(net):
            x_pgd = tm.random_start(x, g)
            with torch.enable_grad():
                for _ in range(self.co_steps):
                    x_pgd.requires_grad_(True)
                    loss = F.cross_entropy(net(x_pgd).float(), y, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, [x_pgd])
                    x_pgd = tm.project(tm.step(x_pgd.detach(), grad, self.co_step_size), x)
            x_fgsm = self.fgsm(net, x, y, g)
            with torch.no_grad():
                return torch.stack([(net(x_pgd).argmax(1) == y).float().mean(),
                                    (net(x_fgsm).argmax(1) == y).float().mean()])   # (2,)

    def end_epoch(self, model: nn.Module, ctx: StepContext) -> dict[str, Any]:
        """The Trainer's epoch-end hook (every rank): metrics ``co_pgd_acc``, ``co_fgsm_acc``,
        ``co_detected``; on detection with ``early_stop`` restores the last healthy weights."""
        if not self.co_check or self._probe is None or (ctx.epoch + 1) % self.co_every:
            return {}
        pgd, fgsm = self.probe_accuracies(model)
        was = self._detector.detected
        detected = self._detector.update(pgd, fgsm)
        out: dict[str, Any] = {"co_pgd_acc": pgd, "co_fgsm_acc": fgsm, "co_detected": int(detected)}
        if detected and not was:
            main = not dist.is_initialized() or dist.get_rank() == 0
            if main:
                warnings.warn(f"fast-at, epoch {ctx.epoch + 1}: {self._detector.message()}"
                              + ("; stopping with the weights of the last healthy check" if self.early_stop
                                 else "; set early_stop=True to stop and keep the weights before it"),
                              RuntimeWarning, stacklevel=2)
            if self.early_stop:
                if self._healthy is not None:
                    unwrap(model).load_state_dict(self._healthy)
                    out["co_restored"] = 1
                self._stop = True
        elif not detected and self.early_stop:
            self._healthy = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
        return out

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"detector": self._detector.state_dict(), "stop_training": self._stop,
                "probe": list(self._probe) if self._probe is not None else None,
                "healthy": copy.copy(self._healthy)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        if not s:  # a checkpoint without fast-at state: nothing to restore
            return
        self._detector.load_state_dict(s["detector"])
        self._stop = bool(s["stop_training"])
        self._probe = (s["probe"][0], s["probe"][1]) if s.get("probe") is not None else None
        self._healthy = s.get("healthy")
