"""Resume state of ``attacks.autoattack.run_autoattack``: after each attack, a JSON record (which
attacks are done, who broke each point) and a safetensors file with the adversarial points found
so far, keyed by a fingerprint of the inputs and settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from robustkit.errors import InputError
from robustkit.io import atomic_write, atomic_write_json

STATE_FORMAT = "robustkit-autoattack-state/1"


def fingerprint(x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any]) -> str:
    """SHA-256 of the settings ``cfg`` and the bytes of ``x (N, C, H, W)`` and ``y (N,)``."""
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_state(path: Path, fp: str, done: list[str], broken_by: list[str | None], robust_after: dict[str, float],
               attack_seconds: dict[str, float], x_adv: torch.Tensor, robust: torch.Tensor) -> None:
    """Write both files atomically; only the broken points' ``x_adv`` are stored."""
    from safetensors.torch import save_file

    idx = (~robust).nonzero().squeeze(1).cpu()
    tensors = {"index": idx.contiguous(), "x_adv": x_adv[idx.to(x_adv.device)].detach().cpu().contiguous()}
    atomic_write(path.with_suffix(".safetensors"), lambda tmp: save_file(tensors, tmp))
    atomic_write_json(path, {"format": STATE_FORMAT, "fingerprint": fp, "done": done, "broken_by": broken_by,
                             "robust_after": robust_after, "attack_seconds": attack_seconds})


def load_state(path: Path, fp: str) -> dict[str, Any] | None:
    """The saved state (``tensors``: ``index``, ``x_adv``) or ``None`` if there is none; an
    ``InputError`` if it is unreadable or was written for other inputs or settings."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        state = json.loads(path.read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: unreadable AutoAttack state ({e}); delete it to start over") from None
    if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fp:
        raise InputError(f"{path}: state was written for other inputs or settings "
                         "(different x, y, norm, eps, version, attacks, seed or package); delete it or pick another")
    state["tensors"] = tensors
    return state
