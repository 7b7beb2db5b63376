"""Lipschitz-by-construction nets, registered in ``MODELS`` (``sll-small``, ``liresnet-small``).

A ``LipschitzNet`` is ``body`` (an ``nn.Sequential`` of modules from ``robustkit._lipschitz_layers``,
each with ``lipschitz_bound()``) followed by an ``LLNHead``. It exposes

- ``lipschitz_bound()``: sound upper bound of the whole net's L2 constant (normalized input ->
  logits): the product of the body's per-layer bounds times ``||W_head||_2``;
- ``body_lipschitz_bound()`` / ``body_lipschitz_estimate()``: the body alone (sound / the
  differentiable training estimate), for per-class-pair constants ``L_body * ||W_i - W_j||``;
- ``head``: the ``LLNHead`` (``pairwise()``).

``RobustModel`` puts ``Normalize(mean, std)`` first: its constant ``1 / min(std)`` multiplies the
net's; ``robustkit._lipschitz_nets.model_lipschitz`` includes it.

Both nets are CPU-sized versions for 28x28 inputs, not the papers' architectures: SLL S on CIFAR-10 is
20 SLL convs of width 45 plus 7 SLL dense layers; LiResNet on CIFAR-10 is a 5x5 stride-2 stem, 12
blocks of width 512, the ``Map2Vec`` neck (stride-4 patch conv + a 2048-wide dense layer) and 8
orthogonal dense layers. Here a 2x2 orthogonal patch convolution replaces the 5x5 stem (its norm is
exact, no power iteration) and one orthogonal dense layer replaces the dense stack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustkit._lipschitz_bounds import conv_norm
from robustkit._lipschitz_layers import LiResConv, LLNHead, MinMax, OrthoLinear, OrthoPatchConv, SLLConv, SLLLinear
from robustkit.errors import InputError
from robustkit.registry import MODELS
from robustkit.validate import integer

Shape = tuple[int, int, int]


class LipschitzNet(nn.Module):
    """``head(body(x))`` with known constants; ``(B, C, H, W) -> (B, K)``."""

    def __init__(self, body: nn.Sequential, head: LLNHead) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def body_lipschitz_bound(self) -> float:
        out = 1.0
        for m in self.body:
            out *= _bound(m)
        return out

    def body_lipschitz_estimate(self) -> torch.Tensor:
        out = self.head.weight.new_ones(())
        for m in self.body:
            if hasattr(m, "lipschitz_estimate"):
                out = out * m.lipschitz_estimate()
        return out

    def lipschitz_bound(self) -> float:
        return self.body_lipschitz_bound() * self.head.lipschitz_bound()


_ONE_LIPSCHITZ = (nn.Flatten, nn.Identity, nn.ReLU)


def _bound(m: nn.Module) -> float:
    if hasattr(m, "lipschitz_bound"):
        return float(m.lipschitz_bound())
    if isinstance(m, _ONE_LIPSCHITZ):
        return 1.0
    raise TypeError(f"{type(m).__name__} has no lipschitz_bound()")  # a bug in a builder below


def model_lipschitz(model: Any) -> float:
    """Sound L2 constant of a ``RobustModel`` over a ``LipschitzNet``, pixel space -> logits:
    ``net.lipschitz_bound() / min(std)``. ``InputError`` for other nets or a resize inside the model."""
    net = getattr(model, "net", None)
    if not isinstance(net, LipschitzNet):
        raise InputError(f"model {getattr(model, 'arch', type(model).__name__)!r} is not a Lipschitz-by-construction "
                         f"net; use one of {', '.join(LIPSCHITZ_ARCHS)}")
    if getattr(model, "resize", None) is not None:
        raise InputError("a Lipschitz net with resize= has no known constant (the resize is not 1-Lipschitz)")
    return net.lipschitz_bound() / min(model.std)


def _half(n: int) -> int:
    return (n + 1) // 2  # OrthoPatchConv(stride 2) pads odd sizes


def _check_shape(arch: str, input_shape: Shape) -> None:
    _, h, w = input_shape
    if h < 4 or w < 4:
        raise InputError(f"{arch} needs images of at least 4x4 pixels, got {h}x{w}")


@MODELS.register("sll-small", help="SLL net (Araujo et al. 2023), MNIST-size: 6 SLL convs, 2 SLL dense, LLN head")
def sll_small(num_classes: int = 10, input_shape: Shape = (1, 28, 28), width: int = 16,
              dense: int = 256) -> nn.Module:
    """``OrthoPatchConv(C -> w, 2)`` + 3 ``SLLConv(w, inner 2w)`` + ``OrthoPatchConv(w -> 2w, 2)`` +
    3 ``SLLConv(2w, inner 4w)`` + flatten + ``OrthoLinear(-> dense)`` + 2 ``SLLLinear(dense)`` + LLN head.
    A small version of the paper's SLL S (20 convs of width 45 on CIFAR-10), for CPU-sized MNIST."""
    _check_shape("sll-small", input_shape)
    width, dense = integer("width", width, 1), integer("dense", dense, 1)
    c, h, w = input_shape
    h2, w2 = _half(_half(h)), _half(_half(w))
    body = nn.Sequential(
        OrthoPatchConv(c, width, 2), *[SLLConv(width, 2 * width) for _ in range(3)],
        OrthoPatchConv(width, 2 * width, 2), *[SLLConv(2 * width, 4 * width) for _ in range(3)],
        nn.Flatten(), OrthoLinear(2 * width * h2 * w2, dense), *[SLLLinear(dense, dense) for _ in range(2)])
    return LipschitzNet(body, LLNHead(dense, num_classes))


