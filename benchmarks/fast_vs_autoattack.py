"""Our ``fast`` ensemble vs the real AutoAttack (standard version), same models, points and process.

Models (mnist5k, trained here once and cached under ``benchmarks/results/`` with ``robustkit.zoo.save``):

- ``standard``: LeNet (Madry et al. 2018), Adam, a couple of epochs of plain training;
- ``pgd-at``: ibp-small adversarially trained with 5-step PGD (Madry et al. 2018) at L-inf
  eps 0.3 (linear eps ramp over the first 40% of the steps), a few epochs.

For each model: AutoAttack standard (APGD-CE, APGD-T x9, FAB-T x9, Square 5000; via
``attacks.autoattack``) and ``fast`` (APGD-CE + APGD-T over the top-3 targets) on the first
``--n`` test points (a fixed seeded shuffle), robust accuracy and wall-clock seconds; the gap in
percentage points (fast - AutoAttack; > 0 means fast overestimates robustness), the time ratio
(fast / AutoAttack) and the points only one of them broke. Targets: gap <= 1 point, ratio <= 1/5.

    python benchmarks/fast_vs_autoattack.py --quick          # n=50, shorter adversarial training
    python benchmarks/fast_vs_autoattack.py --n 200 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# run as a script, benchmarks/ is sys.path[0] and its attacks.py would shadow the attacks package
_HERE, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [q for q in sys.path if Path(q or ".").resolve() not in (_HERE, _ROOT)]

import torch  # noqa: E402

from attacks.autoattack import run_autoattack  # noqa: E402
from attacks.fast import FastEnsemble  # noqa: E402
from defenses.base import StepContext  # noqa: E402
from defenses.pgd_at import PGDAT  # noqa: E402
from defenses.standard import Standard  # noqa: E402
from defenses.trainer import fit  # noqa: E402
from robustkit.data import load_data, make_loader  # noqa: E402
from robustkit.device import resolve_device  # noqa: E402
from robustkit.io import atomic_write_json  # noqa: E402
from robustkit.threat import ThreatModel  # noqa: E402
from robustkit.zoo import RobustModel, create, load, save  # noqa: E402

RESULTS = _HERE / "results"


class _RampedPGDAT(PGDAT):
    """PGD-5 adversarial training (Madry et al. 2018) whose eps rises linearly from 0 to 0.3 over the first
    40% of training (a short MNIST run at the full radius from the start collapses to a constant)."""

    def __init__(self) -> None:
        super().__init__(preset=None, eps=0.3, steps=5, step_size=2.5 * 0.3 / 5)

    def before_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        eps = 0.3 * min(1.0, (ctx.step + 1) / (0.4 * ctx.epochs * ctx.steps_per_epoch))
        self.tm, self.step_size = ThreatModel("linf", eps), 2.5 * eps / self.steps


def train_model(kind: str, epochs: int, device: torch.device, seed: int = 0) -> RobustModel:
    """``standard``: LeNet, plain Adam training; ``pgd-at``: ibp-small, PGD-5 adversarial training."""
    torch.manual_seed(seed)
    arch = "lenet" if kind == "standard" else "ibp-small"
    model = create(arch, num_classes=10, input_shape=(1, 28, 28)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader("mnist5k", "train", batch_size=50, seed=seed, device=device)
    defense = Standard() if kind == "standard" else _RampedPGDAT()
    return fit(model, defense, loader, epochs=epochs, optimizer=opt)


def get_model(kind: str, epochs: int, device: torch.device, retrain: bool) -> tuple[RobustModel, dict[str, Any]]:
    """Cached under ``benchmarks/results/fast_vs_autoattack_models/<kind>-e<epochs>``."""
    cache = RESULTS / "fast_vs_autoattack_models" / f"{kind}-e{epochs}"
    meta_file = cache / "bench_meta.json"
    if meta_file.is_file() and not retrain:
        return load(cache, map_location=device), json.loads(meta_file.read_text())
    t0 = time.perf_counter()
    model = train_model(kind, epochs, device)
    meta = {"kind": kind, "arch": model.arch, "epochs": epochs, "train_seconds": time.perf_counter() - t0,
            "recipe": "adam 1e-3, batch 50, mnist5k/train" + (", PGD-5 eps 0.3 (ramp 40%)" if kind == "pgd-at" else "")}
    save(model, cache)
    atomic_write_json(meta_file, meta)
    return model, meta


def compare(model: RobustModel, x: torch.Tensor, y: torch.Tensor, eps: float, log_dir: Path,
            n_targets: int) -> dict[str, Any]:
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    aa = run_autoattack(model, x, y, eps=eps, norm="linf", version="standard", out_dir=log_dir)
    t0 = time.perf_counter()
    fast = FastEnsemble(norm="linf", eps=eps, n_targets=n_targets)(model, x, y)
    fast_s = time.perf_counter() - t0
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
        "fast": {"robust_accuracy": fast_robust, "seconds": fast_s, "n_targets": n_targets,
                 "robust_after": fast.info["robust_after"], "broken_by_counts": fast_counts,
                 "forward_passes": fast.info["forward_passes"], "backward_passes": fast.info["backward_passes"]},
        "gap_pp": gap, "time_ratio": ratio,
        "broken_only_by_autoattack": int((aa_broken & ~fast.success.to(aa_broken.device)).sum()),
        "broken_only_by_fast": int((fast.success.to(aa_broken.device) & ~aa_broken).sum()),
        "within_1pp": gap <= 1.0, "at_most_one_fifth_time": ratio <= 0.2,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="test points (default 200; --quick: 50)")
    p.add_argument("--quick", action="store_true", help="n=50 and a shorter adversarial training")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--n-targets", type=int, default=3, help="APGD-T targets of the fast ensemble (default 3)")
    p.add_argument("--models", default="standard,pgd-at")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--retrain", action="store_true", help="ignore the cached models")
    p.add_argument("--out", default=str(RESULTS / "fast_vs_autoattack.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 50 if args.quick and args.n == 200 else args.n
    device = resolve_device(args.device)
    epochs = {"standard": 2, "pgd-at": 4 if args.quick else 8}
    data = load_data("mnist5k", "test")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
    x, y = data.tensors()
    x, y = x[idx].to(device), y[idx].to(device)                        # (n, 1, 28, 28), (n,)
    out = Path(args.out)
    report: dict[str, Any] = {
        "benchmark": "fast_vs_autoattack", "quick": args.quick,
        "config": {"n": n, "eps": args.eps, "norm": "linf", "data": "mnist5k/test (seeded shuffle 0)",
                   "fast": {"n_iter": 100, "n_targets": args.n_targets}, "autoattack": "standard"},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "models": {},
    }
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        if kind not in epochs:
            p.error(f"unknown model {kind!r}; allowed: {', '.join(epochs)}")
        model, meta = get_model(kind, epochs[kind], device, args.retrain)
        row = {"model": meta, **compare(model, x, y, args.eps, out.parent / f"fast_vs_autoattack_logs/{kind}",
                                        args.n_targets)}
        report["models"][kind] = row
        aa, fa = row["autoattack"], row["fast"]
        sys.stderr.write(f"{kind}: clean {row['clean_accuracy']:.3f}  AutoAttack {aa['robust_accuracy']:.3f}"
                         f" ({aa['seconds']:.1f} s)  fast {fa['robust_accuracy']:.3f} ({fa['seconds']:.1f} s)"
                         f"  gap {row['gap_pp']:+.1f} pp  ratio {row['time_ratio']:.3f}\n")
    rows = list(report["models"].values())
    report["summary"] = {"max_gap_pp": max((r["gap_pp"] for r in rows), default=0.0),
                         "max_time_ratio": max((r["time_ratio"] for r in rows), default=0.0),
                         "all_within_1pp": all(r["within_1pp"] for r in rows),
                         "all_at_most_one_fifth_time": all(r["at_most_one_fifth_time"] for r in rows)}
    atomic_write_json(out, report)
    sys.stderr.write(f"wrote {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
