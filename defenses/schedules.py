"""Learning-rate schedules as multipliers of the peak LR, by training progress.

Each schedule is ``f(t) -> multiplier`` with ``t`` in ``[0, 1]`` the fraction of
training done (measured in optimizer steps), so it is independent of the number of
epochs and of the batch size. ``lr_lambda`` turns one into a per-step function for
``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from robustkit.errors import InputError
from robustkit.validate import number, positive

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
def constant(warmup: float = 0.0) -> Schedule:
    return lambda t: _warm(t, warmup)


@_register("cosine")
def cosine(warmup: float = 0.0) -> Schedule:
    """Linear warm-up over the first ``warmup`` fraction, then half-cosine to 0 (Loshchilov & Hutter 2017)."""
    def f(t: float) -> float:
        if t < warmup:
            return _warm(t, warmup)
        u = (t - warmup) / max(1.0 - warmup, 1e-12)
        return 0.5 * (1.0 + math.cos(math.pi * min(u, 1.0)))

    return f


@_register("step")
def step(warmup: float = 0.0, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> Schedule:
    """Multiply by ``gamma`` at each milestone (fractions of training), e.g. TRADES' epochs 75/90 of 100."""
    ms = sorted(float(m) for m in milestones)

    def f(t: float) -> float:
        return _warm(t, warmup) * gamma ** sum(t >= m for m in ms)

    return f


@_register("linear")
def linear(warmup: float = 0.0) -> Schedule:
    """Linear warm-up, then linear decay to 0."""
    def f(t: float) -> float:
        if t < warmup:
            return _warm(t, warmup)
        return max(0.0, 1.0 - (t - warmup) / max(1.0 - warmup, 1e-12))

    return f


@_register("slow-start-fast-decay")
def slow_start_fast_decay(peak_at: float = 0.5, start: float = 0.0, final: float = 0.0, decay_power: float = 2.0,
                          warmup: float = 0.0) -> Schedule:
    """Slow start, fast decay (Jeddi, Shafiee, Wong 2020, "A Simple Fine-tuning Is All You Need:
    Towards Robust Deep Learning via Adversarial Fine-tuning", arXiv 2012.13628): the schedule of
    adversarial fine-tuning. The LR rises slowly from ~0 to its peak, then decays fast::

        t <  peak_at:  start + (1 - start) * t / peak_at                     (linear rise)
        t >= peak_at:  final + (1 - final) * (1 - u) ** decay_power,  u = (t - peak_at) / (1 - peak_at)

    From the paper: the shape (a slow rise from ~0 to the peak LR, then a fast decay) and its use
    for a short fine-tuning of a pretrained model. Our defaults, not the paper's numbers (only its
    abstract was available to us, so the exact breakpoints are unverified): the rise takes the first
    half of training (``peak_at=0.5``) from ``start=0``; the decay is quadratic (``decay_power=2``:
    the LR is down to 1/4 of the peak halfway through the decay and 1/16 at three quarters) to
    ``final=0``. ``decay_power=1`` gives a linear (triangular) decay; larger powers decay faster.
    ``schedule.warmup_epochs`` (passed as ``warmup``, a fraction of training), when > 0, sets
    ``peak_at``.
    """
    peak = float(warmup) if warmup and warmup > 0 else float(peak_at)
    number("peak_at", peak, 0.0, 1.0, strict_min=True, strict_max=True)
    start = number("start (a fraction of the peak LR)", start, 0.0, 1.0)
    final = number("final (a fraction of the peak LR)", final, 0.0, 1.0)
    decay_power = positive("decay_power", decay_power)

    def f(t: float) -> float:
        if t < peak:
            return start + (1.0 - start) * t / peak
        u = min((t - peak) / (1.0 - peak), 1.0)
        return final + (1.0 - final) * (1.0 - u) ** decay_power

    return f


@_register("cyclic")
def cyclic(peak_at: float = 0.5, warmup: float = 0.0) -> Schedule:
    """One cycle (Smith 2017, "Cyclical Learning Rates for Training Neural Networks"), as used by
    fast adversarial training (Wong, Rice, Kolter 2020, "Fast is better than free"): linear from 0
    up to the peak LR at ``peak_at`` (a fraction of training), then linear down to 0 at the end.

    ``peak_at=0.5`` follows the released ``train_fgsm.py`` (``CyclicLR`` with ``step_size_up =
    step_size_down`` = half the steps, lr 0 -> 0.2 -> 0); its DAWNBench script ``train_cifar.py``
    peaks at 2/5 of training (``np.interp(t, [0, 2/5 E, E], [0, lr_max, 0])``): ``peak_at=0.4``.
    ``schedule.warmup_epochs`` (passed as ``warmup``, a fraction of training), when > 0, sets ``peak_at``.
    """
    peak = float(warmup) if warmup and warmup > 0 else float(peak_at)
    number("peak_at", peak, 0.0, 1.0, strict_min=True, strict_max=True)

    def f(t: float) -> float:
        return t / peak if t < peak else max(0.0, (1.0 - t) / (1.0 - peak))

    return f


def make_schedule(name: str, **knobs: Any) -> Schedule:
    if name not in SCHEDULES:
        raise InputError(f"unknown LR schedule {name!r}; allowed: {', '.join(sorted(SCHEDULES))}")
    fn = SCHEDULES[name]
    try:  # the knobs must fit the schedule's signature (checked before the call: no TypeError swallowed)
        inspect.signature(fn).bind(**knobs)
    except TypeError as e:
        raise InputError(f"LR schedule {name!r}: {e}") from None
    if "warmup" in knobs:
        knobs["warmup"] = number("warmup (a fraction of training)", knobs["warmup"], 0.0, 1.0)
    if "gamma" in knobs:
        knobs["gamma"] = positive("gamma (the step schedule's factor)", knobs["gamma"])
    if "milestones" in knobs:
        if not isinstance(knobs["milestones"], (list, tuple)):
            raise InputError(f"milestones must be a list of fractions of training, got {knobs['milestones']!r}")
        knobs["milestones"] = [number("milestones[i] (a fraction of training)", m, 0.0, 1.0)
                               for m in knobs["milestones"]]
    return fn(**knobs)


def lr_lambda(schedule: Schedule, total_steps: int) -> Callable[[int], float]:
    """Per-step multiplier for ``LambdaLR``: step ``s`` -> ``schedule(s / total_steps)``."""
    total = max(int(total_steps), 1)
    return lambda s: schedule(min(s / total, 1.0))
