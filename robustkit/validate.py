"""One way to check user-facing values: each helper returns the value or raises ``InputError``
with the name, the value and what is allowed. Library code validates with these, not with
ad-hoc ``raise ValueError`` lines."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

import torch

from robustkit.errors import InputError

T = TypeVar("T")


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (``int`` or a NumPy integer; not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
           strict_min: bool = False, strict_max: bool = False) -> float:
    """A finite real number within the bounds (``strict_*``: the bound itself is excluded); Python and
    NumPy numbers and one-element tensors are accepted, bools and strings are not."""
    scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or scalar_tensor):
        raise InputError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{name} must be finite, got {v}")
    if minimum is not None and (v <= minimum if strict_min else v < minimum):
        raise InputError(f"{name} must be {'>' if strict_min else '>='} {minimum:g}, got {v:g}")
    if maximum is not None and (v >= maximum if strict_max else v > maximum):
        raise InputError(f"{name} must be {'<' if strict_max else '<='} {maximum:g}, got {v:g}")
    return v


def positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    return number(name, value, 0.0, strict_min=True)


def probability(name: str, value: Any) -> float:
    """A number strictly between 0 and 1 (a failure probability, a level)."""
    return number(name, value, 0.0, 1.0, strict_min=True, strict_max=True)


def one_of(name: str, value: T, allowed: Iterable[T]) -> T:
    """``value`` if it is one of ``allowed``; strings compare case-insensitively."""
    allowed = list(allowed)
    key = value.lower() if isinstance(value, str) else value
    for a in allowed:
        if (a.lower() if isinstance(a, str) else a) == key:
            return a
    raise InputError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def require(condition: bool, message: str) -> None:
    """Raise ``InputError(message)`` unless ``condition``."""
    if not condition:
        raise InputError(message)
