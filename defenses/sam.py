"""Sharpness-aware minimization (SAM) and its adaptive variant (ASAM), wrapping any objective.

- SAM: Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently
  Improving Generalization", ICLR 2021 (https://arxiv.org/abs/2010.01412); code
  google-research/sam (JAX), the PyTorch port davda54/sam.
- ASAM: Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
  Learning of Deep Neural Networks", ICML 2021 (https://arxiv.org/abs/2102.11600); code
  SamsungLabs/ASAM (``asam.py``).

SAM is one rule of the weight-perturbation mechanism of ``defenses.weight_perturbation``
(perturb before the loss, step, restore bit-exactly after the step): per batch, the gradient
``g`` of the objective at the current weights ``w`` (on the adversarial examples made once with
``w``, as for AWP) gives ``e(w) = rho * g / ||g||_2`` (the first-order solution of the inner
``max_{||e|| <= rho} L(w + e)``, eq. 2 of the paper, p = 2); the trainer's gradient is taken at
``w + e(w)`` and the optimizer steps from ``w``. ASAM rescales by ``T_w = |w| + eta``
(elementwise, tensors named ``weight``; 1 for the others, as in ``asam.py``):
``e = rho * T_w^2 g / ||T_w g||_2``.

Where the codes differ from the paper / each other, and what we follow:
- Perturbed tensors: every trainable parameter (biases and batch norm included), as in both codes
  (AWP/RWP perturb only conv / linear weights).
- Weight decay: google-research/sam adds the L2 penalty to the loss whose gradient makes ``e``;
  davda54/sam and ASAM leave it to the base optimizer. We follow the PyTorch codes: ``e`` comes from
  the objective alone and the optimizer's ``weight_decay`` acts on the step.
- m-sharpness: google-research/sam computes ``e`` per accelerator from its own sub-batch (the
  paper's ``m``). Here the ascent gradient is averaged over the DDP ranks first (``ascent``), so
  every replica applies the same ``e``, that of the global batch (project contract 9).
- Batch norm: the gradient ``g`` comes from the proxy copy in train mode; the model's running
  statistics are updated once per step, by the trainer's forward (davda54/sam updates them on
  both passes unless told not to).
- Denominator: ``||g|| + 1e-12`` (davda54/sam; ASAM uses 1e-16).

Defaults: ``rho = 0.05`` (SAM's CIFAR default, davda54/sam), ``0.5`` and ``eta = 0.01`` when
``adaptive`` (ASAM's code defaults); no warm-up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defenses._adversarial import check_positive
from defenses.base import Defense
from defenses.weight_perturbation import _WeightPerturbation
from robustkit.errors import InputError
from robustkit.registry import DEFENSES
from robustkit.zoo import unwrap

_NORM_EPS = 1e-12  # davda54/sam


def all_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every trainable parameter of the (unwrapped) model: what SAM / AMP perturb."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def global_norm(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``||concat(tensors)||_2``, a 0-dim tensor."""
    return torch.cat([t.flatten() for t in tensors.values()]).norm()


@DEFENSES.register("sam", help="sharpness-aware minimization (Foret et al. 2021; adaptive: ASAM), wraps any objective")
class SAM(_WeightPerturbation):
    """SAM / ASAM: the step's gradient is taken at ``w + rho * T^2 g / ||T g||`` (``T = 1`` for SAM).

    Args (keyword-only after ``inner``, an objective or its registry name):
        rho: the radius of the weight neighbourhood; default 0.05 (SAM), 0.5 when ``adaptive``.
            0 turns the perturbation off (plain training of the inner objective).
        adaptive: ASAM's scale-invariant neighbourhood ``T_w = |w| + eta`` (Kwon et al. 2021).
        eta: ASAM's offset (0.01, its code's default); used only when ``adaptive``.
        warmup_epochs: epochs without perturbation first (default 0).
    """

    name = "sam"
    DEFAULTS = {"trades": (0.05, 0), "at": (0.05, 0)}

    def __init__(self, inner: Defense | str, *, rho: float | None = None, adaptive: bool = False,
                 eta: float = 0.01, warmup_epochs: int = 0, **inner_params: Any) -> None:
        if not isinstance(adaptive, bool):
            raise InputError(f"adaptive must be true or false, got {adaptive!r}")
        rho = check_positive("rho", (0.5 if adaptive else 0.05) if rho is None else rho, allow_zero=True)
        super().__init__(inner, gamma=rho, warmup_epochs=warmup_epochs, **inner_params)
        self.adaptive = adaptive
        self.eta = check_positive("eta", eta, allow_zero=True)

    @property
    def rho(self) -> float:
        return self.gamma

    def _perturbed(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return all_trainable(model)

    def direction(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        """The unit-size direction (the base scales it by ``rho``): ``T^2 g / ||T g||``."""
        w = dict(self._perturbed(model))
        names = list(w)
        proxy = self.proxy(model)
        g = self.ascent(proxy, names, self._objective(proxy, x, x_adv, y), across=model)
        if not self.adaptive:
            return {n: g[n] / (global_norm(g) + _NORM_EPS) for n in names}
        t = {n: w[n].detach().abs() + self.eta if "weight" in n else torch.ones_like(w[n]) for n in names}
        tg = {n: t[n] * g[n] for n in names}
        norm = global_norm(tg) + _NORM_EPS
        return {n: t[n] * tg[n] / norm for n in names}

    def params(self) -> dict[str, Any]:
        return {"weight_perturbation": self.name, "rho": self.rho, "adaptive": self.adaptive,
                **({"eta": self.eta} if self.adaptive else {}), "warmup_epochs": self.warmup_epochs,
                "inner": self.inner.params()}
