"""A network's L2 Lipschitz bound as the product of per-layer bounds (``certify.lipschitz``).

The walk follows the model's execution order (``nn.Sequential`` children; ``RobustModel``'s
Normalize then net; the built-in residual nets by their known ``forward``) and multiplies

    Conv2d / Linear        spectral-norm upper bound by Gram iteration (``certify/_gram.py``)
    ReLU, LeakyReLU(a)     max(1, |a|)          Tanh, Hardtanh, ReLU6, Softplus, Softsign: 1
    Sigmoid 1/4,  ELU(a) max(1, |a|),  GELU 1.13 (max derivative 1.1289),  SiLU 1.1 (1.0998)
    MaxPool2d              sqrt(m), m = the most windows one pixel falls in (1 if they do not overlap)
    AvgPool2d / Adaptive   sqrt(max row sum * max column sum) of the (nonnegative) operator (Schur test)
    Flatten, Identity, Dropout (eval)   1
    trusted modules        ``m.lipschitz_bound()`` (any module defining it; not descended into; a
                           ``LipschitzNet`` ending the model as body x LLN head, for pairwise radii)
    PreActBlock            L(branch) + L(shortcut): 1 + L(branch) for the identity shortcut

Per-channel scales are *folded*, never bounded alone where avoidable: ``Normalize`` (``1/std``) and
eval-mode BatchNorm (``|gamma| / sqrt(var + eps)``) leave a pending nonnegative per-channel scale
``a``: the activation is ``a * u + c`` with ``u`` the part that depends on the input (a sign flip of
BatchNorm is an isometry, the shift ``c`` a constant). It is carried through layers that commute
with it -- positively homogeneous activations (``relu(a u + c) = a relu(u + c / a)``), average
pooling, Flatten, Identity, Dropout, further BatchNorms -- and absorbed into the input columns of
the next Conv2d / Linear (``sigma(W diag(a))``); a BatchNorm right after a Conv2d / Linear is
folded into its output rows instead (``sigma(diag(s) W)``). Only where no layer can absorb it
(before a Tanh, a max pool, a residual add, the end) is it bounded alone by ``max(a)``.

Any other module raises ``UnsupportedLayerError`` naming it (its path and type): an unknown
module may do anything, so nothing is assumed about it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from certify._gram import ROUNDING, conv2d_bound, matrix_bound
from certify._layers import UnsupportedLayerError
from robustkit._lipschitz_layers import LLNHead
from robustkit._lipschitz_nets import LipschitzNet
from robustkit.nets import PreActBlock, PreActResNet, WideResNet
from robustkit.zoo import Normalize, RobustModel

Shape = tuple[int, ...]

# elementwise activations: (Lipschitz constant, positively homogeneous: a pending scale passes through)
_ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], tuple[float, bool]]] = {
    nn.ReLU: lambda m: (1.0, True),
    nn.LeakyReLU: lambda m: (max(1.0, abs(float(m.negative_slope))), True),
    nn.ReLU6: lambda m: (1.0, False),
    nn.Hardtanh: lambda m: (1.0, False),
    nn.Tanh: lambda m: (1.0, False),
    nn.Sigmoid: lambda m: (0.25, False),
    nn.Softplus: lambda m: (1.0, False),
    nn.Softsign: lambda m: (1.0, False),
    nn.ELU: lambda m: (max(1.0, abs(float(m.alpha))), False),       # slope alpha e^x on x < 0, any sign
    nn.GELU: lambda m: (1.13, False),
    nn.SiLU: lambda m: (1.1, False),
}
_PASS = (nn.Identity, nn.Dropout, nn.Flatten)


@dataclass(frozen=True)
class LayerBound:
    """One factor of the product: the module's path, its type and its L2 bound (pending scales folded in)."""

    path: str
    kind: str
    bound: float


def _is(m: nn.Module, *classes: type[nn.Module]) -> bool:
    """``m`` is one of ``classes`` (or a subclass) *and* keeps its ``forward``: a subclass with its own
    forward may compute anything, so it gets no rule."""
    return any(isinstance(m, c) and type(m).forward is c.forward for c in classes)


def _plain_sequential(m: nn.Module) -> bool:
    return _is(m, nn.Sequential)


def _bn_scale(bn: nn.Module, path: str) -> torch.Tensor:
    """``(C,)`` ``gamma / sqrt(var + eps)`` of an eval-mode BatchNorm (signed)."""
    if bn.training or bn.running_var is None:
        raise UnsupportedLayerError(f"{path}: {type(bn).__name__} in train mode (or without running stats) uses batch "
                                    "statistics; call model.eval() to certify")
    s = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    return s * bn.weight.detach().double() if bn.weight is not None else s


