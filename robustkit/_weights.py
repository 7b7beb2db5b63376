"""Plain state dicts: reading them without unpickling (``load_state_dict_file``) and loading them
into a ``RobustModel`` with a clear key-mismatch report (``load_weights``, strict or not).
Re-exported by ``robustkit.zoo``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from robustkit.errors import CheckpointError

M = TypeVar("M", bound=nn.Module)  # a robustkit.zoo.RobustModel (not imported: zoo imports this module)


class CheckpointWarning(UserWarning):
    """A non-strict load skipped keys (the message names them)."""


def load_weights(model: M, state: dict[str, torch.Tensor], source: str = "state dict",
                 strict: bool = True) -> M:
    """Load ``state`` into ``model``, with a message naming ``source`` and the mismatch: missing,
    unexpected and shape-mismatched keys (counts, the first few named).

    Accepts full ``RobustModel`` state dicts (``normalize.*``, ``net.*``) or bare
    classifier state dicts (as released by papers); strips ``module.`` (DDP) prefixes.
    ``strict=False`` loads the keys that match by name and shape, keeps the model's own values
    for the rest (e.g. a new classification head) and warns what it skipped; a file with no
    matching key at all is still a ``CheckpointError``.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("net.") for k in state):
        target: nn.Module = model.net  # type: ignore[assignment]
    else:
        target = model
        own_norm = {k: v for k, v in model.state_dict().items() if k.startswith("normalize.")}
        state = {**own_norm, **state}
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        target.load_state_dict(state, strict=True)
        return model
    parts = [f"{len(v)} {what} {_few(v)}" for what, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                                         ("shape mismatches", shapes)) if v]
    report = f"{source} does not match model {model.arch!r}: " + "; ".join(parts)
    matched = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if strict or not matched:
        hint = "" if strict else " (no key matches by name and shape)"
        raise CheckpointError(report + (hint or "; --no-strict (strict=False) loads the keys that match"))
    target.load_state_dict(matched, strict=False)
    warnings.warn(f"{report}; loaded {len(matched)} of {len(own)} tensors, the rest keep the model's own values "
                  "(not strict)", CheckpointWarning, stacklevel=2)
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
