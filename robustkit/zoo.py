"""The model zoo: ``RobustModel`` and ``create`` / ``save`` / ``load``.

A ``RobustModel`` is ``Normalize(mean, std)`` followed by a classifier. It takes
pixel-space images ``(B, C, H, W)`` in ``[0, 1]`` and returns logits ``(B, K)``.
Normalization lives here and nowhere else (not in transforms, not in attacks).

``create`` resolves three kinds of names:

- built-in nets registered in ``MODELS`` (``robustkit models`` lists them);
- ``tv:NAME`` -- any torchvision classification model (``tv:resnet18``);
- any timm model name (``resnet18``, ``vit_tiny_patch16_224``); mean/std come from
  the model's pretrained config unless given;
- ``package.module:ClassName`` -- the user's own ``nn.Module`` subclass, imported and called
  with ``arch_kwargs`` (see ``robustkit._archs``); ``wrap(module, ...)`` adopts a live one.

``resize=H`` / ``(H, W)`` puts a bilinear ``Resize`` inside the model, after ``Normalize``
(the two commute, and the normalization stays the model's first layer): the model's
``input_shape`` is the data's, the network runs at ``(C, H, W)``. Every external network
(timm, tv:, user classes, wrapped modules) gets one dry forward pass at build time, so a
network that does not take the data's size fails here with one ``IncompatibleError``.

``save(model, dir)`` writes ``dir/model.safetensors`` + ``dir/model.json``; ``load``
rebuilds the model from them without unpickling anything. Plain ``.pt`` state
dicts from elsewhere load with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import robustkit._mixnet  # noqa: F401  (registers the mixed classifier: mix)
from robustkit._archs import IMAGENET_MEAN, IMAGENET_STD, build_net, check_rebuildable, dry_run, is_arch, is_import_path
from robustkit._weights import CheckpointWarning, load_state_dict_file, load_weights
from robustkit.errors import CheckpointError, IncompatibleError, InputError
from robustkit.io import atomic_write, atomic_write_json
from robustkit.modes import device_of
from robustkit.nets import Resize, parse_resize
from robustkit.registry import MODELS
from robustkit.validate import integer

__all__ = ["CheckpointWarning", "IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "RobustModel", "check_compatible",
           "create", "from_pretrained_file", "is_arch", "load", "load_state_dict_file", "load_weights",
           "resolve_model_dir", "save", "unwrap", "wrap"]

FORMAT = "robustkit-model/1"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are buffers so they travel with
    ``.to(device)`` and are saved with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise InputError(f"mean and std need the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise InputError(f"std must be > 0 per channel, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class RobustModel(nn.Module):
    """``Normalize(mean, std)`` + classifier; pixel-space input, logits out."""

    def __init__(self, net: nn.Module, arch: str, num_classes: int, input_shape: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], arch_kwargs: dict[str, Any] | None = None,
                 resize: int | str | Sequence[int] | None = None) -> None:
        super().__init__()
        if len(mean) != input_shape[0]:
            raise InputError(f"mean has {len(mean)} entries but the input has {input_shape[0]} channels")
        self.normalize = Normalize(mean, std)
        self.resize = None if resize is None else Resize(parse_resize(resize))  # no state: same keys
        self.net = net
        self.arch = arch
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.arch_kwargs = dict(arch_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0,1] -> (B, K)
        z = self.normalize(x)
        if self.resize is not None:  # (B, C, H, W) -> (B, C, *resize)
            z = self.resize(z)
        return self.net(z)

    def spec(self) -> dict[str, Any]:
        """Everything ``create`` needs to rebuild this model (the JSON sidecar)."""
        return {"format": FORMAT, "arch": self.arch, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "mean": list(self.mean), "std": list(self.std),
                "arch_kwargs": self.arch_kwargs, "resize": list(self.resize.size) if self.resize else None}

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, input_shape={self.input_shape}"


def create(arch: str, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32),
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           pretrained: bool = False, resize: int | str | Sequence[int] | None = None,
           **arch_kwargs: Any) -> RobustModel:
    """Build a ``RobustModel``.

    Args:
        arch: built-in name (see ``MODELS.names()``), ``tv:NAME``, a timm name, or
            ``package.module:ClassName`` (your ``nn.Module`` subclass, called with ``arch_kwargs``
            and, when it takes one, ``num_classes``).
        num_classes: K, the number of logits.
        input_shape: ``(C, H, W)`` of the pixel-space input.
        mean, std: per-channel normalization; defaults: identity for built-ins,
            the pretrained config for timm, ImageNet statistics for torchvision.
        pretrained: load the library's pretrained weights (timm/torchvision; they must
            already be in the local cache -- nothing is downloaded on machines without
            internet).
        resize: ``H``, ``"HxW"`` or ``(H, W)``: the network runs at that size (see the module docstring).
        arch_kwargs: keyword arguments of the architecture (recorded in ``model.json``).
    """
    integer("num_classes", num_classes, minimum=2)
    input_shape = _shape(input_shape)
    c = input_shape[0]
    size = None if resize is None else parse_resize(resize)
    net, dmean, dstd = build_net(arch, num_classes, (c, *size) if size else input_shape, pretrained, arch_kwargs)
    if mean is None:  # a 3-channel default on a 1-channel input: average it
        mean = tuple(dmean) if len(dmean) == c else (sum(dmean) / len(dmean),) * c
    if std is None:
        std = tuple(dstd) if len(dstd) == c else (sum(dstd) / len(dstd),) * c
    model = RobustModel(net, arch, num_classes, input_shape, mean, std, arch_kwargs, size)
    if arch not in MODELS:  # built-ins are built for the shape; external nets are probed
        dry_run(model)
    return model


def wrap(module: nn.Module, *, mean: Sequence[float], std: Sequence[float], input_shape: Sequence[int],
         num_classes: int | None = None, resize: int | str | Sequence[int] | None = None,
         arch_kwargs: dict[str, Any] | None = None) -> RobustModel:
    """Adopt any ``nn.Module`` returning logits as a ``RobustModel`` (bring your own model).

    ``module`` takes *normalized* ``(B, C, H', W')`` inputs (``H', W'`` = ``resize`` or the data's
    size) and returns ``(B, K)`` logits; the returned model takes pixel images ``(B, *input_shape)``
    in ``[0, 1]``. ``num_classes`` is checked against a dry forward pass (and read from it when
    not given). ``save`` records ``module``'s class as ``package.module:ClassName`` plus
    ``arch_kwargs`` (its constructor's keyword arguments), so ``load`` can rebuild it; classes
    from ``__main__`` or a function body cannot be saved that way.
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"wrap() takes an nn.Module, got {type(module).__name__}")
    if isinstance(unwrap(module), RobustModel):
        raise InputError("wrap() got a RobustModel already; use it as it is")
    input_shape = _shape(input_shape)
    if num_classes is not None:
        integer("num_classes", num_classes, minimum=2)
    mean, std = _per_channel("mean", mean, input_shape[0]), _per_channel("std", std, input_shape[0])
    if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
        raise InputError(f"arch_kwargs must be a dict of the class's keyword arguments, got {arch_kwargs!r}")
    mode, cls = module.training, type(module)
    arch = f"{cls.__module__}:{cls.__qualname__}"
    model = RobustModel(module, arch, num_classes or 2, input_shape, mean, std, arch_kwargs, resize)
    model.to(device_of(module))  # Normalize's buffers where the module lives
    model.num_classes = dry_run(model, expect=num_classes)
    return model.train(mode)


