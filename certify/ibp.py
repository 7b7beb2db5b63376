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

Supported models: a ``RobustModel`` (or any ``nn.Sequential``) whose leaves have a rule in
``certify/_layers.py`` (Normalize, Linear, Conv2d, ReLU, MaxPool2d, BatchNorm1d/2d in eval
mode, AvgPool2d, AdaptiveAvgPool2d, Flatten, Identity, Dropout in eval mode), nested in
``nn.Sequential``. Anything else -- in particular residual blocks with a custom ``forward``
(``preact-resnet18``, ``wrn``) -- raises ``UnsupportedLayerError``.

Norms: ``"linf"``; ``"l2"`` bounds the first Linear/Conv2d by the dual norm
``eps * ||W_row / std||_2`` (intersected with the L-inf box, which contains the L2 ball).

All certificates here are deterministic: a sample certified at ``eps`` has no adversarial
example in the ball (up to floating-point rounding of the bound computation itself).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certify._crown import crown_backward
from certify._layers import Box, Rule, Trace, UnsupportedLayerError, input_box, layers_of
from certify.base import Certificate
from robustkit.errors import InputError
from robustkit.modes import eval_mode
from robustkit.registry import CERTIFIERS
from robustkit.threat import parse_eps, parse_norm
from robustkit.validate import integer, number, one_of, positive

__all__ = ["METHODS", "UnsupportedLayerError", "certified_radius", "certify", "ibp_and_crown_margins",
           "interval_bounds", "margin_bounds", "worst_case_logits"]
METHODS = ("ibp", "crown-ibp")
Layers = list[tuple[str, nn.Module, Rule]]


