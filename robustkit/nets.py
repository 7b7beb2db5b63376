"""Built-in networks, registered in ``MODELS``.

Every builder has the signature ``builder(num_classes, input_shape, **kwargs) -> nn.Module``
and returns a plain classifier (no normalization: ``RobustModel`` adds that).

- ``ibp-small`` / ``ibp-medium`` / ``ibp-large``: the CNNs of Gowal et al. 2018,
  "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust
  Models" (Table in Appendix A; padding as in their released code). They are flat
  ``nn.Sequential`` stacks of Conv2d/ReLU/Flatten/Linear so IBP can bound them.
- ``lenet``: the LeNet-style MNIST CNN of Madry et al. 2018 (conv32-5x5, pool,
  conv64-5x5, pool, fc1024).
- ``preact-resnet18``: He et al. 2016 (identity mappings), CIFAR variant.
- ``wrn-28-10`` / ``wrn-34-10`` (and ``wrn`` with depth/widen_factor): Zagoruyko &
  Komodakis 2016, the architecture of TRADES/AWP on CIFAR-10.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.errors import InputError
from robustkit.registry import MODELS

Shape = tuple[int, int, int]


def _flat_dim(features: nn.Module, input_shape: Shape) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).flatten(1).shape[1])


def _conv_stack(spec: list[tuple[int, int, int, int]], num_classes: int, input_shape: Shape,
                hidden: list[int]) -> nn.Sequential:
    """spec: (out_channels, kernel, stride, padding) per conv; hidden: widths of the fc layers."""
    layers: list[nn.Module] = []
    c = input_shape[0]
    for out, k, s, p in spec:
        layers += [nn.Conv2d(c, out, k, stride=s, padding=p), nn.ReLU()]
        c = out
    layers.append(nn.Flatten())
    d = _flat_dim(nn.Sequential(*layers), input_shape)
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("ibp-small", help="IBP small CNN (Gowal et al. 2018): conv16-4x4/2, conv32-4x4/1, fc100")
def ibp_small(num_classes: int = 10, input_shape: Shape = (1, 28, 28)) -> nn.Module:
    return _conv_stack([(16, 4, 2, 0), (32, 4, 1, 0)], num_classes, input_shape, [100])


@MODELS.register("ibp-medium", help="IBP medium CNN (Gowal et al. 2018): 4 convs, fc512 x2")
def ibp_medium(num_classes: int = 10, input_shape: Shape = (1, 28, 28)) -> nn.Module:
    spec = [(32, 3, 1, 0), (32, 4, 2, 0), (64, 3, 1, 0), (64, 4, 2, 0)]
    return _conv_stack(spec, num_classes, input_shape, [512, 512])


@MODELS.register("ibp-large", help="IBP large CNN (Gowal et al. 2018): 5 convs (SAME), fc512")
def ibp_large(num_classes: int = 10, input_shape: Shape = (1, 28, 28)) -> nn.Module:
    spec = [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)]
    return _conv_stack(spec, num_classes, input_shape, [512])


@MODELS.register("lenet", help="LeNet-style MNIST CNN of Madry et al. 2018: conv32, pool, conv64, pool, fc1024")
def lenet(num_classes: int = 10, input_shape: Shape = (1, 28, 28)) -> nn.Module:
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    d = _flat_dim(features, input_shape)
    return nn.Sequential(*features, nn.Linear(d, 1024), nn.ReLU(), nn.Linear(1024, num_classes))


# -- the pre-activation residual block (PreAct ResNet and WideResNet) ------------------
class PreActBlock(nn.Module):
    """``BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3`` plus the shortcut (He et al. 2016, identity
    mappings). The shortcut is the identity, or a 1x1 conv (``stride``) on the pre-activated
    input when the shape changes. It is also the basic block of WideResNet (Zagoruyko &
    Komodakis 2016, without dropout): the two papers' blocks are the same."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W) -> (B, cout, H / stride, W / stride)
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


# -- PreAct ResNet-18 ---------------------------------------------------------------
class PreActResNet(nn.Module):
    def __init__(self, blocks: list[int], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            for j in range(n):
                layers.append(PreActBlock(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 512)
        return self.linear(out)


@MODELS.register("preact-resnet18", help="PreAct ResNet-18 (He et al. 2016), CIFAR variant")
def preact_resnet18(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes, input_shape[0])


# -- WideResNet ---------------------------------------------------------------------
class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise InputError(f"WideResNet depth must be 6n+4 (e.g. 16, 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for g, stride in zip(range(3), (1, 2, 2)):
            for j in range(n):
                blocks.append(PreActBlock(cin, widths[g + 1], stride if j == 0 else 1))
                cin = widths[g + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("wrn", help="WideResNet (Zagoruyko & Komodakis 2016); kwargs depth, widen_factor")
def wrn(num_classes: int = 10, input_shape: Shape = (3, 32, 32), depth: int = 34,
        widen_factor: int = 10) -> nn.Module:
    return WideResNet(depth, widen_factor, num_classes, input_shape[0])


@MODELS.register("wrn-28-10", help="WideResNet-28-10")
def wrn_28_10(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> nn.Module:
    return WideResNet(28, 10, num_classes, input_shape[0])


@MODELS.register("wrn-34-10", help="WideResNet-34-10 (TRADES / AWP CIFAR-10 model)")
def wrn_34_10(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> nn.Module:
    return WideResNet(34, 10, num_classes, input_shape[0])


# -- resizing inside the model (``create(..., resize=)``, ``--resize``) ----------------------
class Resize(nn.Module):
    """Bilinear resize of ``(B, C, H, W)`` to ``(B, C, *size)``, the first step of the network.

    It lives inside the model, so attacks and certificates see (and bound) the data's own
    pixels while the network sees its native resolution (e.g. 224x224 for ImageNet nets on
    32x32 CIFAR). Downsampling is antialiased (computed in float32: CPU has no bf16 kernel for
    it); upsampling is plain bilinear (antialiasing would not change it). Both are linear maps
    with non-negative weights summing to one, so they commute with the per-channel ``Normalize``.
    No parameters or buffers: a model's state-dict layout does not change with ``resize``.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = parse_resize(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, *size)
        h, w = x.shape[-2:]
        if (h, w) == self.size:
            return x
        if h > self.size[0] or w > self.size[1]:  # (partly) downsampling: antialias
            out = F.interpolate(x.float(), size=self.size, mode="bilinear", align_corners=False, antialias=True)
            return out.to(x.dtype)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def parse_resize(value: object, name: str = "resize") -> tuple[int, int]:
    """``224`` / ``"224"`` -> ``(224, 224)``; ``"224x192"`` / ``[224, 192]`` -> ``(224, 192)``.
    Anything else (0, negative, non-integer, three numbers) is an ``InputError``."""
    bad = InputError(f"{name} must be H or HxW with positive integers (e.g. 224 or 224x192), got {value!r}")
    if isinstance(value, str):
        parts: list[object] = [p.strip() for p in value.lower().split("x")]
        if not all(isinstance(p, str) and p.isdigit() for p in parts):
            raise bad
        parts = [int(p) for p in parts]  # type: ignore[arg-type]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if len(parts) not in (1, 2) or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1
                                       for p in parts):
        raise bad
    h, w = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return int(h), int(w)  # type: ignore[call-overload]


# -- Lipschitz-by-construction nets (sll-small, liresnet-small): registered on import -------------
import robustkit._lipschitz_nets  # noqa: E402,F401
