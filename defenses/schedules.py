"""Learning-rate schedules as multipliers of the peak LR, by training progress.

Each schedule is ``f(t) -> multiplier`` with ``t`` in ``[0, 1]`` the fraction of
training done (measured in optimizer steps), so it is independent of the number of
epochs and of the batch size. ``lr_lambda`` turns one into a per-step function for
``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Schedule = Callable[[float], float]
SCHEDULES: dict[str, Callable[..., Schedule]] = {}


def _register(name: str) -> Callable[[Callable[..., Schedule]], Callable[..., Schedule]]:
    def deco(fn: Callable[..., Schedule]) -> Callable[..., Schedule]:
        SCHEDULES[name] = fn
        return fn

    return deco


def _warm(t: float, warmup: float) -> float:
    return min(1.0, t / warmup) if warmup > 0 else 1.0


@_register("constant")
def constant(warmup: float = 0.0, **_: Any) -> Schedule:
    return lambda t: _warm(t, warmup)


@_register("cosine")
def cosine(warmup: float = 0.0, **_: Any) -> Schedule:
    """Linear warm-up over the first ``warmup`` fraction, then half-cosine to 0 (Loshchilov & Hutter 2017)."""
    def f(t: float) -> float:
        if t < warmup:
            return _warm(t, warmup)
        u = (t - warmup) / max(1.0 - warmup, 1e-12)
        return 0.5 * (1.0 + math.cos(math.pi * min(u, 1.0)))

    return f


@_register("step")
def step(warmup: float = 0.0, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1, **_: Any) -> Schedule:
    """Multiply by ``gamma`` at each milestone (fractions of training), e.g. TRADES' epochs 75/90 of 100."""
    ms = sorted(float(m) for m in milestones)

    def f(t: float) -> float:
        return _warm(t, warmup) * gamma ** sum(t >= m for m in ms)

    return f


@_register("linear")
def linear(warmup: float = 0.0, **_: Any) -> Schedule:
    """Linear warm-up, then linear decay to 0."""
    def f(t: float) -> float:
        if t < warmup:
            return _warm(t, warmup)
        return max(0.0, 1.0 - (t - warmup) / max(1.0 - warmup, 1e-12))

    return f


def make_schedule(name: str, **knobs: Any) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {name!r}; allowed: {', '.join(sorted(SCHEDULES))}")
    try:
        return SCHEDULES[name](**knobs)
    except TypeError as e:
        raise ValueError(f"LR schedule {name!r}: {e}") from None


def lr_lambda(schedule: Schedule, total_steps: int) -> Callable[[int], float]:
    """Per-step multiplier for ``LambdaLR``: step ``s`` -> ``schedule(s / total_steps)``."""
    total = max(int(total_steps), 1)
    return lambda s: schedule(min(s / total, 1.0))
