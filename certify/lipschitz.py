"""Deterministic Lipschitz-margin certificates (L2, and L-inf through the dimension factor).

If every logit map is jointly ``L``-Lipschitz in L2 (``||f(x) - f(x')||_2 <= L ||x - x'||_2``), each
pairwise margin ``f_i - f_j`` is ``sqrt(2) L``-Lipschitz (``||e_i - e_j||_2 = sqrt(2)``), so the
prediction ``i = argmax f(x)`` cannot change within

    r_2(x) = (f_top1(x) - f_top2(x)) / (sqrt(2) L)          (Tsuzuku et al. 2018, "Lipschitz-Margin
                                                              Training", NeurIPS)

i.e. every ``x'`` with ``||x' - x||_2 < r_2(x)`` gets the same label (a point exactly at the radius
may tie). With ``pairwise=True`` the radius is the larger of that and the per-class-pair radius
``min_j (f_top - f_j) / (L_body ||W_top - W_j||_2)`` when the logits are a final Linear ``W`` of an
``L_body``-Lipschitz feature map (Leino et al., "Globally-Robust Neural Networks", ICML 2021).
``norm="linf"`` reports ``r_2 / sqrt(d)`` (``||v||_2 <= sqrt(d) ||v||_inf``, ``d = C H W``):
sound but much looser than a certifier made for L-inf (IBP).

``L`` is the product of per-layer spectral-norm upper bounds (``certify/_lipnet.py``): Conv2d
layers by the Gram iteration of Delattre et al., "Efficient Bound of Lipschitz Constant for
Convolutional Layers by Gram Iteration" (ICML 2023, arXiv:2305.16173; code
``blaisedelattre/lip4conv``) on the circular operator the zero-padded / strided / dilated /
grouped layer is a restriction of (``certify/_gram.py``: why that upper-bounds the layer used);
Linear layers by the same Gram iteration of the weight matrix (at least 20 steps: within
``1 + 1e-6`` of the exact norm); BatchNorm (eval) and Normalize
folded into the adjacent Conv2d / Linear; 1-Lipschitz activations and pooling by their constants;
residual blocks as ``L(branch) + L(shortcut)`` (``1 + L(branch)`` for the identity). Defaults:
``gram_iters=10`` (the paper trains with 4-6; every count is an upper bound, more is tighter:
within a factor ``rank^(2^-11)`` of the circular operator's norm, ~1.002 for rank 100).

The constant depends only on the weights and the input size: it is computed once per model
(cached, keyed by ``robustkit.zoo.fingerprint`` of the weights, a hash of the module's
``repr`` -- strides, kernel sizes and the like are not weights --, the input shape and
``gram_iters``) and reported per image in the certificate's info (``lipschitz_constant``, also
``margin``) and so in the pipeline's results. A certificate then costs one forward pass.

Sound for every input in R^d (not only the [0, 1] box), up to the float32 rounding of the
forward pass that computes the margin; radii are capped at the diameter of the [0, 1] box
(``sqrt(d)`` in L2, 1 in L-inf), beyond which the claim covers every valid image anyway.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from certify._gram import ROUNDING
from certify._layers import UnsupportedLayerError
from certify._lipnet import LayerBound, network_bound
from certify.base import Certificate
from robustkit.errors import InputError
from robustkit.modes import eval_mode
from robustkit.registry import CERTIFIERS
from robustkit.threat import parse_eps, parse_norm
from robustkit.validate import integer, number
from robustkit.zoo import fingerprint, unwrap

__all__ = ["LipschitzBound", "LipschitzCertifier", "UnsupportedLayerError", "certified_radius",
           "lipschitz_constant", "pairwise_radius"]
DEFAULT_GRAM_ITERS = 10
_CACHE: OrderedDict[tuple, LipschitzBound] = OrderedDict()
_CACHE_SIZE = 16


@dataclass(frozen=True)
class LipschitzBound:
    """``value``: an upper bound on the L2 Lipschitz constant of the model on ``input_shape``
    inputs; ``layers``: the factors whose product it is; ``seconds``: the time it took."""

    value: float
    layers: tuple[LayerBound, ...]
    input_shape: tuple[int, ...]
    gram_iters: int
    seconds: float
    body: float | None = None                 # L of the features before a final Linear (None: no such split)
    pair_norms: torch.Tensor | None = None    # (K, K) float64 ||W'_i - W'_j||_2 of that Linear (upper bounds)

    def as_dict(self) -> dict[str, object]:
        return {"value": self.value, "body": self.body, "input_shape": list(self.input_shape),
                "gram_iters": self.gram_iters, "seconds": self.seconds,
                "layers": [{"path": b.path, "kind": b.kind, "bound": b.bound} for b in self.layers]}


def _input_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    shape = input_shape if input_shape is not None else getattr(unwrap(model), "input_shape", None)
    if shape is None:
        raise InputError("lipschitz_constant needs input_shape=(C, H, W) for a model without .input_shape")
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"input_shape must be positive sizes like (C, H, W), got {shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise InputError(f"input_shape must be positive sizes like (C, H, W), got {shape}")
    own = getattr(unwrap(model), "input_shape", None)
    if own is not None and tuple(int(s) for s in own) != shape:
        raise InputError(f"the model takes inputs {tuple(own)}, got input shape {shape}")
    return shape


def lipschitz_constant(model: nn.Module, input_shape: tuple[int, ...] | None = None, *,
                       gram_iters: int = DEFAULT_GRAM_ITERS) -> LipschitzBound:
    """An upper bound on the L2 Lipschitz constant of ``model`` (pixel space in, logits out) on inputs
    ``(C, H, W)`` = ``input_shape`` (default ``model.input_shape``). Deterministic; cached by the
    weights' fingerprint. Runs the model in eval mode (restored). ``UnsupportedLayerError`` (an
    ``InputError``) names the first module without a rule."""
    gram_iters = integer("gram_iters", gram_iters, 0, 30)
    shape = _input_shape(model, input_shape)
    inner = unwrap(model)
    # the weights *and* the structure (strides, kernel sizes, eps, ...: not in the state dict)
    key = (fingerprint(inner), hashlib.sha256(repr(inner).encode()).hexdigest(), shape, gram_iters)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    t0 = time.perf_counter()
    with torch.no_grad(), eval_mode(inner):
        net = network_bound(inner, shape, gram_iters)
        pairs = None
        if net.head_weight is not None:                                            # (K, D)
            w = net.head_weight
            pairs = ROUNDING * (w.unsqueeze(0) - w.unsqueeze(1)).norm(dim=2)       # (K, K), 0 on the diagonal
    bound = LipschitzBound(net.value, tuple(net.layers), shape, gram_iters, time.perf_counter() - t0, net.body,
                           pairs)
    _CACHE[key] = bound
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return bound


def _margin(logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 top-1 minus top-2 logit."""
    top = logits.double().topk(2, dim=1).values                                    # (B, 2)
    return top[:, 0] - top[:, 1]