def check_eps(eps: float | str | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """eps (float, fraction string or ``(B,)`` tensor) as a ``(B,)`` tensor on ``x``; ``InputError`` if < 0."""
    if isinstance(eps, torch.Tensor):
        eps = eps.detach().to(x.device, x.dtype)
        if eps.dim() == 0:
            eps = eps.expand(x.shape[0])
        if eps.shape != (x.shape[0],):
            raise InputError(f"tensor eps must have shape (B,) = ({x.shape[0]},), got {tuple(eps.shape)}")
        if not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
            raise InputError("eps must be finite and >= 0")
        return eps
    return torch.full((x.shape[0],), parse_eps(eps), device=x.device, dtype=x.dtype)


# -- the propagation loop -------------------------------------------------------------------
def _propagate(layers: Layers, x: torch.Tensor, eps: torch.Tensor, norm: str, stop: int | None = None,
               trace: Trace | None = None) -> Box:
    """IBP through ``layers[:stop]``; returns the box ``(lo, hi)`` at the input of ``layers[stop]``.

    For ``norm="l2"`` the exact ball is carried (centre ``point``, per-pixel ``scale``) through the
    layers with an ``l2_carry`` rule and bounded exactly at the first layer with an ``l2_exact`` rule,
    then intersected with the box; a layer with neither ends it (the box stays sound, only looser).
    """
    lo, hi = input_box(x, eps)                                   # (B, C, H, W)
    l2 = norm == "l2"
    point, scale = x, torch.ones_like(x[:1])
    for i, (_, layer, rule) in enumerate(layers[:stop]):
        if trace is not None:
            trace.shapes.append(lo.shape[1:])
            if rule.needs_bounds:
                trace.bounds[i] = (lo, hi)
        box = rule.interval(layer, lo, hi)
        if l2 and rule.l2_exact is not None:                     # dual norm, then intersect with the box
            lo2, hi2 = rule.l2_exact(layer, point, scale, eps)
            lo, hi = torch.maximum(box[0], lo2), torch.minimum(box[1], hi2)
            hi = torch.maximum(lo, hi)
            l2 = False
            continue
        if l2 and rule.l2_carry is not None:
            point, scale = rule.l2_carry(layer, point, scale)
        else:
            l2 = False
        lo, hi = box
    return lo, hi


# -- the specification (margins z_y - z_j, j != y) -------------------------------------------
def other_classes(y: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, K-1)`` indices ``j != y`` in increasing order."""
    j = torch.arange(k - 1, device=y.device).expand(y.shape[0], -1)
    return j + (j >= y.view(-1, 1)).long()


def _fold_spec(last: nn.Linear, y: torch.Tensor, others: torch.Tensor) -> Box:
    """Last-layer elision: ``W' = W_y - W_j`` ``(B, K-1, D)``, ``b' = b_y - b_j`` ``(B, K-1)``."""
    w = last.weight[y].unsqueeze(1) - last.weight[others]
    b = last.bias if last.bias is not None else last.weight.new_zeros(last.out_features)
    return w, b[y].unsqueeze(1) - b[others]


def _elision_index(layers: Layers) -> int | None:
    """Index of the final Linear if only pass-through layers follow it, else None."""
    for i in range(len(layers) - 1, -1, -1):
        if isinstance(layers[i][1], nn.Linear):
            return i
        if not layers[i][2].passthrough:
            return None
    return None


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: str, crown: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """IBP (and optionally CROWN) lower bounds on ``z_y - z_j``, each ``(B, K-1)``, plus ``others``."""
    layers = layers_of(model)
    stop = _elision_index(layers)
    trace = Trace() if crown else None
    lo, hi = _propagate(layers, x, eps, norm, stop, trace)
    k = layers[stop][1].out_features if stop is not None else lo.shape[1]
    others = other_classes(y, k)
    if stop is not None:
        if lo.dim() != 2:
            raise UnsupportedLayerError(f"{layers[stop][0]}: the final Linear needs a flat (B, D) input")
        w, b = _fold_spec(layers[stop][1], y, others)                        # (B, K-1, D), (B, K-1)
        lb = b + 0.5 * (torch.einsum("bsd,bd->bs", w, hi + lo) - torch.einsum("bsd,bd->bs", w.abs(), hi - lo))
    else:                                  # no final Linear: margins of the interval bounds themselves
        eye = torch.eye(k, device=y.device, dtype=x.dtype)
        w, b = eye[y].unsqueeze(1) - eye[others], x.new_zeros(others.shape)  # (B, K-1, K), (B, K-1)
        lb = lo.gather(1, y.view(-1, 1)) - hi.gather(1, others)
    if not crown:
        return lb, None, others
    cut = stop if stop is not None else len(layers)
    return lb, crown_backward(layers[:cut], trace, w, b, x, eps, norm), others


def _scatter(lb: torch.Tensor, y: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``(B, K-1)`` margins -> ``(B, K)`` with 0 at the label column."""
    return lb.new_zeros(lb.shape[0], lb.shape[1] + 1).scatter(1, others, lb)


# -- public API ---------------------------------------------------------------------------------
def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float | str | torch.Tensor, norm: str = "linf"
                    ) -> Box:
    """IBP bounds on the logits over the ``norm``-ball of radius ``eps`` (float or ``(B,)``) around
    ``x`` ``(B, C, H, W)`` intersected with ``[0, 1]``. Returns ``(lower, upper)``, each ``(B, K)``.

    Runs the model in its current mode (BatchNorm must be in eval mode); differentiable.
    """
    eps, norm = check_eps(eps, x), parse_norm(norm, ("linf", "l2"))
    return _propagate(layers_of(model), x, eps, norm)


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | str | torch.Tensor,
                  norm: str = "linf", method: str = "ibp") -> torch.Tensor:
    """Lower bounds on the margins ``z_y - z_j`` over the eps-ball: ``(B, K)``, column ``y`` is 0.

    ``method="ibp"``: IBP with last-layer elision (Gowal et al. 2018).
    ``method="crown-ibp"``: elementwise max of the IBP bound and the CROWN-IBP bound (Zhang et al. 2020).
    Differentiable; runs the model in its current mode.
    """
    method = one_of("method", method, METHODS)
    eps, norm = check_eps(eps, x), parse_norm(norm, ("linf", "l2"))
    ibp, crown, others = _margins(model, x, y, eps, norm, crown=method == "crown-ibp")
    return _scatter(ibp if crown is None else torch.maximum(ibp, crown), y, others)


def ibp_and_crown_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | str | torch.Tensor,
                          norm: str = "linf") -> Box:
    """Both margin lower bounds from one IBP pass, ``(ibp, crown)``, each ``(B, K)`` with 0 at column ``y``.

    CROWN-IBP training mixes them as ``beta * crown + (1 - beta) * ibp`` (Zhang et al. 2020, Eq. 9).
    """
    eps, norm = check_eps(eps, x), parse_norm(norm, ("linf", "l2"))
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
        robust = lb.scatter(1, y.view(-1, 1), 1.0).gt(0).all(dim=1)
        return robust & (model(x).argmax(dim=1) == y)


def bisection_steps(tol: float, max_eps: float) -> int:
    """Number of bisection passes ``certified_radius`` runs after its check(s) at ``max_eps`` (and the anchor)."""
    return max(0, math.ceil(math.log2(max_eps / tol))) if max_eps > 0 else 0


