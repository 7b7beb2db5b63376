"""Architecture names -> plain classifier nets, for ``robustkit.zoo.create``: the built-in nets
of ``MODELS`` (``robustkit.nets``), ``tv:NAME`` torchvision models and timm model names. Each
comes with its default normalization (identity for built-ins, the pretrained config for timm,
ImageNet statistics for torchvision). Bad names and bad ``arch_kwargs`` are ``InputError``s."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

import robustkit.nets  # noqa: F401  (registers the built-in nets)
from robustkit.errors import InputError
from robustkit.registry import MODELS, RegistryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_net(arch: str, num_classes: int, input_shape: tuple[int, int, int], pretrained: bool,
              kw: dict[str, Any]) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    """``(net, default mean, default std)`` of ``arch`` for inputs ``(C, H, W)`` and ``num_classes`` logits."""
    c = input_shape[0]
    if arch in MODELS:
        if pretrained:
            raise InputError(f"built-in model {arch!r} has no pretrained weights; train it or pass a checkpoint")
        builder = MODELS.get(arch)
        _check_kwargs(builder, arch, kw)
        return builder(num_classes=num_classes, input_shape=input_shape, **kw), (0.0,) * c, (1.0,) * c
    if arch.startswith("tv:"):
        return _torchvision(arch[3:], num_classes, pretrained, kw)
    return _timm(arch, num_classes, c, pretrained, kw)


def is_arch(name: str) -> bool:
    """Whether ``create`` can build ``name``: a built-in net, ``tv:NAME`` or a timm model name."""
    if name in MODELS:
        return True
    if name.startswith("tv:"):
        import torchvision

        return name[3:] in torchvision.models.list_models()
    import timm

    return bool(timm.is_model(name))


def _check_kwargs(builder: Callable[..., Any], arch: str, kw: dict[str, Any]) -> None:
    """``InputError`` naming the accepted keywords when ``kw`` does not fit ``builder``'s signature."""
    sig = inspect.signature(builder)
    try:
        sig.bind(num_classes=2, input_shape=(1, 1, 1), **kw)
    except TypeError as e:
        valid = [n for n in sig.parameters if n not in ("num_classes", "input_shape")]
        raise InputError(f"model.kwargs for {arch!r}: {e}; accepted: {', '.join(valid) or 'none'}") from None


def _external(build: Callable[[], nn.Module], arch: str, kw: dict[str, Any]) -> nn.Module:
    """Build a timm / torchvision net; a ``TypeError`` caused by the user's ``model.kwargs`` is bad
    input (without kwargs it is not ours to explain, and propagates)."""
    try:
        return build()
    except TypeError as e:
        if not kw:
            raise
        raise InputError(f"model.kwargs {sorted(kw)} not accepted by {arch!r}: {e}") from None


def _unknown(arch: str) -> RegistryError:
    return RegistryError(f"unknown model {arch!r}; valid models: built-in {', '.join(MODELS.names())}; "
                         "any timm model name (timm.list_models()); or 'tv:NAME' for torchvision")


def _torchvision(name: str, num_classes: int, pretrained: bool, kw: dict[str, Any]
                 ) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise _unknown("tv:" + name)
    if pretrained:
        net = _external(lambda: torchvision.models.get_model(name, weights="DEFAULT", **kw), "tv:" + name, kw)
        if num_classes != _out_features(net):
            _reset_head(net, num_classes)
    else:
        net = _external(lambda: torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw),
                        "tv:" + name, kw)
    return net, IMAGENET_MEAN, IMAGENET_STD


def _timm(name: str, num_classes: int, in_chans: int, pretrained: bool, kw: dict[str, Any]
          ) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    import timm

    if not timm.is_model(name):
        raise _unknown(name)
    net = _external(lambda: timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                              in_chans=in_chans, **kw), name, kw)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return net, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _out_features(net: nn.Module) -> int:
    last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else -1


def _reset_head(net: nn.Module, num_classes: int) -> None:
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(net, attr, None)
        if isinstance(head, nn.Linear):
            setattr(net, attr, nn.Linear(head.in_features, num_classes))
            return
        if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
            head[-1] = nn.Linear(head[-1].in_features, num_classes)
            return
    raise InputError(f"cannot find the classification head of {type(net).__name__} to resize it to "
                     f"{num_classes} classes; use its own class count (num_classes={_out_features(net)})")
