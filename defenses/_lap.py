"""LAP's layer-aware weight perturbation (Lin et al., ICML 2024), used by fast-at (``lap_beta > 0``).

Lin, Yu, Han, Su, Liu, "Layer-Aware Analysis of Catastrophic Overfitting: Revealing the Pseudo-Robust
Shortcut Dependency", ICML 2024 (https://arxiv.org/abs/2405.16262); code tmllab/2024_ICML_LAP
(``CIFAR10/LAP.py``, ``CIFAR10/utils.py``: ``diff_in_weights``, ``add_into_weights``).

Per batch, the code takes one forward/backward at the FGSM start point ``x + delta_0`` that gives both
the input gradient (FGSM) and the weights' gradient; it lets the optimizer take its step on a copy,
keeps the difference ``d_l = w_l' - w_l`` of every perturbed tensor (conv / linear weights: more than
one dimension, ``weight`` in the name, the AWP rule), puts the weights and the optimizer state back,
and moves each such tensor, numbered ``l = 1..n`` in parameter order, by

    w_l <- w_l + lambda_l * beta * ||w_l|| / (||d_l|| + 1e-20) * d_l,
    lambda_l = 1 - (ln l / ln L) ** gamma                      (1 for the first layer, 0 at l = L)

so the former layers, where the paper finds the pseudo-robust shortcuts form, are perturbed most.
The training loss (CE at the FGSM point) is then taken at the moved weights and the optimizer steps
from there; the move is *not* undone afterwards (``LAP.py`` has no restore, unlike AWP).

Here the optimizer's step is computed rather than taken (``step_direction``): for SGD the update
direction with its weight decay, momentum buffer, dampening and Nesterov flag (exactly what
``opt.step()`` would do, up to the learning rate, which cancels in the normalization); for any other
optimizer the plain descent direction ``-g``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS = 1e-20  # the code's


def layer_scales(n: int, layers: int, gamma: float) -> list[float]:
    """``[lambda_1, ..., lambda_n]`` with ``lambda_l = 1 - (ln l / ln layers) ** gamma`` (``n <= layers``)."""
    if layers == 1:
        return [1.0] * n
    return [1.0 - (math.log(i) / math.log(layers)) ** gamma for i in range(1, n + 1)]


def step_direction(optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter],
                   grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The direction (up to the learning rate) of the step ``optimizer`` would take on ``params`` with
    ``grads``: SGD's ``-(g + wd w)``, through its momentum buffer (``buf' = m buf + (1 - dampening)
    (g + wd w)``, the first step ``buf' = g + wd w``; Nesterov adds ``m buf'``); ``-g`` otherwise."""
    if not isinstance(optimizer, torch.optim.SGD):
        return [-g for g in grads]
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out = []
    for p, g in zip(params, grads):
        group = group_of.get(id(p))
        if group is None:  # not optimized: no step
            out.append(torch.zeros_like(g))
            continue
        d = g + group["weight_decay"] * p.detach() if group["weight_decay"] else g
        m = group["momentum"]
        if m:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            buf = d if buf is None else m * buf + (1.0 - group["dampening"]) * d
            d = d + m * buf if group["nesterov"] else buf
        out.append(-d)
    return out


@torch.no_grad()
def perturb_layers(params: list[nn.Parameter], directions: list[torch.Tensor], beta: float,
                   scales: list[float]) -> None:
    """In place: ``w_l += scales[l] * beta * ||w_l|| / (||d_l|| + EPS) * d_l`` (no host sync)."""
    for p, d, lam in zip(params, directions, scales):
        p.add_((lam * beta) * p.norm() / (d.norm() + EPS) * d)
