"""Per-layer rules of bound propagation: ONE table, layer type -> ``Rule``.

Every supported leaf module has

- ``interval``: the image of an input box ``[lo, hi]`` under the layer (IBP, Gowal et al. 2018,
  arXiv:1810.12715, in centre/radius form ``mu' = W mu + b, r' = |W| r`` for affine layers and
  ``[h(lo), h(hi)]`` for monotone ones);
- ``backward``: how a linear function ``A z_out + c`` of the layer's output moves to its input as
  a *lower* bound (the CROWN backward pass of CROWN-IBP, Zhang et al. 2020, arXiv:1906.06316):
  exact for affine layers, a linear relaxation from the IBP input box for nonlinear ones.

and optionally the exact L2-ball rules used before the first affine layer (``l2_carry`` moves
the ball's centre and per-pixel scale through Normalize / reshapes, ``l2_exact`` bounds the
first Linear/Conv2d by the dual norm) and a ``check`` that rejects module states the rules do
not model (BatchNorm in train mode, ...). ``certify/ibp.py`` (forward) and ``certify/_crown.py``
(backward) both read this table and nothing else about layers: supporting one more layer type
is one entry here.

Shapes: boxes ``(B, *shape)``; backward coefficients ``A`` ``(B, S, *shape)`` for ``S``
specifications, offsets ``c`` ``(B, S)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.errors import InputError
from robustkit.zoo import Normalize, RobustModel, unwrap

Box = tuple[torch.Tensor, torch.Tensor]


class UnsupportedLayerError(InputError):
    """The model contains a module (or a module state) that bound propagation cannot handle."""


@dataclass(frozen=True)
class Rule:
    interval: Callable[[nn.Module, torch.Tensor, torch.Tensor], Box]
    backward: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Size, Box | None], Box]
    needs_bounds: bool = False       # backward relaxes with the IBP box at the layer's input
    passthrough: bool = False        # the identity on a flat (B, D) input: last-layer elision looks past it
    l2_carry: Callable[[nn.Module, torch.Tensor, torch.Tensor], Box] | None = None
    l2_exact: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], Box] | None = None
    check: Callable[[nn.Module, str], None] | None = None


class Trace:
    """What the backward pass needs from the IBP pass: every layer's input shape, and the input
    box of every layer whose rule ``needs_bounds``."""

    def __init__(self) -> None:
        self.shapes: list[torch.Size] = []
        self.bounds: dict[int, Box] = {}


def input_box(x: torch.Tensor, eps: torch.Tensor) -> Box:
    """The L-inf ball of radius ``eps (B,)`` around ``x (B, C, H, W)`` intersected with [0, 1]."""
    e = eps.view(-1, *([1] * (x.dim() - 1)))
    return (x - e).clamp(0.0, 1.0), (x + e).clamp(0.0, 1.0)


def bn_affine(bn: nn.Module, dim: int) -> Box:
    """Eval-mode BatchNorm as ``scale * z + shift``; both shaped ``(1, C, 1, ...)`` for ``dim``-D inputs."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = (1, -1) + (1,) * (dim - 2)
    return scale.view(shape), shift.view(shape)


