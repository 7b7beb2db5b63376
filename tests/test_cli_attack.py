"""``robustkit attack`` end to end on a tiny saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from robustkit.app._attack_report import queries_section, success_vs_budget
from robustkit.app.build import build_chain
from robustkit.cli import main
from robustkit.commands._config import param_overrides
from robustkit.config import apply_overrides
from robustkit.zoo import create, save


@pytest.fixture(scope="module")
def model_dir(tiny_mnist_model, tmp_path_factory) -> Path:
    return save(tiny_mnist_model, tmp_path_factory.mktemp("model"))


def _run(*argv: str) -> int:
    return main(["attack", "--device", "cpu", "--n", "48", "--batch-size", "24", *argv])


def test_single_eps_with_adversarials(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pgd"
    assert _run("--model", str(model_dir), "--attack", "pgd", "--eps", "0.2", "--steps", "5",
                "--param", "loss=margin", "--save-adversarials", "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("attack", "norm", "eps", "n", "clean_accuracy", "robust_accuracy", "seconds", "params", "warnings"):
        assert key in res
    assert res["attack"] == "pgd" and res["norm"] == "linf" and res["eps"] == 0.2 and res["n"] == 48
    assert res["params"][0]["steps"] == 5 and res["params"][0]["loss"] == "margin"
    assert res["robust_accuracy"] < res["clean_accuracy"]
    assert (out / "report.md").read_text().startswith("# Attack")
    adv = load_file(str(out / "adversarials.safetensors"))
    assert adv["x_adv"].shape == (48, 1, 28, 28) and (adv["x_adv"] - adv["x"]).abs().max() <= 0.2 + 1e-5
    assert (out / "plots" / "adversarials.png").stat().st_size > 1000


def test_curve_mode_and_chain(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "curve"
    assert _run("--model", str(model_dir), "--attack", "pgd,deepfool", "--norm", "l2", "--eps", "0,1,3",
                "--steps", "5", "--param", "max_iter=10", "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["eps"] == [0.0, 1.0, 3.0] and len(res["robust_accuracy"]) == 3 and len(res["curve"]) == 3
    ra = res["robust_accuracy"]
    assert ra[0] == pytest.approx(res["clean_accuracy"]) and ra[2] <= ra[1] <= ra[0]
    assert [p["attack"] for p in res["per_attack"]] == ["pgd", "deepfool"]
    assert (out / "plots" / "robustness_curve.png").is_file()
    assert "Robustness curve" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv,words", [
    (["--attack", "nope", "--eps", "0.1"], "unknown attack"),
    (["--attack", "pgd", "--eps", "-0.1"], "eps"),
    (["--attack", "pgd"], "needs eps"),
    (["--attack", "deepfool", "--steps", "3"], "'steps' is not accepted by attack deepfool"),
    (["--attack", "pgd", "--eps", "0.1", "--param", "bogus=1"], "bogus"),
    (["--attack", "pgd", "--eps", "0.1", "--param", "noequals"], "KEY=VALUE"),
    (["--attack", "pgd", "--eps", "0.1", "--norm", "l7"], "norm"),
])
def test_bad_input_exit_2(model_dir: Path, tmp_path: Path, capsys, argv: list[str], words: str) -> None:
    assert _run("--model", str(model_dir), "--out", str(tmp_path / "x"), *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustkit: error:") and words in err[0], err


def test_shape_mismatch_and_missing_model(tmp_path: Path, capsys) -> None:
    cifar = save(create("ibp-small", 10, (3, 32, 32)), tmp_path / "cifar")
    assert _run("--model", str(cifar), "--eps", "0.1", "--out", str(tmp_path / "o")) == 2
    assert "expects inputs (3, 32, 32)" in capsys.readouterr().err
    assert _run("--model", str(tmp_path / "missing"), "--eps", "0.1") == 2
    assert "model not found" in capsys.readouterr().err


def test_helpers() -> None:
    items = param_overrides(["a=1", "b=0.5", "c=true", "d=8/255", "e=null"], "params")
    assert apply_overrides({}, items) == {"params": {"a": 1, "b": 0.5, "c": True, "d": "8/255", "e": None}}
    pgd, df = build_chain(["pgd", "deepfool"], {"steps": 3}, norm="l2", eps=1.0, seed=7)
    assert (pgd.norm, pgd.eps, pgd.steps, pgd.seed) == ("l2", 1.0, 3, 7) and (df.norm, df.eps) == ("l2", 1.0)
    import torch

    table = success_vs_budget(torch.tensor([1, 5, 50, 0]), torch.tensor([True, True, True, False]), 4, 100, 5)
    assert table[-1] == {"budget": 100, "success_rate": 0.75} and table[0]["success_rate"] == 0.25


def test_query_stats_for_query_based_attacks(tmp_path: Path) -> None:
    """The query-budget section (used by hard-label attacks with ``max_queries``), on a fake result."""
    import torch

    class _Fake:
        max_queries = 100

    r = {"success": torch.tensor([True, True, False, False]), "queries": torch.tensor([3, 40, 100, 0]),
         "clean_correct": torch.tensor([True, True, True, False])}
    res = {"attack": "fake"}
    md = "".join(queries_section(tmp_path, res, r, [_Fake()]))
    q = res["queries"]
    assert q["median_queries"] in (3.0, 40.0) and q["mean_queries"] == 21.5 and q["max_queries"] == 100
    assert q["success_vs_queries"][-1]["success_rate"] == pytest.approx(2 / 3)
    assert (tmp_path / "plots" / "success_vs_queries.png").is_file() and "Queries" in md


def test_config_recipe_flags_and_set(model_dir: Path, tmp_path: Path) -> None:
    """``--config`` + flags + ``--set``: flags override the recipe, ``--set`` overrides both."""
    out = tmp_path / "recipe"
    recipe = Path(__file__).resolve().parents[1] / "configs" / "attack_mnist5k_pgd_linf.yaml"
    assert _run("--model", str(model_dir), "--config", str(recipe), "--eps", "0.25",
                "--steps", "7", "--set", "params.steps=3", "--set", "params.restarts=1", "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["eps"] == 0.25 and res["norm"] == "linf" and res["attack"] == "pgd" and res["mode"] == "chained"
    assert res["params"][0]["steps"] == 3 and res["params"][0]["restarts"] == 1
    assert res["config"]["params"]["loss"] == "ce" and res["config"]["batch_size"] == 24   # recipe < flag
    assert _run("--model", str(model_dir), "--eps", "0.1", "--set", "bogus=1", "--out", str(tmp_path / "b")) == 2


def test_unverified_claims_are_not_counted(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A fake attack that claims every point with an out-of-ball x_adv breaks nothing; the next
    attack of the chain still sees every clean-correct point."""
    from _fake_attacks import Liar

    from robustkit.registry import ATTACKS

    monkeypatch.setitem(ATTACKS._items, "liar", Liar)
    for mode in ("chained", "independent"):
        out = tmp_path / mode
        assert _run("--model", str(model_dir), "--attack", "liar,pgd", "--eps", "0.1", "--steps", "3",
                    "--mode", mode, "--out", str(out)) == 0
        res = json.loads((out / "results.json").read_text())
        liar, pgd = res["per_attack"]
        correct = round(res["clean_accuracy"] * res["n"])
        assert liar["broken"] == 0 and liar["unverified"] == liar["attacked"] == correct
        assert res["unverified"] == correct and pgd["attacked"] == correct
        assert res["robust_accuracy"] == pytest.approx(res["clean_accuracy"] - pgd["broken"] / res["n"])