@torch.no_grad()
def certified_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "ibp", tol: float = 1e-3,
                     max_eps: float = 1.0, norm: str = "linf", anchor: float | None = None) -> torch.Tensor:
    """Largest certified eps per sample, ``(B,)`` float64, by batched bisection on a per-sample eps.

    The returned radius is itself certified (so is every smaller ball, being a subset) and lies
    within ``tol`` below the largest eps the method proves (exactly so for IBP, whose bounds only
    widen with eps); ``max_eps`` where certified there; 0 for misclassified samples. With an
    ``anchor`` (e.g. the threat model's eps) the bisection first splits at it, so that
    ``radius >= anchor`` exactly when the sample is certified at ``anchor``. Every sample runs
    the same ``bisection_steps(tol, max_eps)`` steps, so its radius does not depend on the others
    in the batch. Costs ``1 + (anchor is not None) + bisection_steps(tol, max_eps)`` bound passes.
    """
    tol, max_eps = positive("tol", tol), positive("max_eps", max_eps)
    b = x.shape[0]
    lo = torch.zeros(b, dtype=torch.float64, device=x.device)
    hi = torch.full((b,), max_eps, dtype=torch.float64, device=x.device)
    done = certify(model, x, y, hi, method, norm)
    lo = torch.where(done, hi, lo)                        # certified at max_eps: done (lo == hi)
    if anchor is not None:
        a = torch.full_like(hi, number("anchor", anchor, 0.0, max_eps))
        ok = certify(model, x, y, a, method, norm)
        lo, hi = torch.where(ok & ~done, a, lo), torch.where(ok | done, hi, a)
    for _ in range(bisection_steps(tol, max_eps)):
        mid = (lo + hi) / 2
        ok = certify(model, x, y, mid, method, norm)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


# -- the certifiers ------------------------------------------------------------------------------
@CERTIFIERS.register("ibp", help="IBP (Gowal et al. 2018): deterministic L-inf radius of the prediction")
class IBPCertifier:
    """Deterministic certificates of the clean prediction (Gowal et al. 2018).

    prediction = argmax of the model; radius = the largest L-inf eps (pixel space) at which IBP
    proves that prediction, by bisection on ``[0, max_eps]`` to ``tol`` (defaults ``tol=1e-3``,
    ``max_eps=1.0``: 10 bisection steps; an L-inf ball of radius 1 around an image already covers
    the whole ``[0, 1]`` box, so 1.0 is the natural top). With ``eps`` (the threat model's radius)
    the bisection first splits at eps, so ``radius >= eps`` exactly when the sample is certified at
    eps. Never abstains (radius 0 when nothing is provable). ``batch_size`` images per bound pass.
    """

    name, method, deterministic = "ibp", "ibp", True

    def __init__(self, *, norm: str = "linf", eps: float | str | None = None, tol: float = 1e-3,
                 max_eps: float = 1.0, batch_size: int = 256) -> None:
        self.norm = parse_norm(norm, ("linf", "l2"))
        self.tol, self.max_eps = positive("tol", tol), positive("max_eps", max_eps)
        self.eps = None if eps is None else number("eps", parse_eps(eps), 0.0, self.max_eps)
        self.batch_size = integer("batch_size", batch_size, 1)

    @property
    def radius_scale(self) -> float:
        """The report's radius unit: the threat eps (else max_eps / 4)."""
        return self.eps if self.eps else self.max_eps / 4

    @property
    def guarantee(self) -> str:
        return (f"deterministic: no {self.norm} perturbation within the radius (intersected with [0, 1]) changes "
                f"the prediction ({self.method}, sound up to floating-point rounding)")

    def params(self) -> dict[str, object]:
        return {"norm": self.norm, "eps": self.eps, "tol": self.tol, "max_eps": self.max_eps,
                "batch_size": self.batch_size}

    def __call__(self, model: nn.Module, x: torch.Tensor, *, seeds: torch.Tensor | None = None) -> Certificate:
        """Certificates for ``x (B, C, H, W)`` in [0, 1]; ``seeds`` is ignored (deterministic)."""
        preds, radii = [], []
        with torch.no_grad(), eval_mode(model):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size]
                pred = model(xb).argmax(dim=1)                                   # (b,)
                preds.append(pred)
                radii.append(certified_radius(model, xb, pred, self.method, self.tol, self.max_eps, self.norm,
                                              anchor=self.eps))
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)
        radius = torch.cat(radii) if radii else torch.zeros(0, dtype=torch.float64, device=x.device)
        return Certificate(pred, radius, torch.zeros_like(pred, dtype=torch.bool), {})


@CERTIFIERS.register("crown-ibp", help="CROWN-IBP (Zhang et al. 2020): deterministic, never looser than IBP")
class CrownIBPCertifier(IBPCertifier):
    """As ``IBPCertifier`` with the elementwise max of the CROWN-IBP and IBP margin bounds."""

    name, method = "crown-ibp", "crown-ibp"