def certified_radius(logits: torch.Tensor, lipschitz: float, norm: str = "l2", dim: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction (B,), radius (B,) float64)`` from ``logits (B, K)`` and the L2 Lipschitz bound:
    ``margin / (sqrt(2) L)`` in L2, divided by ``sqrt(dim)`` in L-inf; capped at the [0, 1] box's
    diameter (``sqrt(dim)`` / 1) when ``dim`` is given."""
    norm = parse_norm(norm, ("l2", "linf"))
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise InputError(f"logits must be (B, K) with K >= 2, got {tuple(logits.shape)}")
    if norm == "linf" and dim is None:
        raise InputError("the L-inf radius needs the input dimension dim = C * H * W")
    if isinstance(lipschitz, bool) or not isinstance(lipschitz, numbers.Real) or not lipschitz >= 0:
        raise InputError(f"lipschitz must be a number >= 0, got {lipschitz!r}")   # NaN > 0 is False: radius inf
    if math.isinf(lipschitz):                                                     # an overflowed product
        return logits.argmax(dim=1), torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    margin = _margin(logits)                                                        # (B,) >= 0
    radius = margin / (math.sqrt(2.0) * lipschitz) if lipschitz > 0 else torch.full_like(margin, math.inf)
    if norm == "linf":
        radius = radius / math.sqrt(dim)
    if dim is not None:
        radius = radius.clamp(max=math.sqrt(dim) if norm == "l2" else 1.0)
    return logits.argmax(dim=1), radius


def pairwise_radius(logits: torch.Tensor, bound: LipschitzBound) -> torch.Tensor:
    """``(B,)`` float64 L2 radius ``min_{j != top} (z_top - z_j) / (L_body ||W'_top - W'_j||_2)``: each
    margin ``z_i - z_j = (W'_i - W'_j) h(x) + const`` is ``L_body ||W'_i - W'_j||``-Lipschitz (the
    pairwise constants of Leino et al., "Globally-Robust Neural Networks", ICML 2021). Never below the
    global ``margin / (sqrt(2) L)`` up to rounding, since ``||W'_i - W'_j|| <= sqrt(2) ||W'||``."""
    if bound.pair_norms is None or bound.body is None:
        raise InputError("pairwise radii need logits that are the output of a final nn.Linear")
    z = logits.double()                                                             # (B, K)
    top = z.argmax(dim=1)                                                           # (B,)
    gap = z.gather(1, top.view(-1, 1)) - z                                          # (B, K) >= 0
    lip = bound.body * bound.pair_norms.to(z.device)[top]                           # (B, K)
    r = torch.where(lip > 0, gap / lip.clamp_min(1e-300), torch.where(gap > 0, math.inf, 0.0))
    r = r.scatter(1, top.view(-1, 1), math.inf)                                     # j != top
    return r.min(dim=1).values