def _per_channel(name: str, v: Any, c: int) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        out = ()
    if isinstance(v, (str, bytes)) or len(out) != c:
        raise InputError(f"{name} needs one number per input channel ({c}), got {v!r}")
    return out


def _shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape):
        raise InputError(f"input_shape must be (C, H, W) with positive integer sizes, got {input_shape!r}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


# -- save / load ----------------------------------------------------------------------
def save(model: RobustModel, path: str | Path) -> Path:
    """Write ``path/model.safetensors`` and ``path/model.json`` (atomically). Returns ``path``."""
    from safetensors.torch import save_file

    if not isinstance(model, RobustModel):
        raise TypeError(f"save() takes a RobustModel, got {type(model).__name__}")
    check_rebuildable(model.arch, model.num_classes, model.arch_kwargs)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = _plain_state(model)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    atomic_write_json(path / "model.json", model.spec())
    return path


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (or the model itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def check_compatible(model: nn.Module, info: Any, name: str = "model") -> None:
    """``IncompatibleError`` unless ``model`` fits the dataset ``info`` (a ``DatasetInfo``):
    the same input shape ``(C, H, W)`` and the same number of classes. Models without
    ``input_shape`` / ``num_classes`` (plain ``nn.Module``) are checked where they have them."""
    inner = unwrap(model)
    shape = tuple(getattr(inner, "input_shape", ()) or ())
    if shape and shape != tuple(info.input_shape):
        raise IncompatibleError(f"{name} expects inputs {shape}, but dataset {info.name!r} has "
                                f"{tuple(info.input_shape)} (was it trained on another dataset?)")
    k = getattr(inner, "num_classes", None)
    if isinstance(k, int) and k != info.num_classes:
        raise IncompatibleError(f"{name} has {k} classes, dataset {info.name!r} has {info.num_classes}")


def fingerprint(model: nn.Module) -> str:
    """16 hex digits of a SHA-256 over the state dict (names and raw bytes): a resume / cache key
    that changes whenever the weights do."""
    h = hashlib.sha256()
    for k, v in unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict safetensors accepts: contiguous CPU tensors, shared storage duplicated."""
    src = unwrap(model)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in src.state_dict().items()}


def resolve_model_dir(path: str | Path) -> Path:
    """Map a run directory, a model directory or a file inside one to the directory
    holding ``model.json``. Run directories resolve to ``checkpoints/best`` (else ``last``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model not found: {p} (expected a run directory, a model directory with "
                              "model.json + model.safetensors, or a .pt/.pth state dict)")
    if p.is_file():
        p = p.parent
    for cand in (p, p / "checkpoints" / "best", p / "checkpoints" / "last", p / "model"):
        if (cand / "model.json").is_file():
            return cand
    raise CheckpointError(f"no model.json found in {p} or its checkpoints/best, checkpoints/last, model/")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> RobustModel:
    """Rebuild a model saved by ``save`` (or the best checkpoint of a run directory).

    Never unpickles: the weights are safetensors, the spec is JSON.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = resolve_model_dir(path)
    spec_file, weights = d / "model.json", d / "model.safetensors"
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{spec_file}: not valid JSON ({e})") from None
    for key in ("arch", "num_classes", "input_shape", "mean", "std"):
        if key not in spec:
            raise CheckpointError(f"{spec_file}: missing key {key!r}")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file missing next to {spec_file.name}")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None
    kwargs = spec.get("arch_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{spec_file}: arch_kwargs must be a JSON object, got {type(kwargs).__name__}")
    try:
        model = create(spec["arch"], int(spec["num_classes"]), tuple(spec["input_shape"]), spec["mean"], spec["std"],
                       resize=spec.get("resize"), **kwargs)
    except InputError as e:  # e.g. a module that is not importable here, or a non-Module class name
        raise CheckpointError(f"{spec_file}: cannot rebuild the model: {e}") from None
    try:
        load_weights(model, state, source=str(weights))
    except CheckpointError as e:
        if not is_import_path(model.arch):
            raise
        raise CheckpointError(f"{e} (the class was rebuilt as {model.arch}(**{model.arch_kwargs}); a model from "
                              "wrap() needs its constructor's arch_kwargs=)") from None
    return model.to(map_location).eval()


def from_pretrained_file(path: str | Path, arch: str, num_classes: int = 10,
                         input_shape: Sequence[int] = (3, 32, 32), mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, strict: bool = True,
                         resize: int | str | Sequence[int] | None = None, **arch_kwargs: Any) -> RobustModel:
    """Build ``arch`` (``create``) and fill it from a plain state-dict file (weights-only load;
    ``strict`` as in ``load_weights``)."""
    state = load_state_dict_file(path)  # read first: a bad file fails before the network is built
    model = create(arch, num_classes, input_shape, mean, std, resize=resize, **arch_kwargs)
    return load_weights(model, state, source=str(path), strict=strict)
