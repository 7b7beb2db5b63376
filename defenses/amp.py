"""Adversarial model perturbation (AMP), wrapping any objective.

Zheng, Zhang, Mao, "Regularizing Neural Networks via Adversarial Model Perturbation", CVPR 2021
(https://arxiv.org/abs/2010.04925); code hiyouga/AMP-Regularizer (``amp.py``, ``main.py``).

AMP minimizes the worst loss in a norm ball around the weights, ``max_{||D|| <= eps} L(w + D)``,
approximating the inner max by ``inner_steps`` steps of gradient ascent of size ``inner_lr``,
each followed by a projection onto the ball: ``D_0 = 0``, ``D_{k+1} = clip(D_k + inner_lr *
grad L(w + D_k))``; the training step uses the gradient at ``w + D_K`` and is applied at ``w``.
It is one rule of the weight-perturbation mechanism of ``defenses.weight_perturbation``
(perturb before the loss, step, restore bit-exactly after the step); the ascent gradients come
from the proxy copy, on the adversarial examples made once with ``w`` (as for AWP).

Defaults: the code's (and the paper's CIFAR-10 PreActResNet-18 setting): ``eps = 0.5``,
``inner_lr = 1``, ``inner_steps = 1``.

Where the code differs from the paper, and what we follow:
- The ball: the paper writes one norm ball over all parameters; the code clips each parameter
  tensor's ``D`` to norm ``eps`` separately (``clip_coef = eps / (||D_p|| + 1e-12)``, applied when
  below 1). We follow the code (its defaults were tuned with it).
- Perturbed tensors: every trainable parameter (biases and batch norm included), as in the code.
- The code's closure clips every gradient, the inner ones included, to norm 50 (``--clip_norm``);
  we do not clip the inner gradients (the trainer's ``grad_clip`` acts on the step's gradient).
- Batch norm: the code's closure runs the model in train mode ``inner_steps + 1`` times per
  batch, updating the running statistics each time; here the proxy does the inner passes and
  the model's statistics are updated once, by the trainer's forward.
- DDP: each inner gradient is averaged over the ranks before it is used (``ascent``), so every
  replica applies the same ``D`` (the global batch's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defenses._adversarial import check_positive
from defenses.base import Defense
from defenses.sam import all_trainable
from defenses.weight_perturbation import _WeightPerturbation
from robustkit.registry import DEFENSES

_NORM_EPS = 1e-12  # as in the code


@DEFENSES.register("amp", help="adversarial model perturbation (Zheng et al. 2021), wraps any objective")
class AMP(_WeightPerturbation):
    """AMP: ``inner_steps`` projected gradient-ascent steps on the weights, per-tensor balls.

    Args (keyword-only after ``inner``, an objective or its registry name):
        epsilon: radius of each parameter tensor's L2 ball (0.5, the code's default); 0 turns the
            perturbation off.
        inner_lr: ascent step size (1, the code's default).
        inner_steps: ascent steps (1, the code's ``--inner_iter``).
        warmup_epochs: epochs without perturbation first (default 0).
    """

    name = "amp"
    DEFAULTS = {"trades": (1.0, 0), "at": (1.0, 0)}

    def __init__(self, inner: Defense | str, *, epsilon: float = 0.5, inner_lr: float = 1.0, inner_steps: int = 1,
                 warmup_epochs: int = 0, **inner_params: Any) -> None:
        epsilon = check_positive("epsilon", epsilon, allow_zero=True)
        # the base adds gamma * direction; the direction here is D itself (gamma 1, or 0 when off)
        super().__init__(inner, gamma=1.0 if epsilon > 0 else 0.0, warmup_epochs=warmup_epochs, **inner_params)
        self.epsilon = epsilon
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.inner_steps = check_positive("inner_steps", inner_steps, integer=True)

    def _perturbed(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return all_trainable(model)

    def _clip(self, d: torch.Tensor) -> torch.Tensor:
        """``d`` scaled onto the ``epsilon`` ball when outside it (the code's clip_coef < 1)."""
        return d * (self.epsilon / (d.norm() + _NORM_EPS)).clamp(max=1.0)   # no host sync

    def direction(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        """``D_K`` ``{name: tensor}`` after ``inner_steps`` projected ascent steps from 0."""
        names = [n for n, _ in self._perturbed(model)]
        dev: dict[str, torch.Tensor] = {}
        for _ in range(self.inner_steps):
            proxy = self.proxy(model, dev)                                    # weights w + D_k
            g = self.ascent(proxy, names, self._objective(proxy, x, x_adv, y), across=model)
            dev = {n: self._clip(dev[n] + self.inner_lr * g[n] if n in dev else self.inner_lr * g[n])
                   for n in names}
        return dev

    def params(self) -> dict[str, Any]:
        return {"weight_perturbation": self.name, "epsilon": self.epsilon, "inner_lr": self.inner_lr,
                "inner_steps": self.inner_steps, "warmup_epochs": self.warmup_epochs, "inner": self.inner.params()}
