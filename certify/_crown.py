"""The CROWN backward pass of CROWN-IBP.

Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably Robust Neural
Networks" (ICLR 2020, arXiv:1906.06316): IBP gives the input box of every nonlinear layer;
one linear backward pass from the margin specification (``e_y - e_j`` already folded into the
last Linear) then bounds ``A z + c`` from below, moving through each layer with its
``backward`` rule from ``certify/_layers.py`` (exact for affine layers, a linear relaxation
for ReLU and max pooling). Finally ``A x + c`` is concretized over the pixel box
``[max(x - eps, 0), min(x + eps, 1)]`` (Normalize is just another affine layer on the way
back), and for ``norm="l2"`` also over the L2 ball (``- eps ||A||_2``); the larger of the two
is kept (both are sound).

Costs about ``K - 1`` backward passes (one per margin); differentiable for training.
"""

from __future__ import annotations

import torch
from torch import nn

from certify._layers import Rule, Trace, input_box


def concretize(a: torch.Tensor, c: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """``min A x' + c`` over the pixel box (and the L2 ball for ``norm="l2"``): ``(B, S)``."""
    lo, hi = input_box(x, eps)                                               # (B, C, H, W)
    a = a.reshape(*a.shape[:2], -1)                                          # (B, S, N)
    s, d = (hi + lo).flatten(1), (hi - lo).flatten(1)                        # 2 * centre, 2 * radius
    lb = 0.5 * (torch.einsum("bsn,bn->bs", a, s) - torch.einsum("bsn,bn->bs", a.abs(), d)) + c
    if norm == "l2":
        lb = torch.maximum(lb, torch.einsum("bsn,bn->bs", a, x.flatten(1)) + c - eps.view(-1, 1) * a.norm(dim=2))
    return lb


def crown_backward(layers: list[tuple[str, nn.Module, Rule]], trace: Trace, spec_w: torch.Tensor,
                   spec_b: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Lower bound of ``spec_w z + spec_b`` over the input set, where ``z`` is the output of ``layers``.

    spec_w: ``(B, S, *out_shape)`` (the folded last layer), spec_b: ``(B, S)``; trace: from the
    IBP pass (input shapes of ``layers``, input boxes of the layers that need them). Returns ``(B, S)``.
    """
    a, c = spec_w, spec_b
    for i in range(len(layers) - 1, -1, -1):
        _, layer, rule = layers[i]
        a, c = rule.backward(layer, a, c, trace.shapes[i], trace.bounds.get(i))
    return concretize(a, c, x, eps, norm)
