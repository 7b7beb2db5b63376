"""Architecture names -> plain classifier nets, for ``robustkit.zoo.create``: the built-in nets
of ``MODELS`` (``robustkit.nets``), ``tv:NAME`` torchvision models, timm model names and the
user's own classes as ``package.module:ClassName``. Each comes with its default normalization
(identity for built-ins and user classes, the pretrained config for timm, ImageNet statistics
for torchvision). Bad names and bad ``arch_kwargs`` are ``InputError``s.

A user class is imported (its module's top-level code runs, as for any ``import``) and called
as ``ClassName(**arch_kwargs)``, plus ``num_classes=K`` when its ``__init__`` takes
``num_classes`` and the kwargs do not set it. Only ``nn.Module`` subclasses are ever called: a
``model.json`` naming ``os:system`` or a factory function is refused before anything runs but
the import. Nothing is unpickled.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import robustkit.nets  # noqa: F401  (registers the built-in nets)
from robustkit.errors import IncompatibleError, InputError
from robustkit.modes import device_of
from robustkit.registry import MODELS, RegistryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
IMPORT_PATH = re.compile(rf"({_DOTTED}):({_DOTTED})")  # package.module:ClassName (or :Outer.Inner)


def build_net(arch: str, num_classes: int, input_shape: tuple[int, int, int], pretrained: bool,
              kw: dict[str, Any]) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    """``(net, default mean, default std)`` of ``arch`` for inputs ``(C, H, W)`` and ``num_classes`` logits."""
    c = input_shape[0]
    if is_import_path(arch):
        if pretrained:
            raise InputError(f"{arch!r} is your own class: it has no library weights; pass --weights FILE "
                             "(a plain state dict) instead of pretrained")
        return _user(arch, num_classes, kw), (0.0,) * c, (1.0,) * c
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
    """Whether ``create`` can build ``name``: a built-in net, ``tv:NAME``, a timm model name or an
    importable ``module:Class`` naming an ``nn.Module`` subclass."""
    if name in MODELS:
        return True
    if is_import_path(name):
        try:
            import_class(name)
        except InputError:
            return False
        return True
    if name.startswith("tv:"):
        import torchvision

        return name[3:] in torchvision.models.list_models()
    import timm

    return bool(timm.is_model(name))


def is_import_path(arch: str) -> bool:
    """``package.module:ClassName`` syntax (``tv:`` is torchvision's prefix, not a module)."""
    return not arch.startswith("tv:") and IMPORT_PATH.fullmatch(arch) is not None


def import_class(arch: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass named by ``package.module:ClassName``; ``InputError`` when the module
    cannot be imported, has no such attribute, or it is not an ``nn.Module`` subclass."""
    match = IMPORT_PATH.fullmatch(arch)
    if match is None or arch.startswith("tv:"):
        raise InputError(f"arch {arch!r}: expected package.module:ClassName (e.g. mynets.resnet:ResNet18)")
    mod_name, qual = match.groups()
    if mod_name == "__main__":
        raise InputError(f"arch {arch!r}: classes defined in __main__ cannot be rebuilt elsewhere; move the class "
                         "into an importable module")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"arch {arch!r}: cannot import module {mod_name!r} ({e}); is its directory on "
                         "PYTHONPATH (or installed)?") from None
    for part in qual.split("."):
        if not hasattr(obj, part):
            found = sorted(n for n, v in vars(obj).items() if isinstance(v, type) and issubclass(v, nn.Module)
                           and not n.startswith("_"))[:10]
            raise InputError(f"arch {arch!r}: {mod_name!r} has no attribute {qual!r}; nn.Module classes there: "
                             f"{', '.join(found) or 'none'}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise InputError(f"arch {arch!r} is a {type(obj).__name__}, not an nn.Module subclass: only model classes "
                         "are called (write a small nn.Module subclass around a factory function)")
    return obj


def _user(arch: str, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    cls, kw = user_call(arch, num_classes, kw)
    return cls(**kw)


def user_call(arch: str, num_classes: int, kw: dict[str, Any]) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and keyword arguments ``create`` calls for ``arch``: ``kw`` plus ``num_classes`` when the
    class takes it and ``kw`` does not set it; ``InputError`` unless they fit its signature."""
    cls = import_class(arch)
    sig = inspect.signature(cls)
    if "num_classes" in sig.parameters and "num_classes" not in kw:
        kw = {**kw, "num_classes": num_classes}
    try:
        sig.bind(**kw)
    except TypeError as e:
        valid = [n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise InputError(f"arch kwargs (--arch-kwargs) for {arch!r}: {e}; accepted: "
                         f"{', '.join(valid) or 'none'}") from None
    return cls, kw


def check_rebuildable(arch: str, num_classes: int, kw: dict[str, Any]) -> None:
    """``InputError`` (for ``zoo.save``, before anything is written) when ``load`` could not rebuild ``arch``
    (a wrapped class from ``__main__`` / a function body, or kwargs its constructor rejects)."""
    if arch in MODELS or arch.startswith("tv:") or ":" not in arch:
        return
    if not is_import_path(arch) or arch.startswith("__main__:"):
        raise InputError(f"cannot save a model of class {arch!r}: load() rebuilds it by importing "
                         "package.module:ClassName, so define the class in an importable module")
    try:
        user_call(arch, num_classes, kw)
    except InputError as e:
        raise InputError(f"cannot save {arch!r} so that load() rebuilds it ({e}); pass its constructor's keyword "
                         "arguments as wrap(..., arch_kwargs={...})") from None


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


def dry_run(model: Any, expect: int | None = -1) -> int:  # model: a RobustModel
    """One eval-mode forward of a ``(2, C, H, W)`` zero batch: ``IncompatibleError`` unless the network
    takes the input size and returns ``(2, K)`` logits with ``K`` = ``expect`` (default
    ``model.num_classes``; None: any ``K >= 2``). Returns ``K``."""
    expect = model.num_classes if expect == -1 else expect
    x = torch.zeros(2, *model.input_shape, device=device_of(model))
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:  # noqa: BLE001 - the network's own code: any failure means it rejects this input
        at = f"resized to {model.resize.size}" if model.resize else "at the data's size"
        hint = "" if model.resize else ("; if the network needs another input size, pass --resize H[xW] (resize= "
                                        "in create/wrap; 224 for most ImageNet timm / tv: nets): it resizes inside "
                                        "the model, so attacks still see the data's pixels")
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise IncompatibleError(f"model {model.arch!r} does not accept inputs {model.input_shape} {at}: "
                                f"{type(e).__name__}: {msg}{hint}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise IncompatibleError(f"model {model.arch!r} must return (B, K) logits (K >= 2) for inputs "
                                f"(B, {', '.join(map(str, model.input_shape))}); for B=2 it returned {got}")
    k = int(out.shape[1])
    if expect is not None and k != expect:
        raise IncompatibleError(f"model {model.arch!r} returns {k} logits but num_classes is {expect}; give the "
                                "class a num_classes constructor parameter (create passes it), or use a "
                                f"{k}-class dataset")
    return k
