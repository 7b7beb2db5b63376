"""Interval bound propagation (IBP) and CROWN-IBP certificates.

Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training
Verifiably Robust Models" (arXiv:1810.12715): push the input box
``[max(x - eps, 0), min(x + eps, 1)]`` through the network in centre/radius form

    mu' = W mu + b,      r' = |W| r          (affine layers: Linear, Conv2d, Normalize, BN eval, AvgPool)
    [l, u] -> [h(l), h(u)]                   (monotone layers: ReLU, MaxPool2d, Flatten)

and bound the margins ``z_y - z_j`` with *last-layer elision*: the specification
``e_y - e_j`` is folded into the final ``Linear`` (``W' = W_y - W_j``, ``b' = b_y - b_j``),
which is never looser than subtracting the interval bounds of ``z_y`` and ``z_j``.

``method="crown-ibp"`` (Zhang et al. 2020, "Towards Stable and Efficient Training of
Verifiably Robust Neural Networks", arXiv:1906.06316, see ``certify/_crown.py``) adds a
linear backward bound from the margin specification. CROWN-IBP is *not* always tighter
than IBP, so the certificate uses the elementwise max of both lower bounds (each is
sound, so the max is sound and never looser than IBP).

Supported models: a ``RobustModel`` (or any ``nn.Sequential``) whose leaves are
Normalize, Linear, Conv2d, ReLU, Flatten, BatchNorm1d/2d (eval mode, running stats),
AvgPool2d, AdaptiveAvgPool2d, MaxPool2d (IBP only), Identity and Dropout (eval mode),
nested in ``nn.Sequential``. Anything else -- in particular residual blocks with a custom
``forward`` (``preact-resnet18``, ``wrn``) -- raises ``UnsupportedLayerError``.

Norms: ``"linf"``; ``"l2"`` bounds the first Linear/Conv2d by the dual norm
``eps * ||W_row / std||_2`` (intersected with the L-inf box, which contains the L2 ball).

All certificates here are deterministic: a sample certified at ``eps`` has no adversarial
example in the ball (up to floating-point rounding of the bound computation itself).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from certify.base import Certificate
from robustkit.modes import eval_mode
from robustkit.registry import CERTIFIERS
from robustkit.threat import parse_eps
from robustkit.zoo import Normalize, RobustModel

METHODS = ("ibp", "crown-ibp")
_PASSTHROUGH = (nn.Identity, nn.Dropout)
_SUPPORTED = (Normalize, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
              nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Identity, nn.Dropout)
_SUPPORTED_NAMES = "Normalize, Linear, Conv2d, ReLU, Flatten, BatchNorm1d/2d (eval), AvgPool2d, " \
                   "AdaptiveAvgPool2d, MaxPool2d, Identity, Dropout (eval), nested in nn.Sequential"


class UnsupportedLayerError(ValueError):
    """The model contains a module (or a module state) that bound propagation cannot handle."""


# -- the model as a flat list of layers -------------------------------------------------
def layers_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Flatten ``model`` into ``[(path, leaf)]`` in execution order, or raise naming the culprit.
    DDP / DataParallel wrappers are unwrapped (gradients still reach the shared parameters)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if isinstance(model, RobustModel):
        return [("normalize", model.normalize)] + _flatten(model.net, "net")
    return _flatten(model, "model")


def _flatten(m: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    if type(m) is nn.Sequential:
        return [item for name, child in m.named_children() for item in _flatten(child, f"{path}.{name}")]
    if isinstance(m, _SUPPORTED):
        _check_state(m, path)
        return [(path, m)]
    inner = sorted({type(c).__name__ for c in m.modules() if c is not m and not isinstance(c, (*_SUPPORTED,
                                                                                                nn.Sequential))})
    hint = f" (it contains {', '.join(inner)})" if inner else ""
    raise UnsupportedLayerError(
        f"{path}: {type(m).__name__}{hint} is not supported by bound propagation: a module with a custom forward() "
        f"(e.g. the residual adds of PreActBlock/WideBasic in preact-resnet18/wrn) cannot be followed; residual "
        f"adds are unsupported. Supported: {_SUPPORTED_NAMES}. Use ibp-small/medium/large for certified training.")


def _check_state(m: nn.Module, path: str) -> None:
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and (m.training or m.running_mean is None):
        raise UnsupportedLayerError(
            f"{path}: {type(m).__name__} in train mode (or without running stats) uses batch statistics, which "
            "bound propagation does not model; call model.eval() to certify, and use a BN-free net (ibp-small/"
            "medium/large) for IBP training")
    if isinstance(m, nn.Dropout) and m.training and m.p > 0:
        raise UnsupportedLayerError(f"{path}: Dropout(p={m.p}) in train mode is random; call model.eval() or use p=0")
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise UnsupportedLayerError(f"{path}: MaxPool2d(return_indices=True) is not supported")
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{path}: Conv2d(padding_mode={m.padding_mode!r}) is not supported; use 'zeros'")


def bn_affine(bn: nn.Module, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``scale * z + shift``; both shaped ``(1, C, 1, ...)`` for ``dim``-D inputs."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = (1, -1) + (1,) * (dim - 2)
    return scale.view(shape), shift.view(shape)


# -- inputs ---------------------------------------------------------------------------
def check_eps(eps: float | str | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """eps (float, fraction string or ``(B,)`` tensor) as a ``(B,)`` tensor on ``x``; ``ValueError`` if < 0."""
    if isinstance(eps, torch.Tensor):
        eps = eps.detach().to(x.device, x.dtype)
        if eps.dim() == 0:
            eps = eps.expand(x.shape[0])
        if eps.shape != (x.shape[0],):
            raise ValueError(f"tensor eps must have shape (B,) = ({x.shape[0]},), got {tuple(eps.shape)}")
        if not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
            raise ValueError("eps must be finite and >= 0")
        return eps
    return torch.full((x.shape[0],), parse_eps(eps), device=x.device, dtype=x.dtype)


def _norm(norm: str) -> str:
    n = str(norm).lower().replace("-", "").replace("_", "")
    n = {"inf": "linf"}.get(n, n)
    if n not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}; allowed: linf, l2")
    return n


def input_box(x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The L-inf ball intersected with [0, 1]: ``(lo, hi)``, each ``(B, C, H, W)``."""
    e = eps.view(-1, *([1] * (x.dim() - 1)))
    return (x - e).clamp(0.0, 1.0), (x + e).clamp(0.0, 1.0)


