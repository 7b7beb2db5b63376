"""The model zoo: ``RobustModel`` and ``create`` / ``save`` / ``load``.

A ``RobustModel`` is ``Normalize(mean, std)`` followed by a classifier. It takes
pixel-space images ``(B, C, H, W)`` in ``[0, 1]`` and returns logits ``(B, K)``.
Normalization lives here and nowhere else (not in transforms, not in attacks).

``create`` resolves three kinds of names:

- built-in nets registered in ``MODELS`` (``robustkit models`` lists them);
- ``tv:NAME`` -- any torchvision classification model (``tv:resnet18``);
- any timm model name (``resnet18``, ``vit_tiny_patch16_224``); mean/std come from
  the model's pretrained config unless given.

``save(model, dir)`` writes ``dir/model.safetensors`` + ``dir/model.json``; ``load``
rebuilds the model from them without unpickling anything. Plain ``.pt`` state
dicts from elsewhere load with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit._archs import IMAGENET_MEAN, IMAGENET_STD, build_net, is_arch
from robustkit.errors import CheckpointError, IncompatibleError, InputError
from robustkit.io import atomic_write, atomic_write_json
from robustkit.validate import integer

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "RobustModel", "check_compatible", "create",
           "from_pretrained_file", "is_arch", "load", "load_state_dict_file", "load_weights", "resolve_model_dir",
           "save", "unwrap"]

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
                 mean: Sequence[float], std: Sequence[float], arch_kwargs: dict[str, Any] | None = None
                 ) -> None:
        super().__init__()
        if len(mean) != input_shape[0]:
            raise InputError(f"mean has {len(mean)} entries but the input has {input_shape[0]} channels")
        self.normalize = Normalize(mean, std)
        self.net = net
        self.arch = arch
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.arch_kwargs = dict(arch_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0,1] -> (B, K)
        return self.net(self.normalize(x))

    def spec(self) -> dict[str, Any]:
        """Everything ``create`` needs to rebuild this model (the JSON sidecar)."""
        return {"format": FORMAT, "arch": self.arch, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "mean": list(self.mean), "std": list(self.std),
                "arch_kwargs": self.arch_kwargs}

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, input_shape={self.input_shape}"


def create(arch: str, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32),
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           pretrained: bool = False, **arch_kwargs: Any) -> RobustModel:
    """Build a ``RobustModel``.

    Args:
        arch: built-in name (see ``MODELS.names()``), ``tv:NAME`` or a timm name.
        num_classes: K, the number of logits.
        input_shape: ``(C, H, W)`` of the pixel-space input.
        mean, std: per-channel normalization; defaults: identity for built-ins,
            the pretrained config for timm, ImageNet statistics for torchvision.
        pretrained: load the library's pretrained weights (timm/torchvision; they must
            already be in the local cache -- nothing is downloaded on machines without
            internet).
    """
    integer("num_classes", num_classes, minimum=2)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise InputError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
    c = input_shape[0]
    net, dmean, dstd = build_net(arch, num_classes, input_shape, pretrained, arch_kwargs)
    if mean is None:  # a 3-channel default on a 1-channel input: average it
        mean = tuple(dmean) if len(dmean) == c else (sum(dmean) / len(dmean),) * c
    if std is None:
        std = tuple(dstd) if len(dstd) == c else (sum(dstd) / len(dstd),) * c
    return RobustModel(net, arch, num_classes, input_shape, mean, std, arch_kwargs)


# -- save / load ----------------------------------------------------------------------
def save(model: RobustModel, path: str | Path) -> Path:
    """Write ``path/model.safetensors`` and ``path/model.json`` (atomically). Returns ``path``."""
    from safetensors.torch import save_file

    if not isinstance(model, RobustModel):
        raise TypeError(f"save() takes a RobustModel, got {type(model).__name__}")
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
    model = create(spec["arch"], int(spec["num_classes"]), tuple(spec["input_shape"]), spec["mean"], spec["std"],
                   **spec.get("arch_kwargs", {}))
    load_weights(model, state, source=str(weights))
    return model.to(map_location).eval()


def load_weights(model: RobustModel, state: dict[str, torch.Tensor], source: str = "state dict") -> RobustModel:
    """Load ``state`` into ``model`` strictly, with a message naming ``source`` and the mismatch.

    Accepts full ``RobustModel`` state dicts (``normalize.*``, ``net.*``) or bare
    classifier state dicts (as released by papers); strips ``module.`` (DDP) prefixes.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("net.") for k in state):
        target: nn.Module = model.net
    else:
        target = model
        own_norm = {k: v for k, v in model.state_dict().items() if k.startswith("normalize.")}
        state = {**own_norm, **state}
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {_few(shapes)}")
        raise CheckpointError(f"{source} does not match model {model.arch!r}: " + "; ".join(parts))
    target.load_state_dict(state, strict=True)
    return model


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth``/``.safetensors`` state dict; ``torch.load(weights_only=True)`` only.

    Unwraps the common ``{"state_dict": ...}`` / ``{"model": ...}`` containers.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"state dict not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
            raise CheckpointError(f"{p}: corrupt safetensors file ({e})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors have many types
        raise CheckpointError(f"{p}: cannot read as a weights-only state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def from_pretrained_file(path: str | Path, arch: str, num_classes: int = 10,
                         input_shape: Sequence[int] = (3, 32, 32), mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, **arch_kwargs: Any) -> RobustModel:
    """Build ``arch`` and fill it from a plain state-dict file (weights-only load)."""
    model = create(arch, num_classes, input_shape, mean, std, **arch_kwargs)
    return load_weights(model, load_state_dict_file(path), source=str(path))
