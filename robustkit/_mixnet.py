"""Mixed classifiers (adaptive smoothing): a standard and a robust classifier behind one ``RobustModel``.

Bai, Anderson, Kim, Sojoudi, "Improving the Accuracy-Robustness Trade-Off of Classifiers via Adaptive
Smoothing", SIAM J. Math. Data Sci. 2024 (arXiv 2301.12554), and "Mixing Classifiers to Alleviate the
Accuracy-Robustness Trade-Off" (Bai, Anderson, Sojoudi); code ``Bai-YT/AdaptiveSmoothing`` (``models/comp_model.py``,
``models/mixing_net.py``). The mixed classifier is

    h_mix(x) = log( (1 - alpha(x)) * softmax(s_std * g(x)) + alpha(x) * softmax(s_rob * h(x)) )   # (B, K)

with ``g`` the accurate ("standard", STD) member, ``h`` the robust (ROB) member and ``s_std``, ``s_rob`` their
logit scales (the code's ``std_scale`` / ``rob_scale``; CIFAR-10 EDM config 1.2 / 0.5; default here 1 / 1).
The output is the log of the mixed probabilities, so ``softmax(h_mix) =`` the mixture and every attack, the
evaluation engine and AutoAttack see one differentiable module (gradients flow through both members and the
mixing network: the code's ``policy_graph: True``, the adaptive white-box setting the paper evaluates).

``alpha`` is either fixed (``alpha=0.5``; 0 is the STD member alone, 1 the ROB member alone) or ``alpha(x)``
from a small **mixing network** (``mixing_net=True``) that, as in the code, reads intermediate features of both
members (``std_layer`` / ``rob_layer``: the output of a named submodule of each member; default the input of
each member's last layer, its penultimate features) and outputs one logit ``gamma`` per image, then, as in
``CompositeModel.forward``: during training ``gamma`` is clamped to ``mean +- 0.6 std`` of the batch, passed
through a ``BatchNorm1d(1, affine=False, momentum=0.01)``, scaled and shifted (``gamma_scale``, ``gamma_bias``;
code CIFAR-10 ``gamma_consts`` (2, 0.4) in training, (2, 1.3) in evaluation -- we keep one pair, default (2, 0.4))
and ``alpha = sigmoid(gamma)``; in eval mode alpha is mapped into ``[alpha_min, alpha_max]`` (code
``alpha_bias`` 0.84, ``alpha_scale`` 0.15 for CIFAR-10; default here the whole ``[0, 1]``). The code's mixing
network is a stack of pre-activation ResNet blocks on feature maps of two depths of each member (ResNet /
WRN specific); ours is arch-agnostic and small: per member a 1x1 conv (feature maps) or a linear map (feature
vectors) to ``width`` channels with BN + ReLU and global average pooling, the two streams summed (as V4
sums its two), then ``Linear(width, width) - ReLU - Linear(width, 1, bias=False)``. ``defenses/mixing.py``
trains it with the members frozen.

The members are always frozen (``requires_grad=False``) and always in eval mode (``MixedNet.train`` only
switches the mixing network), as in the code (``CompositeModel.__init__`` asserts frozen members, ``train``
only touches the policy network and its BN). The last forward's ``gamma`` ``(B,)`` (or ``None`` with a fixed
alpha) is kept in ``MixedNet.gamma`` for the training objective.

Build a composite of two trained models with ``robustkit.mix.mix_model(standard, robust, ...)`` (or
``robustkit mix``); ``save`` / ``load`` rebuild it from ``model.json`` (the members' specs are its
``arch_kwargs``). This module holds the modules and the ``mix`` registration and imports nothing of the zoo
(the zoo imports it); the members are ``Member``s, laid out (and keyed) like ``RobustModel``s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit._archs import build_net
from robustkit.errors import InputError
from robustkit.nets import Resize, parse_resize
from robustkit.registry import MODELS

Shape = tuple[int, int, int]
MEMBER_KEYS = ("arch", "arch_kwargs", "mean", "std", "resize")


def _number(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
            or not lo <= float(v) <= hi:
        raise InputError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


class _Normalize(nn.Module):
    """``(x - mean) / std`` with the buffers of ``zoo.Normalize`` (same state-dict keys)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Member(nn.Module):
    """A member classifier: ``Normalize`` [+ ``Resize``] + net, the layout (and state-dict keys) of a
    ``RobustModel``, built here without the zoo (the zoo imports this module)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], resize: Any = None) -> None:
        super().__init__()
        self.normalize = _Normalize(mean, std)
        self.resize = None if resize is None else Resize(parse_resize(resize))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, K)
        z = self.normalize(x)
        return self.net(z if self.resize is None else self.resize(z))


def _channels(name: str, v: Sequence[float] | None, default: Sequence[float], c: int) -> list[float]:
    if v is None:   # a 3-channel default on a 1-channel input: average it (as zoo.create)
        return list(default) if len(default) == c else [sum(default) / len(default)] * c
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != c:
        raise InputError(f"mix: member {name} needs one number per input channel ({c}), got {v!r}")
    return [float(t) for t in v]


def _member(role: str, spec: Any, num_classes: int, input_shape: Shape) -> nn.Module:
    """A frozen ``Member`` from a spec ``NAME`` or ``{"arch", "arch_kwargs"?, "mean"?, "std"?, "resize"?}``."""
    if isinstance(spec, str):
        spec = {"arch": spec}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("arch"), str):
        raise InputError(f"mix: {role} must be a member spec {{'arch': NAME, 'arch_kwargs': {{...}}, 'mean': [...], "
                         f"'std': [...]}} (use robustkit mix / mix_model() to combine two saved models), got {spec!r}")
    extra = sorted(set(spec) - set(MEMBER_KEYS))
    if extra:
        raise InputError(f"mix: {role} spec has unknown keys {extra}; allowed: {', '.join(MEMBER_KEYS)}")
    if spec["arch"] == "mix":
        raise InputError(f"mix: the {role} member cannot itself be a mix composite")
    kw = spec.get("arch_kwargs") or {}
    if not isinstance(kw, Mapping):
        raise InputError(f"mix: {role} arch_kwargs must be a mapping, got {kw!r}")
    c = input_shape[0]
    size = None if spec.get("resize") is None else parse_resize(spec["resize"])
    net, dmean, dstd = build_net(spec["arch"], num_classes, (c, *size) if size else input_shape, False, dict(kw))
    member = Member(net, _channels("mean", spec.get("mean"), dmean, c), _channels("std", spec.get("std"), dstd, c),
                    size)
    return member.requires_grad_(False).eval()


# -- feature taps -------------------------------------------------------------------------------------
def _leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}


class _Tap:
    """Keeps the features of one member: the output of ``layer`` or (``layer=None``) the input of the last
    leaf module to run (the penultimate features)."""

    def __init__(self, member: nn.Module, layer: str | None, role: str) -> None:
        self.value: torch.Tensor | None = None
        modules = dict(member.named_modules())
        if layer is not None:
            if not isinstance(layer, str) or layer not in modules or not layer:
                names = ", ".join(list(_leaf_modules(member))[:30])
                raise InputError(f"mix: {role}_layer {layer!r} is not a submodule of the {role} member; "
                                 f"its layers include: {names}")
            modules[layer].register_forward_hook(self._output)
        else:
            for m in _leaf_modules(member).values():
                m.register_forward_pre_hook(self._input)

    def _output(self, _m: nn.Module, _inp: Any, out: Any) -> None:
        self.value = out if isinstance(out, torch.Tensor) else None

    def _input(self, _m: nn.Module, inp: tuple[Any, ...]) -> None:
        if inp and isinstance(inp[0], torch.Tensor):
            self.value = inp[0]   # overwritten by every leaf: the last one to run wins

    def take(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise InputError("mix: the feature layer produced no tensor in this forward pass")
        return v


class _Stream(nn.Module):
    """Features ``(B, C, H, W)`` or ``(B, D...)`` -> ``(B, width)``."""

    def __init__(self, shape: Sequence[int], width: int) -> None:
        super().__init__()
        self.spatial = len(shape) == 3
        if self.spatial:
            self.proj: nn.Module = nn.Conv2d(shape[0], width, 1, bias=False)
            self.bn: nn.Module = nn.BatchNorm2d(width)
        else:
            self.proj = nn.Linear(int(math.prod(shape)), width, bias=False)
            self.bn = nn.BatchNorm1d(width)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.spatial:                                        # (B, C, H, W)
            return F.relu(self.bn(self.proj(f))).mean((2, 3))   # (B, width)
        return F.relu(self.bn(self.proj(f.flatten(1))))         # (B, width)


class MixingNet(nn.Module):
    """``(std features, rob features) -> gamma (B, 1)``: two streams summed, then a 2-layer head."""

    def __init__(self, std_shape: Sequence[int], rob_shape: Sequence[int], width: int = 32) -> None:
        super().__init__()
        self.std, self.rob = _Stream(std_shape, width), _Stream(rob_shape, width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1, bias=False))

    def forward(self, f_std: torch.Tensor, f_rob: torch.Tensor) -> torch.Tensor:  # -> (B, 1)
        return self.head(self.std(f_std) + self.rob(f_rob))


class MixedNet(nn.Module):
    """The mixed classifier; ``forward(x)`` ``(B, C, H, W)`` -> ``log`` of the mixed probabilities ``(B, K)``."""

    def __init__(self, standard: nn.Module, robust: nn.Module, *, alpha: float | None = 0.5,
                 mixing_net: bool = False, std_layer: str | None = None, rob_layer: str | None = None,
                 width: int = 32, alpha_min: float = 0.0, alpha_max: float = 1.0, gamma_scale: float = 2.0,
                 gamma_bias: float = 0.4, std_scale: float = 1.0, rob_scale: float = 1.0,
                 input_shape: Shape = (1, 28, 28)) -> None:
        super().__init__()
        self.standard, self.robust = standard.requires_grad_(False).eval(), robust.requires_grad_(False).eval()
        self.std_scale = _number("std_scale", std_scale, 1e-6, 1e6)
        self.rob_scale = _number("rob_scale", rob_scale, 1e-6, 1e6)
        self.gamma: torch.Tensor | None = None
        self.mixer: MixingNet | None = None
        if not mixing_net:
            if alpha is None:
                raise InputError("mix: give a fixed alpha in [0, 1] or mixing_net=True")
            self.register_buffer("alpha", torch.tensor(_number("alpha", alpha, 0.0, 1.0)))
            return
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise InputError(f"mix: width must be a positive integer, got {width!r}")
        lo, hi = _number("alpha_min", alpha_min, 0.0, 1.0), _number("alpha_max", alpha_max, 0.0, 1.0)
        if lo > hi:
            raise InputError(f"mix: alpha_min must be <= alpha_max, got {lo} > {hi}")
        self.alpha_min, self.alpha_max = lo, hi
        self.gamma_scale = _number("gamma_scale", gamma_scale, 1e-6, 1e6)
        self.gamma_bias = _number("gamma_bias", gamma_bias, -1e6, 1e6)
        self._taps = (_Tap(self.standard, std_layer, "std"), _Tap(self.robust, rob_layer, "rob"))
        with torch.no_grad():   # one dry pass for the feature shapes (the members are frozen, in eval mode)
            z = torch.zeros(2, *input_shape)
            self.standard(z), self.robust(z)
            shapes = [t.take().shape[1:] for t in self._taps]
        self.mixer = MixingNet(shapes[0], shapes[1], width)
        self.gamma_bn = nn.BatchNorm1d(1, affine=False, momentum=0.01)

    def __getstate__(self) -> dict[str, Any]:   # copy.deepcopy / pickle: not the last forward's graph
        state = self.__dict__.copy()
        state["gamma"] = None
        return state

    def train(self, mode: bool = True) -> MixedNet:
        """Only the mixing network changes mode; the members stay in eval mode (frozen BN statistics)."""
        self.training = bool(mode)
        if self.mixer is not None:
            self.mixer.train(mode)
            self.gamma_bn.train(mode)
        return self

    def mixing_weight(self, gamma: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """``alpha`` ``(B, 1)`` from ``gamma`` ``(B,)`` (or the fixed alpha)."""
        if gamma is None:
            return self.alpha.to(like.dtype).expand(like.shape[0], 1)
        a = torch.sigmoid(gamma).unsqueeze(1)                               # (B, 1)
        if not self.training:
            a = self.alpha_min + (self.alpha_max - self.alpha_min) * a
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        g = self.standard(x).float() * self.std_scale                        # (B, K) STD logits
        h = self.robust(x).float() * self.rob_scale                          # (B, K) ROB logits
        gamma = None
        if self.mixer is not None:
            raw = self.mixer(self._taps[0].take(), self._taps[1].take()).squeeze(1)   # (B,)
            if self.training and raw.shape[0] > 1:   # the code's clamp, so that the output BN works best
                m, s = raw.mean().detach(), raw.std().detach()
                raw = torch.minimum(torch.maximum(raw, m - 0.6 * s), m + 0.6 * s)
            gamma = self.gamma_bn(raw.unsqueeze(1)).squeeze(1) * self.gamma_scale + self.gamma_bias   # (B,)
        self.gamma = gamma
        a = self.mixing_weight(gamma, g)                                     # (B, 1)
        tiny = 0.0 if self.mixer is None else 1e-30   # a learned alpha: keep the log (and its gradient) finite
        log_a, log_1ma = torch.log(a.clamp_min(tiny)), torch.log((1 - a).clamp_min(tiny))   # (B, 1) each
        # log((1 - a) p_std + a p_rob), computed as a log-sum-exp of log-probabilities (exact at a = 0 or 1)
        out = torch.logsumexp(torch.stack([log_1ma + F.log_softmax(g, 1), log_a + F.log_softmax(h, 1)]), 0)
        return out.to(x.dtype)


@MODELS.register("mix", help="adaptive smoothing (Bai et al. 2024): (1-alpha) softmax(std) + alpha softmax(rob), "
                             "fixed alpha or a mixing network; build with robustkit mix")
def mix(num_classes: int = 10, input_shape: Shape = (1, 28, 28), standard: Any = "ibp-small", robust: Any = "ibp-small",
        alpha: float | None = 0.5, mixing_net: bool = False, std_layer: str | None = None,
        rob_layer: str | None = None, width: int = 32, alpha_min: float = 0.0, alpha_max: float = 1.0,
        gamma_scale: float = 2.0, gamma_bias: float = 0.4, std_scale: float = 1.0,
        rob_scale: float = 1.0) -> nn.Module:
    """Two member ``RobustModel``s from their specs (an arch name or ``{"arch", "arch_kwargs", "mean", "std",
    "resize"}``; fresh weights: ``mix_model`` copies trained ones)."""
    if standard is None or robust is None:
        raise InputError("mix needs two members: arch_kwargs standard={'arch': ...} and robust={'arch': ...} "
                         "(or combine two saved models with `robustkit mix --standard RUN --robust RUN`)")
    shape = tuple(int(s) for s in input_shape)
    return MixedNet(_member("standard", standard, num_classes, shape), _member("robust", robust, num_classes, shape),
                    alpha=alpha, mixing_net=bool(mixing_net), std_layer=std_layer, rob_layer=rob_layer, width=width,
                    alpha_min=alpha_min, alpha_max=alpha_max, gamma_scale=gamma_scale, gamma_bias=gamma_bias,
                    std_scale=std_scale, rob_scale=rob_scale, input_shape=shape)  # type: ignore[arg-type]