# -- one layer of IBP -----------------------------------------------------------------
# The state is the box (lo, hi). An affine layer maps the centre mu = (hi + lo) / 2 and the radius
# r = (hi - lo) / 2; the 1/2 is folded into the (small) weight tensors instead of the activations.
def _affine(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact image of the box under an affine layer, in centre/radius form ``(mu, r)``."""
    if isinstance(layer, nn.Linear):
        w = 0.5 * layer.weight
        return F.linear(hi + lo, w, layer.bias), F.linear(hi - lo, w.abs())
    if isinstance(layer, nn.Conv2d):
        w = 0.5 * layer.weight
        return layer._conv_forward(hi + lo, w, layer.bias), layer._conv_forward(hi - lo, w.abs(), None)
    mu, r = (hi + lo) * 0.5, (hi - lo) * 0.5
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = bn_affine(layer, mu.dim())
        return mu * scale + shift, r * scale.abs()
    # AvgPool2d, AdaptiveAvgPool2d: linear with weights >= 0
    return layer(mu), layer(r)


def ibp_layer(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Propagate the box ``(lo, hi)`` through one supported layer."""
    if isinstance(layer, (nn.ReLU, nn.MaxPool2d, nn.Flatten, Normalize, *_PASSTHROUGH)):  # monotone (std > 0)
        return layer(lo), layer(hi)
    mu, r = _affine(layer, lo, hi)
    return mu - r, mu + r


def _l2_first_layer(layer: nn.Module, point: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact image of an L2 ball under ``layer(diag(scale) z)``: centre ``layer(point)``, radius
    ``eps * ||W_row * scale||_2`` (dual norm; ``sqrt(conv(scale^2, W^2))`` handles conv borders)."""
    e = eps.view(-1, *([1] * (point.dim() - 1)))
    if isinstance(layer, nn.Linear):
        rad = F.linear(scale.square(), layer.weight.square()).sqrt()
        return layer(point), e * rad
    rad = layer._conv_forward(scale.square(), layer.weight.square(), None).sqrt()
    return layer(point), e.view(-1, 1, 1, 1) * rad


# -- the specification (margins z_y - z_j, j != y) -------------------------------------
def other_classes(y: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, K-1)`` indices ``j != y`` in increasing order."""
    j = torch.arange(k - 1, device=y.device).expand(y.shape[0], -1)
    return j + (j >= y.view(-1, 1)).long()


def _fold_spec(last: nn.Linear, y: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer elision: ``W' = W_y - W_j`` ``(B, K-1, D)``, ``b' = b_y - b_j`` ``(B, K-1)``."""
    w = last.weight[y].unsqueeze(1) - last.weight[others]
    b = last.bias if last.bias is not None else last.weight.new_zeros(last.out_features)
    return w, b[y].unsqueeze(1) - b[others]


def _elision_index(layers: list[tuple[str, nn.Module]]) -> int | None:
    """Index of the final Linear if only pass-through layers follow it, else None."""
    for i in range(len(layers) - 1, -1, -1):
        m = layers[i][1]
        if isinstance(m, nn.Linear):
            return i
        if not isinstance(m, (*_PASSTHROUGH, nn.Flatten)):
            return None
    return None


# -- the propagation loop ---------------------------------------------------------------
class _Trace:
    """What CROWN needs from the IBP pass: input shape of every layer, pre-activation bounds of every ReLU."""

    def __init__(self) -> None:
        self.shapes: list[torch.Size] = []
        self.pre: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _propagate(layers: list[tuple[str, nn.Module]], x: torch.Tensor, eps: torch.Tensor, norm: str,
               stop: int | None = None, trace: _Trace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP through ``layers[:stop]``; returns the box ``(lo, hi)`` at the input of ``layers[stop]``."""
    lo, hi = input_box(x, eps)                                   # (B, C, H, W)
    l2 = norm == "l2"
    point, scale = x, torch.ones_like(x[:1])                     # L2: ball centre and per-pixel scale
    for i, (_, layer) in enumerate(layers[:stop]):
        if trace is not None:
            trace.shapes.append(lo.shape[1:])
            if isinstance(layer, nn.ReLU):
                trace.pre[i] = (lo, hi)
        if l2 and isinstance(layer, (nn.Linear, nn.Conv2d)):    # dual norm, then intersect with the box
            lo, hi = _intersect(*ibp_layer(layer, lo, hi), *_l2_first_layer(layer, point, scale, eps))
            l2 = False
            continue
        if l2 and isinstance(layer, (Normalize, nn.Flatten, *_PASSTHROUGH)):
            point = layer(point)
            scale = layer(scale) if not isinstance(layer, Normalize) else scale / layer.std.to(scale.dtype)
        else:
            l2 = False  # a nonlinearity before any affine layer: keep the (looser, still sound) box
        lo, hi = ibp_layer(layer, lo, hi)
    return lo, hi


def _intersect(lo1: torch.Tensor, hi1: torch.Tensor, mu2: torch.Tensor, r2: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The box ``[lo1, hi1]`` intersected with ``mu2 +- r2`` (both contain the true set)."""
    lo, hi = torch.maximum(lo1, mu2 - r2), torch.minimum(hi1, mu2 + r2)
    return lo, torch.maximum(lo, hi)


# -- public API ---------------------------------------------------------------------------
def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float | str | torch.Tensor, norm: str = "linf"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP bounds on the logits over the ``norm``-ball of radius ``eps`` (float or ``(B,)``) around
    ``x`` ``(B, C, H, W)`` intersected with ``[0, 1]``. Returns ``(lower, upper)``, each ``(B, K)``.

    Runs the model in its current mode (BatchNorm must be in eval mode); differentiable.
    """
    eps, norm = check_eps(eps, x), _norm(norm)
    return _propagate(layers_of(model), x, eps, norm)


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: str, crown: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """IBP (and optionally CROWN) lower bounds on ``z_y - z_j``, each ``(B, K-1)``, plus ``others``."""
    layers = layers_of(model)
    stop = _elision_index(layers)
    trace = _Trace() if crown else None
    lo, hi = _propagate(layers, x, eps, norm, stop, trace)
    k = layers[stop][1].out_features if stop is not None else lo.shape[1]
    others = other_classes(y, k)
    if stop is not None:
        w, b = _fold_spec(layers[stop][1], y, others)                        # (B, K-1, D), (B, K-1)
        if lo.dim() != 2:
            raise UnsupportedLayerError(f"{layers[stop][0]}: the final Linear needs a flat (B, D) input")
        lb = b + 0.5 * (torch.einsum("bsd,bd->bs", w, hi + lo) - torch.einsum("bsd,bd->bs", w.abs(), hi - lo))
    else:                                  # no final Linear: margins of the interval bounds themselves
        w, b = None, None
        lb = lo.gather(1, y.view(-1, 1)) - hi.gather(1, others)
    if not crown:
        return lb, None, others
    from certify._crown import crown_backward

    spec_w = w if w is not None else _onehot_spec(y, others, k, x.dtype)
    spec_b = b if b is not None else x.new_zeros(others.shape)
    cut = stop if stop is not None else len(layers)
    return lb, crown_backward(layers[:cut], trace, spec_w, spec_b, x, eps, norm), others


def _onehot_spec(y: torch.Tensor, others: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    eye = torch.eye(k, device=y.device, dtype=dtype)
    return eye[y].unsqueeze(1) - eye[others]                                 # (B, K-1, K)


def _scatter(lb: torch.Tensor, y: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``(B, K-1)`` margins -> ``(B, K)`` with 0 at the label column."""
    out = lb.new_zeros(lb.shape[0], lb.shape[1] + 1)
    return out.scatter(1, others, lb)


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | str | torch.Tensor,
                  norm: str = "linf", method: str = "ibp") -> torch.Tensor:
    """Lower bounds on the margins ``z_y - z_j`` over the eps-ball: ``(B, K)``, column ``y`` is 0.

    ``method="ibp"``: IBP with last-layer elision (Gowal et al. 2018).
    ``method="crown-ibp"``: elementwise max of the IBP bound and the CROWN-IBP bound (Zhang et al. 2020).
    Differentiable; runs the model in its current mode.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    eps, norm = check_eps(eps, x), _norm(norm)
    ibp, crown, others = _margins(model, x, y, eps, norm, crown=method == "crown-ibp")
    return _scatter(ibp if crown is None else torch.maximum(ibp, crown), y, others)


def ibp_and_crown_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | str | torch.Tensor,
                          norm: str = "linf") -> tuple[torch.Tensor, torch.Tensor]:
    """Both margin lower bounds from one IBP pass, ``(ibp, crown)``, each ``(B, K)`` with 0 at column ``y``.

    CROWN-IBP training mixes them as ``beta * crown + (1 - beta) * ibp`` (Zhang et al. 2020, Eq. 9).
    """
    eps, norm = check_eps(eps, x), _norm(norm)
    ibp, crown, others = _margins(model, x, y, eps, norm, crown=True)
    return _scatter(ibp, y, others), _scatter(crown, y, others)


def worst_case_logits(margin_lb: torch.Tensor) -> torch.Tensor:
    """Gowal et al.'s ``z_hat``: ``-margin_lb`` (0 at the label); CE on it upper-bounds the worst-case CE."""
    return -margin_lb


@torch.no_grad()
def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | str | torch.Tensor,
            method: str = "ibp", norm: str = "linf") -> torch.Tensor:
    """``(B,)`` bool: the clean prediction is ``y`` and every margin lower bound is > 0, i.e. no point
    of the ball (``∩ [0, 1]``) changes the label. Deterministic. Runs the model in eval mode (restored)."""
    with eval_mode(model):
        lb = margin_bounds(model, x, y, eps, norm, method)                  # (B, K)
        mask = torch.ones_like(lb, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
        robust = torch.where(mask, lb > 0, True).all(dim=1)
        return robust & (model(x).argmax(dim=1) == y)


def bisection_steps(tol: float, max_eps: float) -> int:
    """Number of bound passes ``certified_radius`` runs after its check at ``max_eps``."""
    return max(0, math.ceil(math.log2(max_eps / tol))) if max_eps > 0 else 0


@torch.no_grad()
def certified_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "ibp", tol: float = 1e-3,
                     max_eps: float = 1.0, norm: str = "linf") -> torch.Tensor:
    """Largest certified eps per sample, ``(B,)``, by batched bisection on a per-sample eps tensor.

    The returned radius is itself certified (so is every smaller ball, being a subset) and lies
    within ``tol`` below the largest eps the method proves (exactly so for IBP, whose bounds only
    widen with eps); ``max_eps`` where certified there; 0 for misclassified samples. Costs
    ``1 + bisection_steps(tol, max_eps)`` bound passes.
    """
    if tol <= 0 or max_eps <= 0:
        raise ValueError(f"tol and max_eps must be > 0, got tol={tol}, max_eps={max_eps}")
    b = x.shape[0]
    lo = x.new_zeros(b)
    hi = x.new_full((b,), float(max_eps))
    lo = torch.where(certify(model, x, y, hi, method, norm), hi, lo)  # certified at max_eps: done (lo == hi)
    for _ in range(bisection_steps(tol, max_eps)):
        mid = (lo + hi) / 2
        ok = certify(model, x, y, mid, method, norm)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


@CERTIFIERS.register("ibp", help="IBP certificates (Gowal et al. 2018): deterministic radius of the prediction")
class IBPCertifier:
    """Deterministic certificates: prediction = clean argmax, radius = largest eps (bisection, ``tol``)
    at which IBP (or CROWN-IBP) proves that prediction; never abstains (radius 0 when unprovable)."""

    method = "ibp"

    def __init__(self, *, norm: str = "linf", tol: float = 1e-3, max_eps: float = 1.0) -> None:
        self.norm, self.tol, self.max_eps = _norm(norm), float(tol), float(max_eps)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Certificate:
        with torch.no_grad(), eval_mode(model):
            pred = model(x).argmax(dim=1)
        radius = certified_radius(model, x, pred, self.method, self.tol, self.max_eps, self.norm)
        return Certificate(pred, radius, torch.zeros_like(pred, dtype=torch.bool), {"method": self.method})

    certify = __call__


@CERTIFIERS.register("crown-ibp", help="CROWN-IBP certificates (Zhang et al. 2020), never looser than IBP")
class CrownIBPCertifier(IBPCertifier):
    """As ``IBPCertifier`` with the max of the CROWN-IBP and IBP margin bounds."""

    method = "crown-ibp"