class Walk:
    """The running product over a module tree; ``shape`` is the activation shape (no batch dim)."""

    def __init__(self, shape: Shape, n_iter: int, prefix: str = "") -> None:
        self.shape, self.n_iter, self.prefix = tuple(shape), n_iter, prefix
        self.value = 1.0
        self.pending: torch.Tensor | None = None      # (C,) nonneg scale on the channels / features
        self.layers: list[LayerBound] = []
        self.head: nn.Module | None = None            # the final Linear whose weight is kept (``network_bound``)
        self.head_weight: torch.Tensor | None = None  # (K, D) float64, pending scale folded in
        self.head_bound = 1.0

    # -- bookkeeping ------------------------------------------------------------------------
    def factor(self, path: str, kind: str, bound: float) -> None:
        if not math.isfinite(bound) or bound < 0:
            raise UnsupportedLayerError(f"{path}: {kind} has a non-finite or negative Lipschitz bound {bound!r}")
        self.value *= bound
        self.layers.append(LayerBound(path, kind, bound))

    def flush(self, path: str) -> None:
        """Bound a pending scale alone (no layer can absorb it): ``max(a)``."""
        if self.pending is not None:
            self.factor(path, "scale", float(self.pending.max()) if self.pending.numel() else 0.0)
            self.pending = None

    def scale(self, s: torch.Tensor) -> None:
        """Multiply the pending per-channel scale by ``|s|`` (``(C,)``)."""
        s = s.detach().double().abs().flatten().cpu()
        if s.numel() != self.shape[0]:
            raise UnsupportedLayerError(f"a per-channel scale of {s.numel()} entries on activations {self.shape}")
        self.pending = s if self.pending is None else self.pending * s

    def run(self, m: nn.Module) -> None:
        """Advance ``shape`` through ``m`` (one forward of a single zero input, eval mode)."""
        p = next(m.parameters(), None)
        b = next(m.buffers(), None)
        ref = p if p is not None else b
        x = torch.zeros(1, *self.shape, dtype=ref.dtype if ref is not None and ref.is_floating_point()
                        else torch.float32, device=ref.device if ref is not None else "cpu")
        with torch.no_grad():
            self.shape = tuple(m(x).shape[1:])

    # -- the dispatch ------------------------------------------------------------------------
    def visit(self, m: nn.Module, path: str) -> None:
        if callable(getattr(m, "lipschitz_bound", None)):              # trusted as-is, not descended into
            self.flush(path)
            if m is self.head:                                         # a LipschitzNet ending the model
                self.lipnet_head(m, path)
            else:
                self.factor(path, type(m).__name__, float(m.lipschitz_bound()))
            self.run(m)
        elif isinstance(m, RobustModel):
            if getattr(m, "resize", None) is not None:
                raise UnsupportedLayerError("resize: the model resizes its input inside (--resize); no Lipschitz "
                                            "bound of the interpolation is implemented: certify it with smoothing")
            self.visit(m.normalize, f"{path}.normalize")
            self.visit(m.net, f"{path}.net")
        elif _plain_sequential(m):
            self.sequence(list(m.named_children()), path)
        elif type(m) in _NETS:
            _NETS[type(m)](self, m, path)
        else:
            self.leaf(m, path)

    def lipnet_head(self, m: LipschitzNet, path: str) -> None:
        """``head(body(x))`` of a ``LipschitzNet`` as two factors (their product is its ``lipschitz_bound()``),
        the LLN head's normalised rows kept for the per-class-pair constants (as the LiResNet code certifies)."""
        self.factor(f"{path}.body", "LipschitzNet body", float(m.body_lipschitz_bound()))
        bound = float(m.head.lipschitz_bound())
        self.factor(f"{path}.head", type(m.head).__name__, bound)
        self.head_weight, self.head_bound = m.head.get_weight().detach().double(), bound

    def sequence(self, children: list[tuple[str, nn.Module]], path: str) -> None:
        """Children in order; a BatchNorm right after a Conv2d / Linear is folded into its output rows."""
        i = 0
        while i < len(children):
            name, c = children[i]
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            if nxt is not None and self.foldable(c, nxt):
                bn_path = f"{path}.{children[i + 1][0]}"
                self.affine(c, f"{path}.{name}", _bn_scale(nxt, bn_path), f"+{type(nxt).__name__}")
                i += 2
                continue
            self.visit(c, f"{path}.{name}")
            i += 1

    def foldable(self, layer: nn.Module, bn: nn.Module) -> bool:
        """A BatchNorm ``bn`` right after ``layer`` folds into its output rows: a Conv2d on (C, H, W) then a
        BatchNorm2d, or a Linear on flat (D,) features then a BatchNorm1d, with matching channels."""
        if callable(getattr(layer, "lipschitz_bound", None)):
            return False
        if _is(layer, nn.Conv2d):
            return _is(bn, nn.BatchNorm2d) and len(self.shape) == 3 and bn.num_features == layer.out_channels
        return (_is(layer, nn.Linear) and _is(bn, nn.BatchNorm1d) and len(self.shape) == 1
                and bn.num_features == layer.out_features)

    def affine(self, m: nn.Module, path: str, out_scale: torch.Tensor | None = None, tag: str = "") -> None:
        """Conv2d / Linear with the pending input scale (and a folded BatchNorm's output scale)."""
        w = m.weight.detach().double()
        a, self.pending = self.pending, None
        if isinstance(m, nn.Conv2d):
            if len(self.shape) != 3:
                raise UnsupportedLayerError(f"{path}: Conv2d on activations of shape {self.shape}")
            if a is not None:                           # input channel j of group g is g * C_in/G + j
                w = w * a.to(w.device).view(m.groups, 1, -1, 1, 1).expand(-1, m.out_channels // m.groups, -1, 1, 1
                                                                        ).reshape(m.out_channels, -1, 1, 1)
            if out_scale is not None:
                w = w * out_scale.to(w.device).view(-1, 1, 1, 1)
            bound = conv2d_bound(m, self.shape[1:], self.n_iter, w)
        else:
            if len(self.shape) != 1:                    # Linear on (..., D): I (x) W, the same norm as W
                self.pending = a
                self.flush(path)
                a = None
            if a is not None:
                w = w * a.to(w.device).view(1, -1)
            if out_scale is not None:
                w = w * out_scale.to(w.device).view(-1, 1)
            bound = matrix_bound(w, self.n_iter)
            if m is self.head and out_scale is None and len(self.shape) == 1:
                self.head_weight, self.head_bound = w, bound
        self.factor(path, type(m).__name__ + tag + (" (input scale folded)" if a is not None else ""), bound)
        self.run(m)

    def leaf(self, m: nn.Module, path: str) -> None:
        kind = type(m).__name__
        act = _ACTIVATIONS.get(type(m))                 # exact types: a subclass may change forward
        if _is(m, nn.Conv2d, nn.Linear):
            self.affine(m, path)
            return
        if _is(m, Normalize):
            self.scale(1.0 / m.std.flatten())
        elif _is(m, nn.BatchNorm1d, nn.BatchNorm2d):
            self.scale(_bn_scale(m, path))
        elif act is not None:
            lip, homogeneous = act(m)
            if not homogeneous:
                self.flush(path)
            if lip != 1.0:
                self.factor(path, kind, lip)
        elif _is(m, *_PASS):
            if isinstance(m, nn.Dropout) and m.training and m.p > 0:
                raise UnsupportedLayerError(f"{path}: Dropout(p={m.p}) in train mode is random; call model.eval()")
            if isinstance(m, nn.Flatten) and self.pending is not None:
                if (m.start_dim, m.end_dim) == (1, -1) and len(self.shape) >= 1:   # per-channel -> per-feature
                    self.pending = self.pending.repeat_interleave(math.prod(self.shape[1:]))
                else:
                    self.flush(path)
        elif _is(m, nn.MaxPool2d):
            self.flush(path)
            self.factor(path, kind, math.sqrt(_max_windows(m)))
        elif _is(m, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            self.factor(path, kind, _schur(m, self.shape))          # per channel: a pending scale commutes
        else:
            inner = sorted({type(c).__name__ for c in m.modules() if c is not m})
            hint = f" (it contains {', '.join(inner)})" if inner else ""
            raise UnsupportedLayerError(
                f"{path}: {kind}{hint} has no Lipschitz rule; supported: Conv2d, Linear, Normalize, BatchNorm (eval), "
                f"{', '.join(t.__name__ for t in _ACTIVATIONS)}, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, "
                "Identity, Dropout (eval), nn.Sequential, preact-resnet18 / wrn, and any module with a "
                "lipschitz_bound() method")
        self.run(m)

    def sub(self, prefix: str) -> Walk:
        return Walk(self.shape, self.n_iter, prefix)


def _max_windows(m: nn.MaxPool2d) -> int:
    """The most pooling windows one input pixel belongs to: per dim ``min(k, ceil(k_eff / s))``
    (windows start every ``s`` and span ``k_eff = d (k - 1) + 1``; a pixel is at most one tap of a
    window, and each of the ``k`` taps of at most one window)."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    k, s, d = pair(m.kernel_size), pair(m.stride if m.stride else m.kernel_size), pair(m.dilation)
    return math.prod(min(ki, -(-(di * (ki - 1) + 1) // si)) for ki, si, di in zip(k, s, d))


def _schur(m: nn.Module, shape: Shape) -> float:
    """``||A||_2 <= sqrt(||A||_1 ||A||_inf)`` for the nonnegative linear pooling ``A`` on ``shape``:
    row sums ``A 1``, column sums ``A^T 1`` (one vector-Jacobian product). Exact for
    non-overlapping windows (``1/k``) and for the global average (``1/sqrt(HW)``)."""
    x = torch.ones(1, *shape, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = m(x)
        (cols,) = torch.autograd.grad(out.sum(), x)
    return ROUNDING * math.sqrt(float(out.max()) * float(cols.max()))


# -- the built-in residual nets (robustkit/nets.py), by their forward ----------------------------
def _preact_block(w: Walk, m: PreActBlock, path: str) -> None:
    """``out = conv2(relu(bn2(conv1(relu(bn1 x))))) + sc``, ``sc = x`` or ``shortcut(relu(bn1 x))``:
    ``L <= L(branch) + L(sc)`` (triangle inequality), ``L(sc) = 1`` for the identity."""
    w.flush(path)
    relu = nn.ReLU()
    branch = w.sub(path)
    branch.sequence([("bn1", m.bn1), ("relu", relu), ("conv1", m.conv1), ("bn2", m.bn2), ("relu", relu),
                     ("conv2", m.conv2)], path)
    branch.flush(path)
    sc = 1.0
    if m.shortcut is not None:
        s = w.sub(path)
        s.sequence([("bn1", m.bn1), ("relu", relu), ("shortcut", m.shortcut)], path)
        s.flush(path)
        sc = s.value
        w.layers += s.layers
    w.layers += branch.layers
    w.value *= branch.value + sc
    w.layers.append(LayerBound(path, "PreActBlock (residual: L(branch) + L(shortcut))", branch.value + sc))
    w.run(m)


def _resnet(w: Walk, m: nn.Module, path: str) -> None:
    """PreActResNet / WideResNet: conv1, blocks, relu(bn), global average pool, the linear head."""
    blocks, head = ("layers", "linear") if isinstance(m, PreActResNet) else ("blocks", "fc")
    w.sequence([("conv1", m.conv1), (blocks, getattr(m, blocks)), ("bn", m.bn), ("relu", nn.ReLU()),
                ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), (head, getattr(m, head))], path)


_NETS: dict[type[nn.Module], Callable[[Walk, nn.Module, str], None]] = {
    PreActBlock: _preact_block, PreActResNet: _resnet, WideResNet: _resnet}


def _lln_net(m: nn.Module) -> bool:
    """A built-in Lipschitz net (``head(body(x))``, its own forward) with an ``LLNHead``."""
    return type(m) is LipschitzNet and type(m.head) is LLNHead


def _final_linear(model: nn.Module) -> nn.Module | None:
    """The plain ``nn.Linear`` whose output is the logits (trailing Identity / Dropout aside), or the
    ``LipschitzNet`` whose LLN head it is, else None."""
    m = model.net if isinstance(model, RobustModel) else model
    while not callable(getattr(m, "lipschitz_bound", None)) or _lln_net(m):
        if _lln_net(m):
            return m                                    # logits = its LLN head (a Linear of normalised rows)
        if _plain_sequential(m):
            kids = list(m.children())
            while kids and _is(kids[-1], nn.Identity, nn.Dropout):
                kids.pop()
            if not kids:
                return None
            m = kids[-1]
        elif type(m) in (PreActResNet, WideResNet):
            m = m.linear if type(m) is PreActResNet else m.fc
        else:
            return m if _is(m, nn.Linear) else None
    return None


@dataclass(frozen=True)
class NetBound:
    """``value``: the network's L2 Lipschitz bound; ``layers``: the per-layer factors (inside a residual
    block the components are listed before the block's own factor ``L(branch) + L(shortcut)``, which
    is what multiplies); ``body`` and ``head_weight``: where the logits are a final Linear ``W'`` (any
    pending scale folded in, ``(K, D)``) of a ``body``-Lipschitz feature map, else None."""

    value: float
    layers: list[LayerBound]
    body: float | None
    head_weight: torch.Tensor | None


def network_bound(model: nn.Module, shape: Shape, n_iter: int) -> NetBound:
    """An upper bound on the L2 Lipschitz constant of ``model`` on inputs of ``shape = (C, H, W)`` (the
    product of the factors), and the split ``body`` x final Linear when there is one. Eval mode."""
    w = Walk(shape, n_iter)
    w.head = _final_linear(model)
    w.visit(model, "model")
    w.flush("model (end)")
    if w.head_weight is None:
        return NetBound(w.value, w.layers, None, None)
    return NetBound(w.value, w.layers, w.value / w.head_bound * ROUNDING, w.head_weight.cpu())
