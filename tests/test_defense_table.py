"""benchmarks.defense_table: the one table of every defense (same start, same budget, same AutoAttack)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import defense_table as dt  # noqa: E402
from robustkit.errors import InputError  # noqa: E402
from robustkit.registry import DEFENSES  # noqa: E402


def test_every_method_is_a_registered_objective_and_awp_rows_wrap_their_base() -> None:
    for label, (defense, wp) in dt.METHODS.items():
        assert defense in DEFENSES.names()
        assert (wp is not None) == label.endswith("+awp")
        assert label.partition("+")[0] == defense


def test_the_budget_is_the_same_for_every_method() -> None:
    s = dt.settings("fashion", False, None, None)
    pre = "/some/standard/checkpoint"
    cfgs = {m: dt.finetune_config(s, m, pre) for m in dt.METHODS}
    for m, c in cfgs.items():
        assert c.model.pretrained == pre and c.epochs == s["epochs"] and c.data.batch_size == s["batch_size"]
        assert c.optim.lr == cfgs["standard"].optim.lr and c.schedule.name == "slow-start-fast-decay"
        p = c.defense.params
        if m != "standard":
            assert p["eps"] == s["eps"]
            assert p.get("steps", 1) == (1 if m == "fast-at" else s["steps"])
    assert cfgs["fast-at"].defense.params["step_size"] == pytest.approx(1.25 * s["eps"])
    assert dt.finetune_config(s, "trades", None).defense.name == "standard"     # the pretraining


@pytest.mark.parametrize("label", [m for m in dt.METHODS if m != "standard"])
def test_cifar10_profile_reads_each_method_recipe(label: str) -> None:
    s = dt.settings("cifar10", False, None, None)
    c = dt.recipe_config(s, label)
    defense, wp = dt.METHODS[label]
    assert c.defense.name == defense and c.data.name == "cifar10" and c.model.arch == "preact-resnet18"
    assert c.defense.weight_perturbation == wp and c.model.pretrained is None and c.epochs >= 10


def test_ordering_agreement_counts_pairs_and_skips_ties() -> None:
    ours = {"a": 0.5, "b": 0.4, "c": 0.3, "d": 0.3}
    theirs = {"a": 60.0, "b": 50.0, "c": 55.0, "d": 40.0, "e": 1.0}
    r = dt.ordering_agreement(ours, theirs)
    assert r["methods"] == ["a", "b", "c", "d"]
    assert r["pairs"] == 5 and r["agree"] == 4 and r["disagree"] == [["c", "b"]]     # c-d tied on our side
    assert dt.ordering_agreement({"a": 1.0}, {"a": 2.0})["fraction"] is None


def test_claims_file_rows_are_complete_and_sourced() -> None:
    claims = dt.load_claims()
    assert claims
    for c in claims:
        assert 0 < c["clean"] <= 100 and c["source"] and c["verified"]
        assert c["autoattack"] is None or 0 < c["autoattack"] < c["clean"]
        assert c["autoattack"] is not None or c["worst_class_robust"] is not None
    assert dt.claim_for("trades", claims)["method"] == "trades"


def test_bad_claims_file_and_unknown_method_are_input_errors(tmp_path: Path) -> None:
    bad = tmp_path / "claims.json"
    bad.write_text(json.dumps([{"method": "trades", "clean": 80.0}]))  # no autoattack, arch, source
    with pytest.raises(InputError, match="lacks"):
        dt.load_claims(bad)
    with pytest.raises(InputError, match="unknown method 'tradez'"):
        dt.main(["--quick", "--methods", "tradez", "--out", str(tmp_path / "x.json")])


def test_quick_run_writes_one_row_per_method_labelled_not_standard(tmp_path: Path) -> None:
    out = tmp_path / "dt.json"
    assert dt.main(["--quick", "--threads", "1", "--methods", "trades,fast-at", "--out", str(out),
                    "--runs", str(tmp_path / "runs")]) == 0
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["standard", "trades", "fast-at"]
    assert rows["standard"]["time_vs_standard"] == 1.0
    for r in rows.values():
        assert 0 <= r["autoattack_acc"] <= r["clean_acc"] <= 1 and r["worst_class_robust_acc"] <= r["autoattack_acc"]
        assert r["autoattack"]["version"] != "standard"
    assert "NOT standard AutoAttack" in out.with_suffix(".md").read_text()
    # a rerun reuses every finished run and the benchmark entries: same numbers
    assert dt.main(["--quick", "--threads", "1", "--methods", "trades,fast-at", "--out", str(out),
                    "--runs", str(tmp_path / "runs")]) == 0
    again = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert {k: v["autoattack_acc"] for k, v in again.items()} == {k: v["autoattack_acc"] for k, v in rows.items()}
    assert {k: v["train_seconds"] for k, v in again.items()} == {k: v["train_seconds"] for k, v in rows.items()}
