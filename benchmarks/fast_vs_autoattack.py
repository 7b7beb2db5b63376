"""Our ``fast`` ensemble vs the real AutoAttack (standard version), same models, points and process.

Models (mnist5k, trained here once through the Trainer and cached under ``benchmarks/results/cache/``):

- ``standard``: LeNet (Madry et al. 2018), Adam, a couple of epochs of plain training;
- ``pgd-at``: ibp-small adversarially trained with 5-step PGD (Madry et al. 2018) at L-inf
  eps 0.3 (linear eps ramp over the first 40% of the steps), a few epochs.

For each model: AutoAttack standard (APGD-CE, APGD-T x9, FAB-T x9, Square 5000; via
``attacks.autoattack``) and ``fast`` (APGD-CE + APGD-T over the top-3 targets) on the first
``--n`` test points (a fixed seeded shuffle), robust accuracy and wall-clock seconds; the gap in
percentage points (fast - AutoAttack; > 0 means fast overestimates robustness), the time ratio
(fast / AutoAttack) and the points only one of them broke. Targets: gap <= 1 point, ratio <= 1/5.
``--quick`` is a smoke run: 32 points, a shorter adversarial training, and both sides with smaller
budgets (fast: 25 iterations; AutoAttack: the same sequence with ``AA_QUICK``), so its gap and
ratio are not the benchmark's numbers.

    python -m benchmarks.fast_vs_autoattack --quick
    python -m benchmarks.fast_vs_autoattack --n 200 --threads 1
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from attacks.autoattack import run_autoattack
from attacks.fast import FastEnsemble
from benchmarks._common import Recipe, cached_model, log, parser, setup, timed, write_results
from defenses.base import StepContext
from defenses.pgd_at import PGDAT
from robustkit.data import load_data
from robustkit.threat import ThreatModel
from robustkit.zoo import RobustModel

# --quick: the standard AutoAttack sequence with smaller budgets (full: the paper's, on 200 points)
AA_QUICK = {"apgd.n_iter": 25, "apgd_targeted.n_iter": 25, "apgd_targeted.n_target_classes": 3, "fab.n_iter": 25,
            "fab.n_target_classes": 3, "square.n_queries": 500}
RECIPES = {  # kind -> its training recipe for a number of epochs
    "standard": lambda epochs: Recipe("standard-lenet-mnist5k", "lenet", epochs=epochs, lr=1e-3, batch_size=50),
    "pgd-at": lambda epochs: Recipe("pgd-at-ibp-small-mnist5k", "ibp-small", epochs=epochs, lr=1e-3, batch_size=50,
                                    defense="pgd-at, PGD-5, L-inf eps 0 -> 0.3 over the first 40% of the steps"),
}


class _RampedPGDAT(PGDAT):
    """PGD-5 adversarial training (Madry et al. 2018) whose eps rises linearly from 0 to 0.3 over the first
    40% of training (a short MNIST run at the full radius from the start collapses to a constant)."""

    def __init__(self) -> None:
        super().__init__(preset=None, eps=0.3, steps=5, step_size=2.5 * 0.3 / 5)

    def before_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        eps = 0.3 * min(1.0, (ctx.step + 1) / (0.4 * ctx.epochs * ctx.steps_per_epoch))
        self.tm, self.step_size = ThreatModel("linf", eps), 2.5 * eps / self.steps


def get_model(kind: str, epochs: int, device: torch.device, retrain: bool) -> tuple[RobustModel, dict[str, Any]]:
    """``standard``: LeNet, plain Adam training; ``pgd-at``: ibp-small, PGD-5 adversarial training; cached."""
    return cached_model(RECIPES[kind](epochs), device, defense=_RampedPGDAT if kind == "pgd-at" else None,
                        retrain=retrain)


def compare(model: RobustModel, x: torch.Tensor, y: torch.Tensor, eps: float, log_dir: Path,
            n_targets: int, n_iter: int = 100, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    aa = run_autoattack(model, x, y, eps=eps, norm="linf", version="standard", out_dir=log_dir, overrides=overrides)
    fast_s, fast = timed(lambda: FastEnsemble(norm="linf", eps=eps, n_iter=n_iter, n_targets=n_targets)(model, x, y),
                         x.device)
    fast_robust = float((~fast.success).sum()) / x.shape[0]
    fast_counts = {s: fast.info["broken_by"].count(s) for s in ["clean", *FastEnsemble().stages()]}
    aa_broken = ~aa.robust
    gap = round(100.0 * (fast_robust - aa.robust_accuracy), 6) + 0.0           # no "-0.0"
    ratio = fast_s / max(aa.seconds, 1e-9)
    return {
        "clean_accuracy": clean,
        "autoattack": {"robust_accuracy": aa.robust_accuracy, "seconds": aa.seconds, "package": aa.package,
                       "package_version": aa.package_version, "robust_after": aa.robust_after,
                       "attack_seconds": aa.attack_seconds, "broken_by_counts": aa.summary()["broken_by_counts"],
                       "log": aa.log_path},
        "fast": {"robust_accuracy": fast_robust, "seconds": fast_s, "n_iter": n_iter, "n_targets": n_targets,
                 "robust_after": fast.info["robust_after"], "broken_by_counts": fast_counts,
                 "forward_passes": fast.info["forward_passes"], "backward_passes": fast.info["backward_passes"]},
        "gap_pp": gap, "time_ratio": ratio,
        "broken_only_by_autoattack": int((aa_broken & ~fast.success.to(aa_broken.device)).sum()),
        "broken_only_by_fast": int((fast.success.to(aa_broken.device) & ~aa_broken).sum()),
        "within_1pp": gap <= 1.0, "at_most_one_fifth_time": ratio <= 0.2,
    }


def main(argv: list[str] | None = None) -> int:
    p = parser("fast_vs_autoattack", __doc__)
    p.add_argument("--n", type=int, default=None, help="test points (default 200; --quick: 32)")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--n-targets", type=int, default=3, help="APGD-T targets of the fast ensemble (default 3)")
    p.add_argument("--models", default="standard,pgd-at")
    p.add_argument("--retrain", action="store_true", help="ignore the cached models")
    args = p.parse_args(argv)
    device = setup(args)
    n = args.n or (32 if args.quick else 200)
    epochs = {"standard": 2, "pgd-at": 2 if args.quick else 8}
    n_iter, overrides = (25, AA_QUICK) if args.quick else (100, None)
    kinds = [m.strip() for m in args.models.split(",") if m.strip()]
    for kind in kinds:
        if kind not in epochs:
            p.error(f"unknown model {kind!r}; allowed: {', '.join(epochs)}")
    data = load_data("mnist5k", "test")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
    x, y = data.tensors()
    x, y = x[idx].to(device), y[idx].to(device)                        # (n, 1, 28, 28), (n,)
    out = Path(args.out)
    body: dict[str, Any] = {
        "config": {"n": n, "eps": args.eps, "norm": "linf", "data": "mnist5k/test (seeded shuffle 0)",
                   "fast": {"n_iter": n_iter, "n_targets": args.n_targets}, "autoattack": "standard",
                   "autoattack_overrides": overrides or {}},
        "models": {},
    }
    for kind in kinds:
        model, meta = get_model(kind, epochs[kind], device, args.retrain)
        row = {"model": meta, **compare(model, x, y, args.eps, out.parent / f"fast_vs_autoattack_logs/{kind}",
                                        args.n_targets, n_iter, overrides)}
        body["models"][kind] = row
        aa, fa = row["autoattack"], row["fast"]
        log("fast_vs_autoattack", f"{kind}: clean {row['clean_accuracy']:.3f}  AutoAttack {aa['robust_accuracy']:.3f}"
            f" ({aa['seconds']:.1f} s)  fast {fa['robust_accuracy']:.3f} ({fa['seconds']:.1f} s)"
            f"  gap {row['gap_pp']:+.1f} pp  ratio {row['time_ratio']:.3f}")
    rows = list(body["models"].values())
    body["summary"] = {"max_gap_pp": max((r["gap_pp"] for r in rows), default=0.0),
                       "max_time_ratio": max((r["time_ratio"] for r in rows), default=0.0),
                       "all_within_1pp": all(r["within_1pp"] for r in rows),
                       "all_at_most_one_fifth_time": all(r["at_most_one_fifth_time"] for r in rows)}
    write_results(out, "fast_vs_autoattack", body, device=device, args=args, packages=("pyautoattack",))
    log("fast_vs_autoattack", f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
