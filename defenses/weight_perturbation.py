"""Adversarial (AWP) and robust (RWP) weight perturbation, wrapping any objective.

- AWP: Wu, Xia, Wang, "Adversarial Weight Perturbation Helps Robust Generalization",
  NeurIPS 2020 (https://arxiv.org/abs/2004.05884); code csdongxian/AWP.
- RWP: Yu, Han, Gong, Shen, Geng, Liu, "Robust Weight Perturbation for Adversarial
  Training", IJCAI 2022 (https://arxiv.org/abs/2205.14826); code
  ChaojianYu/Robust-Weight-Perturbation.

The mechanism (``_WeightPerturbation``: perturb before the loss, step, restore bit-exactly) is
shared by every weight-perturbation rule; a rule is its ``direction`` (and, if it perturbs other
tensors, ``_perturbed``). Other rules on it: ``defenses/sam.py`` (SAM / ASAM) and
``defenses/amp.py`` (AMP).

Per batch, as in both codes: the adversarial examples are generated once with the
unperturbed weights (``inner.perturb``); a proxy copy of the model ascends the objective
on them; the weights are moved by ``gamma * v``; the trainer computes the objective on the
same examples, back-propagates and steps; ``after_step`` removes the perturbation.

The removal is bit-exact: the pre-perturbation weights ``w0`` and the perturbed ones ``w1``
are saved and the weights become ``w0 + (w - w1)``, so an optimizer step that changes
nothing gives back ``w0`` bit for bit (``w - gamma * v`` after ``w + gamma * v`` does not).

The proxy is a deep copy of the model (reloaded from it each batch) run in train mode as in
the codes; its batch-norm statistics are thrown away, the model's are never touched by the
attack (eval mode) or the proxy. Perturbed tensors: parameters with more than one dimension
whose name contains ``weight`` (conv / linear weights; not biases, not batch-norm), as in the
codes. The proxies' SGD learning rates (AWP 0.01 for AT, the main LR 0.1 for TRADES) cancel in
the normalizations below, so the ascent direction is the plain gradient.

Under DDP each rank's proxy sees only its shard of the batch, and DDP reduces the gradients
of the trainer's loss, not these ``autograd.grad`` calls: every ascent gradient is averaged
over the ranks (``ascent``) before it is used, so it is the gradient of the objective on the
global batch (equal per-rank batches) and every replica applies the same perturbation, bit
for bit. Neither rule draws random numbers (RWP here is Yu et al.'s *robust* perturbation,
not a random one); the random starts of the adversarial examples differ per rank, as they
must (different images).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from defenses._adversarial import check_positive
from defenses.base import Defense, StepContext, average_across_replicas, replicated
from robustkit.errors import InputError
from robustkit.registry import DEFENSES
from robustkit.zoo import unwrap

_EPS = 1e-20  # as in both codes


class _WeightPerturbation(Defense):
    """Shared machinery; subclasses implement ``direction`` -> ``{name: v}`` (the weights move by
    ``gamma * v``) and may override ``_perturbed`` (which tensors)."""

    # (gamma, warmup_epochs) when the inner objective is TRADES / anything else
    DEFAULTS: dict[str, tuple[float, int]] = {}

    def __init__(self, inner: Defense | str, *, gamma: float | None = None, warmup_epochs: int | None = None,
                 **inner_params: Any) -> None:
        if isinstance(inner, str):
            inner = DEFENSES.get(inner)(**inner_params)
        elif inner_params:
            raise InputError(f"unexpected keyword arguments {sorted(inner_params)} (inner objective already built)")
        if not isinstance(inner, Defense) or isinstance(inner, _WeightPerturbation):
            raise InputError(f"{self.name} wraps one objective (a Defense, not another weight perturbation), "
                             f"got {type(inner).__name__}")
        self.inner = inner
        g0, w0 = self.DEFAULTS["trades" if getattr(inner, "name", "") == "trades" else "at"]
        self.gamma = check_positive("gamma", g0 if gamma is None else gamma, allow_zero=True)
        self.warmup_epochs = check_positive("warmup_epochs", w0 if warmup_epochs is None else warmup_epochs,
                                            integer=True, allow_zero=True)
        self._proxy: nn.Module | None = None
        self._proxy_of = 0
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None       # (x, x_adv) of this step
        self._saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, w0, w1)

    # -- the inner objective, split ----------------------------------------------------
    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner.perturb(model, x, y) if hasattr(self.inner, "perturb") else x

    def _objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
        if hasattr(self.inner, "objective"):
            return self.inner.objective(model, x, x_adv, y, reduction=reduction)[0]
        if reduction != "mean":
            raise InputError(f"{self.name} needs per-sample losses: the inner objective {self.inner.name!r} "
                             "must implement perturb() and objective() (pgd-at, trades, mart do)")
        return self.inner.loss(model, x, y)[0]  # a plain objective: its loss, its own inner max

    # -- the proxy --------------------------------------------------------------------
    def _perturbed(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in unwrap(model).named_parameters()
                if p.dim() > 1 and "weight" in n and p.requires_grad]

    def proxy(self, model: nn.Module, offset: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The proxy, loaded with the model's weights (+ ``offset``), in the model's mode."""
        net = unwrap(model)
        if self._proxy is None or self._proxy_of != id(net):
            self._proxy, self._proxy_of = copy.deepcopy(net), id(net)
        self._proxy.load_state_dict(net.state_dict())
        if offset:
            with torch.no_grad():
                for n, p in self._proxy.named_parameters():
                    if n in offset:
                        p.add_(offset[n])
        self._proxy.train(net.training)
        return self._proxy

    def ascent(self, proxy: nn.Module, names: list[str], loss: torch.Tensor, across: nn.Module | None = None
               ) -> dict[str, torch.Tensor]:
        """The gradient of ``loss`` w.r.t. the proxy's perturbed tensors (the SGD ascent direction),
        averaged over the DDP ranks when ``across`` (the trainer's model) is a DDP replica."""
        params = dict(proxy.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        out = {n: (g if g is not None else torch.zeros_like(params[n])).detach() for n, g in zip(names, grads)}
        if across is not None and replicated(across):
            average_across_replicas(list(out.values()))
        return out

    def direction(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- the Defense protocol -------------------------------------------------------------
    def before_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        self.inner.before_loss(model, x, y, ctx)
        self._restore()  # a step that never reached after_step (exception) must not leak
        x_adv = self._perturb(model, x, y)
        self._batch = (x, x_adv)
        if self.gamma == 0 or ctx.epoch < self.warmup_epochs:
            return
        v = self.direction(model, x, x_adv, y)
        with torch.no_grad():
            for n, p in self._perturbed(model):
                w0 = p.detach().clone()
                p.add_(v[n], alpha=self.gamma)
                self._saved.append((p, w0, p.detach().clone()))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        if self._batch is not None and self._batch[0] is x:
            x_adv = self._batch[1]
        else:  # called without before_loss (e.g. evaluation of the objective): no perturbation
            x_adv = self._perturb(model, x, y)
        self._batch = None
        if hasattr(self.inner, "objective"):
            loss, logs = self.inner.objective(model, x, x_adv, y)
        else:
            loss, logs = self.inner.loss(model, x, y)
        return loss, {**logs, "wp_active": float(bool(self._saved))}

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        self._restore()
        self.inner.after_step(model, ctx)

    def _restore(self) -> None:
        """``w <- w0 + (w - w1)``: removes the perturbation, keeps the optimizer's step."""
        with torch.no_grad():
            for p, w0, w1 in self._saved:
                p.copy_(w0 + (p - w1))
        self._saved = []

    def params(self) -> dict[str, Any]:
        return {"weight_perturbation": self.name, "gamma": self.gamma, "warmup_epochs": self.warmup_epochs,
                **{k: v for k, v in vars(self).items() if k in ("c_min", "iterations")},
                "inner": self.inner.params()}


@DEFENSES.register("awp", help="adversarial weight perturbation (Wu et al. 2020), wraps any objective")
class AWP(_WeightPerturbation):
    """AWP: one ascent step of a proxy on the objective, per-layer relative size.

    ``v_l = ||w_l|| / (||d_l|| + 1e-20) * d_l`` with ``d`` the proxy's ascent step on the
    objective at the adversarial examples; the trainer's step is taken at ``w + gamma * v``.

    Args (keyword-only after ``inner``, an objective or its registry name):
        gamma: perturbation size relative to each layer's norm. Default from the code:
            5e-3 with TRADES (``trades_AWP/train_trades_cifar.py``), 1e-2 otherwise (AT-AWP).
        warmup_epochs: epochs without perturbation first. Default: 9 with TRADES (the code's
            ``--awp-warmup 10`` with epochs counted from 1: AWP is on from the 10th epoch), 0
            otherwise. Use 0 when fine-tuning a trained model.
    """

    name = "awp"
    DEFAULTS = {"trades": (5e-3, 9), "at": (1e-2, 0)}

    def direction(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self._perturbed(model)]
        proxy = self.proxy(model)
        d = self.ascent(proxy, names, self._objective(proxy, x, x_adv, y), across=model)
        w = dict(self._perturbed(model))
        return {n: w[n].detach().norm() / (d[n].norm() + _EPS) * d[n] for n in names}


@DEFENSES.register("rwp", help="robust weight perturbation (Yu et al. 2022), wraps any objective")
class RWP(_WeightPerturbation):
    """RWP: AWP restricted by the Loss Stationary Condition, several ascent steps, global scale.

    ``iterations`` times (the paper's K2): the proxy at ``w + gamma * v`` takes an ascent step
    on the per-sample objective masked to the samples whose loss is below ``c_min`` (only
    those may drive the perturbation: samples already at high loss need no more); the steps
    accumulate in ``d`` and ``v = ||w|| / (||d|| + 1e-20) * d`` with the norms taken over all
    perturbed tensors together (one global scale, unlike AWP's per-layer one).

    About the code: its TRADES variant (``trades_AWP_RWP/utils_rwp.py``) adds the per-sample CE
    ``(B,)`` to the KL with ``reduction='none'``, shape ``(B, K)``; that broadcasts only when
    ``B == K`` and then pairs sample ``j``'s CE with class ``j``'s KL term (otherwise it raises),
    and the ``c_min`` mask is applied per (sample, class) entry. We sum the KL over classes
    first, so the mask selects whole samples by their TRADES loss, as the paper describes.

    Args (keyword-only after ``inner``):
        gamma: global relative size; default 5e-3 with TRADES, 1e-2 otherwise (the codes').
        warmup_epochs: default 9 with TRADES, 0 otherwise (as AWP's).
        c_min: the LSC threshold on the per-sample loss (1.7 in both codes).
        iterations: ascent iterations K2 (10 in both codes).
    """

    name = "rwp"
    DEFAULTS = {"trades": (5e-3, 9), "at": (1e-2, 0)}

    def __init__(self, inner: Defense | str, *, gamma: float | None = None, warmup_epochs: int | None = None,
                 c_min: float = 1.7, iterations: int = 10, **inner_params: Any) -> None:
        super().__init__(inner, gamma=gamma, warmup_epochs=warmup_epochs, **inner_params)
        self.c_min = check_positive("c_min", c_min)
        self.iterations = check_positive("iterations", iterations, integer=True)
        if not hasattr(self.inner, "objective"):
            raise InputError(f"rwp needs per-sample losses: the inner objective {self.inner.name!r} must implement "
                             "perturb() and objective() (pgd-at, trades, mart do)")

    def direction(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        w = dict(self._perturbed(model))
        names = list(w)
        w_norm = torch.cat([w[n].detach().flatten() for n in names]).norm()
        diff: dict[str, torch.Tensor] = {n: torch.zeros_like(w[n]) for n in names}
        scaled: dict[str, torch.Tensor] = {}
        for _ in range(self.iterations):
            proxy = self.proxy(model, {n: self.gamma * s for n, s in scaled.items()})
            per = self._objective(proxy, x, x_adv, y, reduction="none")           # (B,)
            keep = (per.detach() < self.c_min).to(per.dtype)                     # (B,) the LSC
            step = self.ascent(proxy, names, (per * keep).mean(), across=model)
            diff = {n: diff[n] + step[n] for n in names}
            scale = w_norm / (torch.cat([diff[n].flatten() for n in names]).norm() + _EPS)
            scaled = {n: scale * diff[n] for n in names}
        return scaled
