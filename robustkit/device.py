"""Device selection: ``auto`` picks CUDA when present. Library code follows ``x.device``."""

from __future__ import annotations

import re

import torch

from robustkit.errors import InputError


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    ``InputError`` for any other name, for CUDA on a machine without it and for a GPU
    index that does not exist."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cpu", "mps"):
        return torch.device(name)
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise InputError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
