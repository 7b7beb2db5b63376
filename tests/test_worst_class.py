"""Worst-class robust accuracy (issue 13 item 4): the engine's summary, the training metrics and the
benchmark entry."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from robustkit._evaluation import AttackStats, Evaluation, per_class
from robustkit.app import _bench_report as rep
from robustkit.config import BenchmarkConfig

# 8 points, classes 0, 2, 5 (class 1 absent): clean-correct and broken by hand
Y = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5])
CLEAN = torch.tensor([True, True, False, True, True, True, True, False])
BROKEN = torch.tensor([False, True, False, True, False, False, True, False])


def _evaluation() -> Evaluation:
    n = Y.numel()
    broken_by = torch.where(BROKEN, 0, -1).long()
    return Evaluation(mode="chained", attacks=["pgd"], clean_correct=CLEAN, attacked=CLEAN[None].clone(),
                      broken=BROKEN[None].clone(), unverified=torch.zeros(1, n, dtype=torch.bool),
                      broken_by=broken_by, l2=torch.zeros(n), linf=torch.zeros(n),
                      queries=torch.zeros(n, dtype=torch.long), queries_to_success=torch.full((n,), -1),
                      y=Y, pred_clean=Y, sub_attacks=[[None] * n], stats=[AttackStats("pgd")], seconds=0.0,
                      clean_seconds=0.0, clean_forward=0, verify_forward=0)


def test_summary_per_class_and_worst_class() -> None:
    s = _evaluation().summary()
    assert s["per_class"] == [
        {"class": 0, "n": 3, "clean_accuracy": 2 / 3, "robust_accuracy": 1 / 3},
        {"class": 2, "n": 2, "clean_accuracy": 1.0, "robust_accuracy": 1 / 2},
        {"class": 5, "n": 3, "clean_accuracy": 2 / 3, "robust_accuracy": 1 / 3},
    ]
    # classes 0 and 5 tie at 1/3: the lowest class id wins; the absent class 1 does not count as 0
    assert s["worst_class"] == 0 and s["worst_class_robust_accuracy"] == 1 / 3
    assert s["worst_class_robust_accuracy"] <= s["robust_accuracy"] == 3 / 8
    # the per-class counts add up to the overall ones
    assert sum(r["n"] * r["robust_accuracy"] for r in s["per_class"]) == int(s["robust"].sum())


def test_per_class_edge_cases() -> None:
    empty = torch.zeros(0, dtype=torch.bool)
    assert per_class(torch.zeros(0, dtype=torch.long), empty, empty) == {
        "per_class": [], "worst_class_robust_accuracy": 0.0, "worst_class": None}
    one = per_class(torch.tensor([3, 3]), torch.tensor([True, True]), torch.tensor([True, False]))
    assert one["worst_class"] == 3 and one["worst_class_robust_accuracy"] == 0.5


def test_benchmark_entry_worst_class_column() -> None:
    torch.manual_seed(0)
    cfg = BenchmarkConfig()
    broken = {"pgd": BROKEN, "other": torch.tensor([False, False, False, False, True, False, False, False])}
    subs = {a: [None] * Y.numel() for a in broken}
    e = rep.make_entry("m", nn.Linear(2, 2), None, cfg, CLEAN, broken, subs, {a: {} for a in broken}, {}, {},
                       None, {"clean": 0.0}, labels=Y)
    # worst case over both attacks: class 2 loses its last robust point to "other"
    assert e["robust_acc"] == 2 / 8 and e["worst_class"] == 2 and e["worst_class_robust_acc"] == 0.0
    assert e["worst_class_robust_acc"] <= e["robust_acc"]
    assert [r["class"] for r in e["per_class"]] == [0, 2, 5]
    s = {"dataset": cfg.dataset, "norm": cfg.norm, "eps": cfg.eps_value, "n": 8, "attacks": ["pgd", "other"],
         "certify": []}
    md = rep.markdown({"settings": s, "models": [e]}, [])
    header = next(line for line in md.splitlines() if line.startswith("|"))
    assert "worst class" in header
    assert json.dumps(e)          # the entry stays JSON-able (results.json)


def test_training_metrics_have_worst_class(tmp_path: Path) -> None:
    from robustkit.cli import main

    rc = main(["train", "--arch", "ibp-small", "--dataset", "mnist5k", "--epochs", "1", "--batch-size", "50",
               "--set", "data.n_train=200", "--eval-n", "40", "--set", "eval.steps=2", "--device", "cpu",
               "--seed", "0", "--out", str(tmp_path / "r")])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    r = recs[-1]
    assert 0.0 <= r["worst_class_robust_accuracy"] <= r["robust_accuracy"]
    assert 0.0 <= r["worst_class_clean_accuracy"] <= r["clean_accuracy"] + 1e-6   # clean_accuracy is float32
    assert "worst_class_robust_accuracy" in (tmp_path / "r" / "report.md").read_text()
