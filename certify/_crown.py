"""The CROWN backward pass of CROWN-IBP.

Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably Robust Neural
Networks" (ICLR 2020, arXiv:1906.06316): IBP gives the pre-activation bounds ``[l, u]`` of
every ReLU; one linear backward pass from the margin specification (``e_y - e_j`` already
folded into the last Linear) then bounds ``A z + c`` by relaxing each ReLU linearly:

    upper:  relu(z) <= u / (u - l) * (z - l)               (the chord through (l, 0), (u, u))
    lower:  relu(z) >= alpha * z,  alpha = 1 if u > -l else 0   (the paper's adaptive slope)

for unstable neurons (``l < 0 < u``); stable ones are exactly linear. A positive coefficient
takes the lower relaxation and a negative one the upper, so the result is a lower bound.
Finally ``A x + c`` is concretized over the pixel box ``[max(x - eps, 0), min(x + eps, 1)]``
(Normalize is just another affine layer on the way back), and for ``norm="l2"`` also over
the L2 ball (``- eps ||A||_2``); the larger of the two is kept (both are sound).

Costs about ``K - 1`` backward passes (one per margin); differentiable for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certify.ibp import UnsupportedLayerError, _Trace, bn_affine, input_box
from robustkit.zoo import Normalize


def _per_channel(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``(1, C, 1, ...)`` -> broadcastable against ``A`` of shape ``(B, S, C, ...)``."""
    return v.reshape(1, 1, -1, *([1] * (a.dim() - 3)))


def _channel_sums(a: torch.Tensor) -> torch.Tensor:
    """``(B, S, C, ...)`` -> ``(B, S, C)``: coefficients summed over positions (for per-channel biases)."""
    return a.flatten(3).sum(-1) if a.dim() > 3 else a


def _relu_back(a: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Relax ``relu`` with pre-activation bounds ``[lo, hi]`` (``(B, *shape)``) for a lower bound."""
    lo, hi = lo.flatten(1).unsqueeze(1), hi.flatten(1).unsqueeze(1)          # (B, 1, N)
    unstable, active = (lo < 0) & (hi > 0), (lo >= 0).to(a.dtype)
    up_slope = torch.where(unstable, hi / (hi - lo).clamp_min(1e-12), active)  # chord through (l, 0), (u, u)
    lo_slope = torch.where(unstable, (hi > -lo).to(a.dtype), active)          # adaptive: 1 if u > -l else 0
    up_icpt = torch.where(unstable, -lo * up_slope, 0.0)                      # (B, 1, N)
    flat = a.flatten(2)                                                        # (B, S, N)
    neg = flat.clamp(max=0)                                                    # negative A: upper relaxation
    c = c + torch.einsum("bsn,bn->bs", neg, up_icpt.squeeze(1))
    return (flat * lo_slope + neg * (up_slope - lo_slope)).view_as(a), c


def _conv_back(layer: nn.Conv2d, a: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """``A W`` for a conv: transposed conv of ``A`` ``(B, S, Co, Ho, Wo)`` -> ``(B, S, Ci, Hi, Wi)``."""
    b, s = a.shape[:2]
    flat = a.reshape(b * s, *a.shape[2:])
    out_pad = [in_shape[d + 1] - ((a.shape[d + 3] - 1) * layer.stride[d] - 2 * layer.padding[d]
                                  + layer.dilation[d] * (layer.kernel_size[d] - 1) + 1) for d in range(2)]
    back = F.conv_transpose2d(flat, layer.weight, None, layer.stride, layer.padding, out_pad, layer.groups,
                              layer.dilation)
    return back.view(b, s, *in_shape)


def _pool_back(layer: nn.Module, a: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """``A J`` for a linear, bias-free pooling layer, via a vector-Jacobian product."""
    b, s = a.shape[:2]
    z = a.new_zeros(b * s, *in_shape)
    _, vjp = torch.func.vjp(layer, z)
    return vjp(a.reshape(b * s, *a.shape[2:]))[0].view(b, s, *in_shape)


def _layer_back(layer: nn.Module, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the linear function ``A z_out + c`` to the layer's input (affine layers only)."""
    if isinstance(layer, nn.Linear):
        if layer.bias is not None:
            c = c + a @ layer.bias
        return a @ layer.weight, c
    if isinstance(layer, nn.Conv2d):
        if layer.bias is not None:
            c = c + _channel_sums(a) @ layer.bias
        return _conv_back(layer, a, in_shape), c
    if isinstance(layer, Normalize):  # z = x / std - mean / std
        std, mean = layer.std.to(a.dtype).flatten(), layer.mean.to(a.dtype).flatten()
        return a / _per_channel(std, a), c - _channel_sums(a) @ (mean / std)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = bn_affine(layer, a.dim() - 1)
        return a * _per_channel(scale, a), c + _channel_sums(a) @ shift.flatten()
    if isinstance(layer, nn.Flatten):
        return a.reshape(*a.shape[:2], *in_shape), c
    if isinstance(layer, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _pool_back(layer, a, in_shape), c
    if isinstance(layer, (nn.Identity, nn.Dropout)):
        return a, c
    raise UnsupportedLayerError(f"{type(layer).__name__} is not supported by crown-ibp; use method='ibp'")


def concretize(a: torch.Tensor, c: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """``min A x' + c`` over the pixel box (and the L2 ball for ``norm="l2"``): ``(B, S)``."""
    lo, hi = input_box(x, eps)                                               # (B, C, H, W)
    a = a.reshape(*a.shape[:2], -1)                                          # (B, S, N)
    s, d = (hi + lo).flatten(1), (hi - lo).flatten(1)                        # 2 * centre, 2 * radius
    lb = 0.5 * (torch.einsum("bsn,bn->bs", a, s) - torch.einsum("bsn,bn->bs", a.abs(), d)) + c
    if norm == "l2":
        lb = torch.maximum(lb, torch.einsum("bsn,bn->bs", a, x.flatten(1)) + c - eps.view(-1, 1) * a.norm(dim=2))
    return lb


def crown_backward(layers: list[tuple[str, nn.Module]], trace: _Trace, spec_w: torch.Tensor, spec_b: torch.Tensor,
                   x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Lower bound of ``spec_w z + spec_b`` over the input set, where ``z`` is the output of ``layers``.

    spec_w: ``(B, S, *out_shape)`` (the folded last layer), spec_b: ``(B, S)``; trace: from the
    IBP pass (input shapes of ``layers``, ReLU pre-activation bounds). Returns ``(B, S)``.
    """
    a, c = spec_w, spec_b
    for i in range(len(layers) - 1, -1, -1):
        path, layer = layers[i]
        if isinstance(layer, nn.ReLU):
            a, c = _relu_back(a, c, *trace.pre[i])
        elif isinstance(layer, nn.MaxPool2d):
            raise UnsupportedLayerError(f"{path}: MaxPool2d is not supported by crown-ibp (no linear relaxation "
                                        "implemented); use method='ibp'")
        else:
            a, c = _layer_back(layer, a, c, trace.shapes[i])
    return concretize(a, c, x, eps, norm)
