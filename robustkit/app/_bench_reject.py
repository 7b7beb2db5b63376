"""The benchmark's selective-classification numbers: CPR (Chen et al., "Stratified Adversarial
Robustness with Rejection", ICML 2023; ``attacks/cpr.py``) on each model, through the one evaluation of
``robustkit reject`` (``robustkit.app.reject.evaluate_batch`` / ``stratified_accuracy``), so an entry's
numbers equal ``robustkit reject``'s on the same images, settings and seed.

Settings (``BenchmarkConfig.reject``): ``robustkit reject``'s (``preset``, ``eps_rej``, ``rej_steps``,
``rej_step_size``, ``alphas``, ``attack``, ``steps``, ``restarts``, ``targets``) plus ``n_images`` (the first
images, default ``min(n, 100)``); the threat model, seed and per-attack ``attack_params`` are the
benchmark's. Entry keys: ``rejection`` (the stratified metrics: ``robust_accuracy_with_rejection`` with
rejection always free, the robustness ``curve`` over alpha, ``curve_auc``, clean rejection rate, the
rejector's settings), ``rejection_robust_acc`` (the curve at alpha 0: rejecting an unperturbed point
costs, beyond it rejection is free -- the leaderboard column) and ``rejection_curve_auc``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.cpr import CPR
from robustkit.app.build import build_attack
from robustkit.app.reject import ALPHAS, evaluate_batch, stratified_accuracy
from robustkit.config import BenchmarkConfig
from robustkit.errors import ConfigError, InputError
from robustkit.modes import device_of


def reject_settings(cfg: BenchmarkConfig) -> dict[str, Any]:
    """The resolved, JSON-able CPR settings (``results.json``'s ``settings.reject``); builds the rejector
    and the outer attacks once so that bad settings fail before any work (``ConfigError``)."""
    r = cfg.reject
    try:
        cpr = _cpr(cfg)
        for a in r.attack:
            build_attack(a, cfg.attack_params.get(a), norm=cfg.norm, eps=cfg.eps_value, seed=cfg.seed)
    except InputError as e:
        raise ConfigError(f"reject: {e}") from None
    alphas = sorted({0.0, *(ALPHAS if r.alphas is None else r.alphas)})
    return {"rejector": cpr.params(), "alphas": alphas, "attack": list(r.attack), "steps": r.steps,
            "restarts": r.restarts, "targets": r.targets, "n_images": min(r.n_images or 100, cfg.n)}


def _cpr(cfg: BenchmarkConfig) -> CPR:
    r = cfg.reject
    return CPR(preset=r.preset, norm=cfg.norm, eps_rej=r.eps_rej, steps=r.rej_steps, step_size=r.rej_step_size)


def reject_entry(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: BenchmarkConfig, s: dict[str, Any],
                 seconds: dict[str, float]) -> dict[str, Any]:
    """CPR's stratified metrics of ``model`` on the first ``s["reject"]["n_images"]`` of ``x (N, C, H, W)``,
    ``y (N,)``; adds ``seconds["reject"]``."""
    rs, dev = s["reject"], device_of(model)
    m = rs["n_images"]
    cpr = _cpr(cfg)
    attacks = [build_attack(a, cfg.attack_params.get(a), norm=cfg.norm, eps=cfg.eps_value, seed=cfg.seed)
               for a in rs["attack"]]
    targets = model.num_classes - 1 if rs["targets"] is None else min(rs["targets"], model.num_classes - 1)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    t0, parts = time.perf_counter(), []
    for i in range(0, m, cfg.batch_size):
        xb, yb = x[i:min(i + cfg.batch_size, m)].to(dev), y[i:min(i + cfg.batch_size, m)].to(dev)
        parts.append(evaluate_batch(model, cpr, xb, yb, eps=cfg.eps_value, alphas=rs["alphas"], attacks=attacks,
                                    steps=rs["steps"], restarts=rs["restarts"], targets=targets, generator=gen))
    cat = lambda k: np.concatenate([p[k] for p in parts])  # noqa: E731
    metrics = stratified_accuracy(cat("outer_error"), {a: np.concatenate([p["inner_rejected"][a] for p in parts])
                                                        for a in rs["alphas"]})
    seconds["reject"] = round(time.perf_counter() - t0, 3)
    rec = {"n": m, "rejector": cpr.params(), "targets": targets, "clean_rejection_rate": float(cat("clean_rejected")
                                                                                               .mean()), **metrics}
    return {"rejection": rec, "rejection_robust_acc": metrics["curve"][0]["robust_accuracy"],
            "rejection_curve_auc": metrics["curve_auc"]}
