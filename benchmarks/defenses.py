"""Adversarial fine-tuning vs training from scratch on mnist5k, JSON out.

1. A small CNN (``ibp-small``) is pretrained with standard training.
2. Each method -- standard, PGD-AT, TRADES, TRADES+AWP, TRADES+RWP -- is trained from
   scratch for ``scratch_mult * E`` epochs (5E) (cosine LR) and fine-tuned from the pretrained
   model for ``E`` epochs (slow-start-fast-decay LR, Jeddi et al. 2020). Reported: clean and
   PGD-40 (L-inf eps 0.3, step 0.01) robust accuracy on held-out test images -- worst case per
   image of CE-PGD and margin-PGD (``pgd40_accuracy``; CE alone: ``pgd40_ce_accuracy``) -- and
   training wall-clock (evaluation excluded).
   Target: fine-tuned TRADES reaches >= 90 % of from-scratch TRADES's PGD-40 robust accuracy
   at <= 1/4 of its training cost.
3. Step overheads: one TRADES step with K inner steps vs (K + 2) forward+backward passes of
   plain training on the same batch; the extra cost of AWP and RWP on top of TRADES.

    python -m benchmarks.defenses [--quick] [--epochs E] [--threads 1] [--device auto] [--runs DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

import defenses  # noqa: F401  (registers every objective)
from attacks import PGD
from benchmarks._common import in_workdir, log, median_seconds, parser, setup, write_results
from defenses.base import StepContext
from robustkit.app.train import train
from robustkit.config import TrainConfig, from_dict
from robustkit.data import make_loader
from robustkit.evaluate import clean_accuracy, robust_accuracy
from robustkit.registry import DEFENSES
from robustkit.zoo import create, load

METHODS: dict[str, tuple[str, str | None]] = {  # label -> (defense, weight perturbation)
    "standard": ("standard", None), "pgd-at": ("pgd-at", None), "trades": ("trades", None),
    "trades+awp": ("trades", "awp"), "trades+rwp": ("trades", "rwp")}


def settings(quick: bool, epochs: int | None) -> dict[str, Any]:
    s = {"n_train": 1000, "n_eval": 200, "pretrain_epochs": 3, "epochs": 1, "scratch_mult": 5, "steps": 10,
         "rwp_iterations": 2, "lr": 0.05, "batch_size": 64} if quick else \
        {"n_train": 4000, "n_eval": 1000, "pretrain_epochs": 10, "epochs": 3, "scratch_mult": 5, "steps": 40,
         "rwp_iterations": 10, "lr": 0.05, "batch_size": 128}
    if epochs is not None:
        s["epochs"] = epochs
    s["step_size"] = round(0.01 * 40 / s["steps"], 4)  # TRADES' MNIST 40 x 0.01, rescaled to fewer steps
    return s


def config(s: dict[str, Any], defense: str, wp: str | None, epochs: int, schedule: str,
           pretrained: str | None) -> TrainConfig:
    params: dict[str, Any] = {}
    if defense != "standard":
        params = {"preset": "mnist", "steps": s["steps"], "step_size": s["step_size"]}
    wp_params: dict[str, Any] = {"warmup_epochs": 0}
    if wp == "rwp":
        wp_params["iterations"] = s["rwp_iterations"]
    return from_dict(TrainConfig, {
        "epochs": epochs, "seed": 0,
        "model": {"arch": "ibp-small", "pretrained": pretrained},
        "data": {"name": "mnist5k", "batch_size": s["batch_size"], "n_train": s["n_train"]},
        "optim": {"name": "sgd", "lr": s["lr"]}, "schedule": {"name": schedule},
        "defense": {"name": defense, "params": params, "weight_perturbation": wp,
                    "wp_params": wp_params if wp else {}},
        "eval": {"n": 100, "attack": None, "best_by": "clean_accuracy"}})


def run_one(cfg: TrainConfig, out: Path, loader, attack, device: torch.device) -> dict[str, Any]:
    run = train(cfg, out, device, progress=False)
    secs = sum(r.get("train_seconds", 0.0) for r in run.metrics())
    model = load(run.path / "checkpoints" / "last", map_location=device)
    return {"epochs": cfg.epochs, "train_seconds": secs,
            "clean_accuracy": clean_accuracy(model, loader)["clean_accuracy"],
            "pgd40_ce_accuracy": robust_accuracy(model, loader, attack[0])["robust_accuracy"],
            "pgd40_accuracy": robust_accuracy(model, loader, attack)["robust_accuracy"]}


def overheads(s: dict[str, Any], repeat: int, device: torch.device) -> dict[str, Any]:
    """Seconds per training step (median) of TRADES (K inner steps), AWP / RWP on top, and plain passes."""
    x, y = next(iter(make_loader("mnist5k", "train", batch_size=s["batch_size"], shuffle=False, device=device)))
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = StepContext(0, 1, 0, 1, opt)
    k = s["steps"]
    trades = DEFENSES.get("trades")(preset="mnist", steps=k, step_size=s["step_size"])

    def step(defense) -> None:
        defense.before_loss(model, x, y, ctx)
        loss, _ = defense.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        defense.after_step(model, ctx)

    def passes() -> None:  # (K + 2) forward+backward passes of plain training
        for _ in range(k + 2):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    awp = DEFENSES.get("awp")(trades, warmup_epochs=0)
    rwp = DEFENSES.get("rwp")(trades, warmup_epochs=0, iterations=s["rwp_iterations"], c_min=100.0)  # all samples
    t = {"trades": median_seconds(lambda: step(trades), device, repeat),
         "passes": median_seconds(passes, device, repeat),
         "awp": median_seconds(lambda: step(awp), device, repeat),
         "rwp": median_seconds(lambda: step(rwp), device, repeat)}
    return {"batch_size": s["batch_size"], "inner_steps": k, "seconds": t,
            "trades_vs_k_plus_2_passes": t["trades"] / t["passes"],
            "awp_extra_vs_trades": t["awp"] / t["trades"] - 1.0,
            "rwp_extra_vs_trades": t["rwp"] / t["trades"] - 1.0, "rwp_iterations": s["rwp_iterations"]}


def main(argv: list[str] | None = None) -> int:
    ap = parser("defenses", __doc__)
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs E (scratch: 5E)")
    ap.add_argument("--runs", default=None, help="keep the run directories here (default: a temp dir)")
    a = ap.parse_args(argv)
    device = setup(a)
    return in_workdir(a.runs, "rk-defenses-", lambda work: bench(a, device, work))


def bench(a: argparse.Namespace, device: torch.device, work: Path) -> int:
    s = settings(a.quick, a.epochs)
    t_start = time.perf_counter()
    test = make_loader("mnist5k", "test", batch_size=500, n=s["n_eval"], device=device)
    # PGD-40 with CE, then (on the points still standing) with the margin loss: a confident standard
    # model's CE gradient underflows to 0 in float32 and CE-PGD alone then overstates robustness.
    attack = [PGD(norm="linf", eps=0.3, steps=40, step_size=0.01, loss=loss) for loss in ("ce", "margin")]
    pre = run_one(config(s, "standard", None, s["pretrain_epochs"], "cosine", None), work / "pretrain", test, attack,
                  device)
    log("defenses", f"pretrained: {pre}")
    rows = []
    for label, (defense, wp) in METHODS.items():
        for mode in ("scratch", "finetune"):
            cfg = config(s, defense, wp, s["epochs"] * (s["scratch_mult"] if mode == "scratch" else 1),
                         "cosine" if mode == "scratch" else "slow-start-fast-decay",
                         None if mode == "scratch" else str(work / "pretrain"))
            r = {"method": label, "mode": mode, **run_one(cfg, work / f"{label}-{mode}", test, attack, device)}
            if mode == "finetune":
                r["train_seconds_incl_pretraining"] = r["train_seconds"] + pre["train_seconds"]
            rows.append(r)
            log("defenses", str(r))
    by = {(r["method"], r["mode"]): r for r in rows}
    sc, ft = by[("trades", "scratch")], by[("trades", "finetune")]
    target = {"robust_ratio": ft["pgd40_accuracy"] / max(sc["pgd40_accuracy"], 1e-12),
              "cost_ratio": ft["train_seconds"] / sc["train_seconds"],
              "cost_ratio_incl_pretraining": ft["train_seconds_incl_pretraining"] / sc["train_seconds"]}
    target["met"] = target["robust_ratio"] >= 0.9 and target["cost_ratio"] <= 0.25
    body = {"settings": s, "pretraining": pre, "rows": rows, "target_trades_finetune_vs_scratch": target,
            "step_overheads": overheads(s, 3 if a.quick else 10, device),
            "total_seconds": time.perf_counter() - t_start,
            "note": "wall-clock on a shared CPU; train_seconds excludes evaluation"}
    write_results(a.out, "defenses", body, device=device, args=a)
    log("defenses", f"wrote {a.out}: TRADES fine-tune/scratch robust {target['robust_ratio']:.2f}, "
        f"cost {target['cost_ratio']:.2f}; target met: {target['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
