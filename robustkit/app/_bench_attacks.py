"""The benchmark's attacks on the evaluation engine: every attack *independently* on every
clean-correct point, each claimed success verified against the benchmark's threat model
(``robustkit.evaluate``), plus the PGD robustness curve (see ``robustkit.app.benchmark``).

Both run in fixed batches of ``batch_size`` images shared out over the torchrun ranks
(``robustkit.app.sharded_eval``); each batch is saved under ``out/parts/<model>/`` when done and
reused by a rerun with the same settings and weights (a run that died resumes there)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit._evaluation import Evaluation
from robustkit.app.build import build_attack
from robustkit.app.sharded_eval import evaluate_sharded
from robustkit.config import BenchmarkConfig
from robustkit.threat import ThreatModel

# attack defaults over the attack's own (user ``attack_params`` override them)
ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {"pgd": {"steps": 100, "loss": "dlr", "restarts": 2}}
META_KEYS = ("package", "package_version", "version", "attacks")   # AutoAttack's provenance


def bench_attack(name: str, cfg: BenchmarkConfig, eps: float, log_dir: Path | None) -> Any:
    """Attack ``name`` on the benchmark's threat model at ``eps``, with its defaults and overrides."""
    params = {**ATTACK_DEFAULTS.get(name, {}), **cfg.attack_params.get(name, {})}
    return build_attack(name, params, norm=cfg.norm, eps=eps, seed=cfg.seed, batch_size=cfg.batch_size,
                        log_dir=log_dir)


def run_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: BenchmarkConfig, names: list[str],
                eps: float, log_dir: Path | None, progress: bool, desc: str, store_dir: Path | None = None
                ) -> tuple[Evaluation, dict[str, dict[str, Any]]]:
    """``names`` on ``x (N, C, H, W)``, ``y (N,)`` in independent mode; the evaluation and, per
    attack, its ``params``, ``unverified`` claims and AutoAttack's package / version / attacks.
    ``store_dir``: per-batch progress files (resumed when made with the same settings)."""
    atks = [bench_attack(a, cfg, eps, log_dir) for a in names]
    ev = evaluate_sharded(model, x, y, atks, batch_size=cfg.batch_size, mode="independent",
                          threat=ThreatModel(cfg.norm, eps), store_dir=store_dir, resume="auto", seed=cfg.seed,
                          progress=progress, desc=desc)
    meta: dict[str, dict[str, Any]] = {}
    for a, atk, st in zip(names, atks, ev.stats):
        meta[a] = {"params": st.params, "unverified": st.unverified,
                   **{k: st.meta[k] for k in META_KEYS if k in st.meta}}
        if a == "autoattack" and "package" not in meta[a]:     # no clean-correct point was attacked
            from attacks.autoattack import find_package

            _, meta[a]["package"], meta[a]["package_version"] = find_package(getattr(atk, "package", "auto"))
            meta[a].update(version=getattr(atk, "version", None), attacks=getattr(atk, "attacks", None))
    return ev, meta


def eps_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor, cfg: BenchmarkConfig,
              pgd_at_eps: torch.Tensor | None, progress: bool, name: str, seconds: dict[str, float],
              parts: Path | None = None) -> dict[str, list[float]] | None:
    """Robust accuracy under our PGD at each ``eps_grid`` value (eps 0: clean accuracy); progress
    files under ``parts/pgd-eps-<i>``."""
    grid = cfg.eps_grid_values
    if not grid:
        return None
    t0 = time.perf_counter()
    accs = []
    for i, e in enumerate(grid):
        if e == 0:
            broken = torch.zeros_like(correct)
        elif e == cfg.eps_value and pgd_at_eps is not None:
            broken = pgd_at_eps
        else:
            broken = run_attacks(model, x, y, cfg, ["pgd"], e, None, progress, f"{name}: pgd eps={e:g}",
                                 None if parts is None else parts / f"pgd-eps-{i}")[0].broken[0]
        accs.append(int((correct & ~broken).sum()) / correct.numel() if correct.numel() else 0.0)
    seconds["pgd_eps_curve"] = time.perf_counter() - t0
    return {"eps": grid, "robust_acc": accs}