# -- interval rules (IBP) ---------------------------------------------------------------------
def _monotone(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> Box:
    """Elementwise non-decreasing layers (ReLU, max pooling, reshapes, Normalize with std > 0)."""
    return layer(lo), layer(hi)


def _linear_iv(layer: nn.Linear, lo: torch.Tensor, hi: torch.Tensor) -> Box:
    w = 0.5 * layer.weight                                   # the 1/2 of mu and r, folded into W
    mu, r = F.linear(hi + lo, w, layer.bias), F.linear(hi - lo, w.abs())
    return mu - r, mu + r


def _conv_iv(layer: nn.Conv2d, lo: torch.Tensor, hi: torch.Tensor) -> Box:
    w = 0.5 * layer.weight
    mu, r = layer._conv_forward(hi + lo, w, layer.bias), layer._conv_forward(hi - lo, w.abs(), None)
    return mu - r, mu + r


def _bn_iv(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> Box:
    scale, shift = bn_affine(layer, lo.dim())
    mu, r = (hi + lo) * 0.5 * scale + shift, (hi - lo) * 0.5 * scale.abs()
    return mu - r, mu + r


def _pool_iv(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> Box:
    """Average pooling: linear with weights >= 0."""
    mu, r = layer((hi + lo) * 0.5), layer((hi - lo) * 0.5)
    return mu - r, mu + r


# -- backward rules (CROWN) -------------------------------------------------------------------
def _per_channel(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``(C,)`` or ``(1, C, 1, ...)`` -> broadcastable against ``A`` of shape ``(B, S, C, ...)``."""
    return v.reshape(1, 1, -1, *([1] * (a.dim() - 3)))


def _channel_sums(a: torch.Tensor) -> torch.Tensor:
    """``(B, S, C, ...)`` -> ``(B, S, C)``: coefficients summed over positions (for per-channel biases)."""
    return a.flatten(3).sum(-1) if a.dim() > 3 else a


def _linear_back(layer: nn.Linear, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, _: Box | None) -> Box:
    if layer.bias is not None:
        c = c + a @ layer.bias
    return a @ layer.weight, c


def _conv_back(layer: nn.Conv2d, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, _: Box | None) -> Box:
    """``A W``: a transposed conv of ``A`` ``(B, S, Co, Ho, Wo)`` -> ``(B, S, Ci, Hi, Wi)``."""
    if layer.bias is not None:
        c = c + _channel_sums(a) @ layer.bias
    b, s = a.shape[:2]
    out_pad = [in_shape[d + 1] - ((a.shape[d + 3] - 1) * layer.stride[d] - 2 * layer.padding[d]
                                  + layer.dilation[d] * (layer.kernel_size[d] - 1) + 1) for d in range(2)]
    back = F.conv_transpose2d(a.reshape(b * s, *a.shape[2:]), layer.weight, None, layer.stride, layer.padding,
                              out_pad, layer.groups, layer.dilation)
    return back.view(b, s, *in_shape), c


def _normalize_back(layer: Normalize, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, _: Box | None) -> Box:
    std, mean = layer.std.to(a.dtype).flatten(), layer.mean.to(a.dtype).flatten()   # z = x / std - mean / std
    return a / _per_channel(std, a), c - _channel_sums(a) @ (mean / std)


def _bn_back(layer: nn.Module, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, _: Box | None) -> Box:
    scale, shift = bn_affine(layer, a.dim() - 1)
    return a * _per_channel(scale, a), c + _channel_sums(a) @ shift.flatten()


def _flatten_back(layer: nn.Module, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, _: Box | None) -> Box:
    return a.reshape(*a.shape[:2], *in_shape), c


def _identity_back(layer: nn.Module, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, _: Box | None) -> Box:
    return a, c


def _pool_back(layer: nn.Module, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, _: Box | None) -> Box:
    """``A J`` for a linear, bias-free pooling layer, via a vector-Jacobian product."""
    b, s = a.shape[:2]
    _, vjp = torch.func.vjp(layer, a.new_zeros(b * s, *in_shape))
    return vjp(a.reshape(b * s, *a.shape[2:]))[0].view(b, s, *in_shape), c


def _relu_back(layer: nn.Module, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, box: Box | None) -> Box:
    """Relax ``relu`` on unstable neurons (``l < 0 < u``) for a lower bound of ``A relu(z) + c``:

        upper:  relu(z) <= u / (u - l) * (z - l)                  (the chord through (l, 0), (u, u))
        lower:  relu(z) >= alpha * z,  alpha = 1 if u > -l else 0  (the paper's adaptive slope)

    positive coefficients take the lower relaxation, negative ones the upper; stable neurons are exact.
    """
    lo, hi = (t.flatten(1).unsqueeze(1) for t in box)                          # (B, 1, N)
    unstable, active = (lo < 0) & (hi > 0), (lo >= 0).to(a.dtype)
    up_slope = torch.where(unstable, hi / (hi - lo).clamp_min(1e-12), active)
    lo_slope = torch.where(unstable, (hi > -lo).to(a.dtype), active)
    up_icpt = torch.where(unstable, -lo * up_slope, 0.0)                      # (B, 1, N)
    flat = a.flatten(2)                                                        # (B, S, N)
    neg = flat.clamp(max=0)
    c = c + torch.einsum("bsn,bn->bs", neg, up_icpt.squeeze(1))
    return (flat * lo_slope + neg * (up_slope - lo_slope)).view_as(a), c


def _maxpool_back(layer: nn.MaxPool2d, a: torch.Tensor, c: torch.Tensor, in_shape: torch.Size, box: Box | None
                  ) -> Box:
    """Relax ``max`` over each window for a lower bound of ``A maxpool(z) + c``:

        lower:  max_w z >= z_k   (k = the window's input with the largest box centre)
        upper:  max_w z <= max_w u

    Both are sound for any ``k``; at eps = 0 both are exact. Positive coefficients move to ``z_k``,
    negative ones multiply the constant upper bound.
    """
    lo, hi = box                                                               # (B, C, H, W)
    args = (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
    _, idx = F.max_pool2d((lo + hi) * 0.5, *args, return_indices=True)        # (B, C, Ho, Wo) into H*W
    upper = F.max_pool2d(hi, *args)                                            # (B, C, Ho, Wo)
    b, s = a.shape[:2]
    pos, neg = a.clamp(min=0), a.clamp(max=0)                                  # (B, S, C, Ho, Wo)
    c = c + (neg * upper.unsqueeze(1)).flatten(2).sum(2)
    index = idx.flatten(2).unsqueeze(1).expand(b, s, -1, -1)                   # (B, S, C, Ho*Wo)
    back = a.new_zeros(b, s, in_shape[0], in_shape[1] * in_shape[2])
    back = back.scatter_add(3, index, pos.flatten(3))
    return back.view(b, s, *in_shape), c


# -- exact L2 ball before the first affine layer ------------------------------------------------
def _l2_normalize(layer: Normalize, point: torch.Tensor, scale: torch.Tensor) -> Box:
    return layer(point), scale / layer.std.to(scale.dtype)


def _l2_reshape(layer: nn.Module, point: torch.Tensor, scale: torch.Tensor) -> Box:
    return layer(point), layer(scale)


def _l2_linear(layer: nn.Linear, point: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor) -> Box:
    """Image of an L2 ball under ``layer(diag(scale) z)``: centre ``layer(point)``, radius
    ``eps * ||W_row * scale||_2`` (the dual norm), as ``(lo, hi)``."""
    rad = F.linear(scale.square(), layer.weight.square()).sqrt() * eps.view(-1, 1)
    mu = layer(point)
    return mu - rad, mu + rad


def _l2_conv(layer: nn.Conv2d, point: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor) -> Box:
    """As ``_l2_linear``; ``sqrt(conv(scale^2, W^2))`` handles the zero padding at the borders."""
    rad = layer._conv_forward(scale.square(), layer.weight.square(), None).sqrt() * eps.view(-1, 1, 1, 1)
    mu = layer(point)
    return mu - rad, mu + rad


# -- module states the rules do not model -------------------------------------------------------
def _check_bn(m: nn.Module, path: str) -> None:
    if m.training or m.running_mean is None:
        raise UnsupportedLayerError(
            f"{path}: {type(m).__name__} in train mode (or without running stats) uses batch statistics, which "
            "bound propagation does not model; call model.eval() to certify, and use a BN-free net (ibp-small/"
            "medium/large) for IBP training")


def _check_dropout(m: nn.Dropout, path: str) -> None:
    if m.training and m.p > 0:
        raise UnsupportedLayerError(f"{path}: Dropout(p={m.p}) in train mode is random; call model.eval() or use p=0")


def _check_maxpool(m: nn.MaxPool2d, path: str) -> None:
    if m.return_indices:
        raise UnsupportedLayerError(f"{path}: MaxPool2d(return_indices=True) is not supported")


def _check_conv(m: nn.Conv2d, path: str) -> None:
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{path}: Conv2d(padding_mode={m.padding_mode!r}) is not supported; use 'zeros'")


_POOL = Rule(_pool_iv, _pool_back)
_BN = Rule(_bn_iv, _bn_back, check=_check_bn)
RULES: dict[type[nn.Module], Rule] = {
    Normalize: Rule(_monotone, _normalize_back, l2_carry=_l2_normalize),
    nn.Linear: Rule(_linear_iv, _linear_back, l2_exact=_l2_linear),
    nn.Conv2d: Rule(_conv_iv, _conv_back, l2_exact=_l2_conv, check=_check_conv),
    nn.ReLU: Rule(_monotone, _relu_back, needs_bounds=True),
    nn.MaxPool2d: Rule(_monotone, _maxpool_back, needs_bounds=True, check=_check_maxpool),
    nn.BatchNorm1d: _BN,
    nn.BatchNorm2d: _BN,
    nn.AvgPool2d: _POOL,
    nn.AdaptiveAvgPool2d: _POOL,
    nn.Flatten: Rule(_monotone, _flatten_back, passthrough=True, l2_carry=_l2_reshape),
    nn.Identity: Rule(_monotone, _identity_back, passthrough=True, l2_carry=_l2_reshape),
    nn.Dropout: Rule(_monotone, _identity_back, passthrough=True, l2_carry=_l2_reshape, check=_check_dropout),
}
SUPPORTED = ", ".join(t.__name__ for t in RULES) + " (BatchNorm and Dropout in eval mode), nested in nn.Sequential"


def rule_of(m: nn.Module) -> Rule | None:
    """The rule of ``m``'s type (or of its nearest supported base class), else None."""
    return next((RULES[t] for t in type(m).__mro__ if t in RULES), None)


# -- the model as a flat list of layers ---------------------------------------------------------
def layers_of(model: nn.Module) -> list[tuple[str, nn.Module, Rule]]:
    """Flatten ``model`` into ``[(path, leaf, rule)]`` in execution order, or raise naming the culprit.
    DDP / DataParallel wrappers are unwrapped (gradients still reach the shared parameters)."""
    model = unwrap(model)
    if isinstance(model, RobustModel):
        if getattr(model, "resize", None) is not None:
            raise UnsupportedLayerError(
                "resize: the model resizes its input inside (--resize); bound propagation through the "
                "interpolation is not implemented: certify it with smoothing (--method smoothing)")
        return _flatten(model.normalize, "normalize") + _flatten(model.net, "net")
    return _flatten(model, "model")


def _flatten(m: nn.Module, path: str) -> list[tuple[str, nn.Module, Rule]]:
    if type(m) is nn.Sequential:
        return [item for name, child in m.named_children() for item in _flatten(child, f"{path}.{name}")]
    rule = rule_of(m)
    if rule is not None:
        if rule.check is not None:
            rule.check(m, path)
        return [(path, m, rule)]
    inner = sorted({type(c).__name__ for c in m.modules()
                    if c is not m and type(c) is not nn.Sequential and rule_of(c) is None})
    hint = f" (it contains {', '.join(inner)})" if inner else ""
    raise UnsupportedLayerError(
        f"{path}: {type(m).__name__}{hint} is not supported by bound propagation: a module with a custom forward() "
        f"(e.g. the residual adds of PreActBlock in preact-resnet18/wrn) cannot be followed; residual "
        f"adds are unsupported. Supported: {SUPPORTED}. Use ibp-small/medium/large for certified training.")
