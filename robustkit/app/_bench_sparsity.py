"""The benchmark's adversarial sparsity (``sparsity: true``; ``attacks.sparsity``, Olivier & Raj,
ICML 2023) per model, on the first ``sparsity.n_images`` benchmark images (default min(n, 100)).

A point is *vulnerable* when the benchmark's own attacks broke it at ``eps`` (the engine's verified
worst case, stronger than the paper's single PGD); its sparsity is the mean, over ``directions``
random directions, of the smallest direction constraint (L2: cone angle / (pi/2); L-inf: free
coordinates / d) under which a direction-constrained PGD still breaks it. The entry's
``adversarial_sparsity`` holds ``mean`` / ``median`` over vulnerable points (higher: adversarial
examples are sparser, the model more robust beyond its accuracy), ``mean_all`` (non-vulnerable
correct points count as 1), counts, settings, ``per_point`` (None: misclassified) and seconds.
Under ``torchrun`` the images are shared out over the processes (per-image results do not depend on
it: directions are seeded by image index) and gathered on every rank.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from robustkit.config import BenchmarkConfig


def sparsity_settings(cfg: BenchmarkConfig) -> dict[str, Any] | None:
    """The resolved sparsity settings (``results.json``'s ``settings.sparsity``; ``None``: off)."""
    sp = cfg.sparsity
    if not sp.enabled:
        return None
    return {"n_images": sp.n_images or min(cfg.n, 100), "directions": sp.directions, "search_steps": sp.search_steps,
            "steps": sp.steps, "step_size": sp.step_size}


def check_sparsity(cfg: BenchmarkConfig) -> None:
    """Build the evaluation once so that bad settings fail before any work (``InputError``)."""
    if cfg.sparsity.enabled:
        _make(cfg)


def _make(cfg: BenchmarkConfig) -> Any:
    from attacks.sparsity import AdversarialSparsity

    sp = cfg.sparsity
    return AdversarialSparsity(norm=cfg.norm, eps=cfg.eps_value, directions=sp.directions,
                               search_steps=sp.search_steps, steps=sp.steps, step_size=sp.step_size,
                               batch_size=max(cfg.batch_size, sp.directions), seed=cfg.seed)


def sparsity_entry(model: nn.Module, x: torch.Tensor, y: torch.Tensor, broken: torch.Tensor, cfg: BenchmarkConfig,
                   seconds: dict[str, float]) -> dict[str, Any]:
    """Sparsity of ``model`` on the first ``n_images`` of ``x (N, C, H, W)``, ``y (N,)``; ``broken (N,)``
    is the benchmark's verified worst case at eps. Adds ``seconds["adversarial_sparsity"]``."""
    from attacks.sparsity import SparsityResult
    from robustkit.app.shard import all_gather, world

    s = sparsity_settings(cfg)
    if s is None:
        raise ValueError("sparsity_entry called with sparsity off")
    k = min(int(s["n_images"]), x.shape[0])
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    w = world()
    mine = torch.arange(k)[w.rank::w.size]            # under torchrun: images shared out, results per image
    part = _make(cfg)(model, x[mine].to(dev), y[mine].to(dev), vulnerable=broken[mine].to(dev), index=mine)
    fields = ("sparsity", "correct", "vulnerable", "critical")
    full = {f: torch.zeros((k, *getattr(part, f).shape[1:]), dtype=getattr(part, f).dtype) for f in fields}
    for idx, got in all_gather((mine, {f: getattr(part, f) for f in fields})):
        for f in fields:
            full[f][idx] = got[f]
    res = SparsityResult(**full, settings=part.settings)
    seconds["adversarial_sparsity"] = time.perf_counter() - t0
    out = res.summary()
    out["per_point"] = [None if math.isnan(v) else round(v, 6) for v in res.sparsity.tolist()]
    return out