@MODELS.register("liresnet-small", help="LiResNet (Hu et al. 2023), MNIST-size: 6 LiResConv blocks, LLN head")
def liresnet_small(num_classes: int = 10, input_shape: Shape = (1, 28, 28), width: int = 32, depth: int = 6,
                   dense: int = 256) -> nn.Module:
    """``OrthoPatchConv(C -> w, 2)`` + MinMax + ``depth`` ``LiResConv(w)`` blocks (scale depth^-1/2 as
    the official code) + ``OrthoPatchConv(w -> w, 2)`` (the neck) + flatten + ``OrthoLinear(-> dense)``
    + MinMax + LLN head. The paper's CIFAR-10 net is 12 blocks of width 512 with a 5x5 stem."""
    _check_shape("liresnet-small", input_shape)
    width, depth, dense = integer("width", width, 2), integer("depth", depth, 1), integer("dense", dense, 2)
    if width % 2 or dense % 2:
        raise InputError(f"liresnet-small needs even width and dense (MinMax pairs channels), got {width}, {dense}")
    c, h, w = input_shape
    h1, w1 = _half(h), _half(w)
    h2, w2 = _half(h1), _half(w1)
    body = nn.Sequential(
        OrthoPatchConv(c, width, 2), MinMax(),
        *[LiResConv(width, (h1, w1), scale=depth ** -0.5) for _ in range(depth)],
        OrthoPatchConv(width, width, 2), nn.Flatten(), OrthoLinear(width * h2 * w2, dense), MinMax())
    return LipschitzNet(body, LLNHead(dense, num_classes))


LIPSCHITZ_ARCHS = ("sll-small", "liresnet-small")


# -- (L_body, W_head) of a model, for EMMA ----------------------------------------------------------
def lipschitz_split(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lc, W)`` of a ``RobustModel`` (or a DDP wrapper of one): ``W`` ``(K, d)`` the last linear
    layer's weight (differentiable) and ``lc`` (differentiable scalar) the L2 constant of everything
    before it, pixel space (``1 / min(std)`` included), so ``lc * ||W_i - W_j||`` bounds the constant
    of the margin ``z_i - z_j``.

    - ``LipschitzNet``: the body's training estimate (``body_lipschitz_estimate``; for LiResConv a
      power-iteration value, the official code's choice) and the LLN head's normalised rows;
    - a plain ``nn.Sequential`` of ``Conv2d`` / ``Linear`` / ``ReLU`` / ``Flatten`` / ``Identity``
      ending in ``Linear`` (e.g. ``ibp-small``, the GloRo setting of Leino et al. 2021): the product
      of the per-layer norms (DFT norm for convolutions, the spectral norm for dense layers).

    Anything else is an ``InputError`` naming the layer.
    """
    model = getattr(model, "module", model)                          # DDP -> RobustModel
    net = getattr(model, "net", None)
    std = getattr(model, "std", None)
    if net is None or std is None:
        raise InputError(f"EMMA needs a RobustModel, got {type(model).__name__}")
    if getattr(model, "resize", None) is not None:
        raise InputError("EMMA: a model with resize= has no known Lipschitz constant (the resize is not 1-Lipschitz)")
    inv_std = 1.0 / min(std)
    if isinstance(net, LipschitzNet):
        return net.body_lipschitz_estimate() * inv_std, net.head.get_weight()
    if not isinstance(net, nn.Sequential) or not len(net) or not isinstance(net[-1], nn.Linear):
        raise InputError(f"EMMA needs a Lipschitz net ({', '.join(LIPSCHITZ_ARCHS)}) or an nn.Sequential of "
                         f"Conv2d/Linear/ReLU/Flatten ending in Linear; got {type(net).__name__} "
                         f"(model {getattr(model, 'arch', '?')!r})")
    sizes = _conv_input_sizes(net, tuple(model.input_shape))
    lc = net[-1].weight.new_tensor(inv_std, dtype=torch.float64)
    for m in list(net)[:-1]:
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise InputError(f"EMMA: Conv2d with padding_mode={m.padding_mode!r} is not supported (zeros only)")
            lc = lc * conv_norm(m.weight, sizes[id(m)], _padding(m), m.dilation, m.groups)
        elif isinstance(m, nn.Linear):
            lc = lc * torch.linalg.matrix_norm(m.weight.double(), ord=2)
        elif not isinstance(m, _ONE_LIPSCHITZ):
            raise InputError(f"EMMA: layer {type(m).__name__} has no known Lipschitz constant; allowed in a "
                             "Sequential: Conv2d, Linear, ReLU, Flatten, Identity")
    return lc.float(), net[-1].weight


def _padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):   # "valid" -> 0; "same" -> at most ceil(d (k - 1) / 2) per side
        return (0, 0) if m.padding == "valid" else tuple(  # type: ignore[return-value]
            -(-d * (k - 1) // 2) for d, k in zip(m.dilation, m.kernel_size))
    return m.padding  # type: ignore[return-value]


def _conv_input_sizes(net: nn.Sequential, input_shape: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """``id(conv) -> (H, W)`` of its input, from one forward of a zero image."""
    sizes: dict[int, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: sizes.__setitem__(id(mod), tuple(inp[0].shape[-2:])))
             for m in net if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net(net[-1].weight.new_zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return sizes