@CERTIFIERS.register("lipschitz", help="Lipschitz margin (Gram iteration, Delattre et al. 2023): deterministic L2 "
                                       "radius, one forward pass")
class LipschitzCertifier:
    """Deterministic certificates of the clean prediction from a global Lipschitz bound.

    prediction = argmax of the model; radius = ``margin / (sqrt(2) L)`` (L2) or that over ``sqrt(d)``
    (``norm="linf"``, looser), ``L`` = ``lipschitz_constant(model, gram_iters=gram_iters)``
    (computed once per model and cached). ``pairwise=True`` takes the larger of that and the
    per-class-pair radius (``pairwise_radius``: the final Linear's rows ``||W'_top - W'_j||`` instead
    of ``sqrt(2) ||W'||``; sound, never smaller; the global radius where the logits are not a final
    Linear's output -- an ``sll-small`` / ``liresnet-small`` net's LLN head counts, as the LiResNet code
    certifies). Never abstains. ``eps`` (optional) is the threat radius
    the report marks; ``batch_size`` images per forward pass. Models with a layer that has no
    rule raise ``UnsupportedLayerError`` (exit 2 from the CLI).
    """

    name, deterministic = "lipschitz", True

    def __init__(self, *, norm: str = "l2", eps: float | str | None = None, gram_iters: int = DEFAULT_GRAM_ITERS,
                 pairwise: bool = False, batch_size: int = 256) -> None:
        self.norm = parse_norm(norm, ("l2", "linf"))
        self.eps = None if eps is None else number("eps", parse_eps(eps), 0.0)
        self.gram_iters = integer("gram_iters", gram_iters, 0, 30)
        if not isinstance(pairwise, bool):
            raise InputError(f"pairwise must be true or false, got {pairwise!r}")
        self.pairwise = pairwise
        self.batch_size = integer("batch_size", batch_size, 1)

    @property
    def radius_scale(self) -> float:
        """The report's radius unit: the threat eps, else 0.25 (L2) / 1/255 (L-inf)."""
        return self.eps if self.eps else (0.25 if self.norm == "l2" else 1 / 255)

    @property
    def guarantee(self) -> str:
        how = ("max of margin / (sqrt(2) L) and the per-class-pair margins over L_body ||W_i - W_j||" if self.pairwise
               else "margin / (sqrt(2) L)")
        return (f"deterministic: no {self.norm} perturbation of norm below the radius changes the prediction "
                f"({how}, L a product of per-layer Lipschitz upper bounds; sound up to floating-point rounding"
                + ("; L-inf via ||v||_2 <= sqrt(d) ||v||_inf, loose)" if self.norm == "linf" else ")"))

    def params(self) -> dict[str, object]:
        return {"norm": self.norm, "eps": self.eps, "gram_iters": self.gram_iters, "pairwise": self.pairwise,
                "batch_size": self.batch_size}

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Compute (and cache) the model's constant up front: the pipeline calls this before it writes
        anything, so an unsupported model is refused first."""
        lipschitz_constant(model, input_shape, gram_iters=self.gram_iters)

    def __call__(self, model: nn.Module, x: torch.Tensor, *, seeds: torch.Tensor | None = None) -> Certificate:
        """Certificates for ``x (B, C, H, W)`` in [0, 1]; ``seeds`` is ignored (deterministic)."""
        if x.dim() != 4:
            raise InputError(f"x must be an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        bound = lipschitz_constant(model, tuple(x.shape[1:]), gram_iters=self.gram_iters)
        dim = math.prod(x.shape[1:])
        preds, radii, margins = [], [], []
        with torch.no_grad(), eval_mode(model):
            for i in range(0, x.shape[0], self.batch_size):
                logits = model(x[i:i + self.batch_size])                              # (b, K)
                pred, radius = certified_radius(logits, bound.value, "l2")
                if self.pairwise and bound.pair_norms is not None:
                    radius = torch.maximum(radius, pairwise_radius(logits, bound))
                if self.norm == "linf":
                    radius = radius / math.sqrt(dim)
                radius = radius.clamp(max=math.sqrt(dim) if self.norm == "l2" else 1.0)
                preds.append(pred)
                radii.append(radius)
                margins.append(_margin(logits))
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)
        radius = torch.cat(radii) if radii else torch.zeros(0, dtype=torch.float64, device=x.device)
        margin = torch.cat(margins) if margins else torch.zeros(0, dtype=torch.float64, device=x.device)
        info = {"margin": margin, "lipschitz_constant": torch.full_like(radius, bound.value),
                "lipschitz": bound.as_dict()}
        return Certificate(pred, radius, torch.zeros_like(pred, dtype=torch.bool), info)
