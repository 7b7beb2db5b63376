"""``robustkit benchmark``: one certified-accuracy plot per threat norm (the plotted data checked against the
per-image radii), dual smoothing on dual-subimage models only, CPR's rejection entry, and bad settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import robustkit.app.benchmark as bm
from robustkit.cli import main
from robustkit.config import BenchmarkConfig, from_dict
from robustkit.errors import ConfigError
from robustkit.zoo import create, save

QUICK = {"pgd": {"steps": 2, "restarts": 1}}
SMOOTH = {"n0": 10, "n": 100, "n_images": 8}


def _no_cert(model: Any, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """An injected at-eps certifier (sound: it certifies nothing) -- a single point on the plot."""
    return torch.zeros(x.shape[0], dtype=torch.bool)


@pytest.fixture(scope="module")
def dual() -> Any:
    torch.manual_seed(0)
    return create("dual-subimage", 10, (1, 28, 28), sub_arch="ibp-small").eval()


@pytest.fixture(scope="module")
def l2_bench(tiny_mnist_model: Any, dual: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench_l2")
    res = bm.run_benchmark({"tiny": tiny_mnist_model, "dual": dual}, out, n=16, norm="l2", eps=0.3, attacks=["pgd"],
                           certify=["lipschitz", "ibp", "smoothing", "dual-smoothing"], sigma=0.25, eps_grid=[],
                           attack_params=QUICK, smoothing=SMOOTH, progress=False)
    return res, out


@pytest.fixture(scope="module")
def linf_bench(tiny_mnist_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench_linf")
    res = bm.run_benchmark({"tiny": tiny_mnist_model}, out, n=16, eps=0.05, attacks=["pgd"],
                           certify=["ibp", "crown-ibp", "lipschitz", "smoothing", "none"], sigma=0.25, eps_grid=[],
                           certifiers={"none": _no_cert}, attack_params=QUICK, smoothing=SMOOTH,
                           reject={"steps": 2, "n_images": 8, "alphas": [0.5, 1.0]}, batch_size=64, progress=False)
    return res, out


def _plotted(out: Path, norm: str) -> dict[str, dict[str, Any]]:
    assert (out / "plots" / f"certified_accuracy_{norm}.png").stat().st_size > 1000
    data = json.loads((out / "plots" / f"certified_accuracy_{norm}.json").read_text())
    assert data["norm"] == norm
    return data["series"]


def _check_curve(series: dict[str, Any], rec: dict[str, Any]) -> None:
    """The plotted step curve is exact for the record's per-image radii: it starts at the fraction
    correct, drops at each correct image's radius, and agrees with the record's own curve (radius >= r)
    at every grid radius that is not itself a certified radius."""
    per = rec["per_sample"]
    xs, ys = series["radius"], series["certified_accuracy"]
    radii = {p["radius"] for p in per if p["correct"] and p["radius"] > 0}
    assert xs[0] == 0.0 and xs[1:] == sorted(radii) and len(xs) == len(ys)
    assert ys[0] == pytest.approx(sum(p["correct"] for p in per) / len(per))
    for x, y in zip(xs[1:], ys[1:]):
        assert y == pytest.approx(sum(p["correct"] and p["radius"] > x for p in per) / len(per))
    checked = 0
    for r, a in zip(rec["curve"]["radius"], rec["curve"]["certified_accuracy"]):
        if r not in radii:                      # the step in force at r: the last x < r (x = 0 at r = 0)
            k = max(i for i, x in enumerate(xs) if x < r) if r > 0 else 0
            assert ys[k] == pytest.approx(a), (r, a)
            checked += 1
    assert checked >= len(rec["curve"]["radius"]) // 2


def test_l2_plot_has_every_l2_certifier(l2_bench: tuple[dict, Path]) -> None:
    res, out = l2_bench
    assert not (out / "plots" / "certified_accuracy_linf.png").exists()     # nothing L-inf on an L2 benchmark
    assert not (out / "plots" / "certified_accuracy.png").exists()          # no mixed-norm plot
    series = _plotted(out, "l2")
    by = {e["name"]: e for e in res["models"]}
    expected = {(m, c) for m, e in by.items() for c, r in e["certified"].items() if r["status"] == "ok"}
    assert {(s["model"], s["certifier"]) for s in series.values()} == expected
    assert {("tiny", "lipschitz"), ("tiny", "ibp"), ("tiny", "smoothing"), ("dual", "dual-smoothing")} <= expected
    assert by["tiny"]["certified"]["ibp"]["norm"] == "l2"              # IBP in its L2 mode on an L2 threat model
    for label, s in series.items():
        rec = by[s["model"]]["certified"][s["certifier"]]
        assert rec["norm"] == "l2" and not s["points"]
        _check_curve(s, rec)
        if s["certifier"] in ("smoothing", "dual-smoothing"):
            assert s["smoothed"] and "smoothed classifier" in label
        else:
            assert not s["smoothed"] and "smoothed" not in label
    md = (out / "report.md").read_text()
    assert "![plots/certified_accuracy_l2.png](plots/certified_accuracy_l2.png)" in md


def test_dual_smoothing_only_on_dual_models(l2_bench: tuple[dict, Path]) -> None:
    res, _ = l2_bench
    by = {e["name"]: e["certified"] for e in res["models"]}
    d = by["dual"]["dual-smoothing"]
    assert d["status"] == "ok" and d["certifier"] == "dual-smoothing" and d["n_images"] == SMOOTH["n_images"]
    assert d["sigma"] == 0.25 and "dual smoothed classifier" in d["guarantee"] and "certified_acc" in d
    skip = by["tiny"]["dual-smoothing"]
    assert skip["status"] == "n/a" and "needs a dual-subimage model" in skip["reason"]
    assert by["dual"]["smoothing"]["status"] == "ok"                   # plain smoothing certifies any model


def test_linf_plot_and_l2_smoothing_apart(linf_bench: tuple[dict, Path]) -> None:
    res, out = linf_bench
    e = res["models"][0]
    linf, l2 = _plotted(out, "linf"), _plotted(out, "l2")
    assert {s["certifier"] for s in linf.values()} == {"ibp", "crown-ibp", "lipschitz", "none"}
    assert {s["certifier"] for s in l2.values()} == {"smoothing"}          # smoothing is L2, never on the L-inf axis
    for s in linf.values():
        rec = e["certified"][s["certifier"]]
        if s["certifier"] == "none":                                       # injected: one point at eps
            assert s["points"] and s["radius"] == [0.05] and s["certified_accuracy"] == [rec["certified_acc"]] == [0.0]
        else:
            assert rec["norm"] == "linf" and not s["points"]
            _check_curve(s, rec)
    ibp, crown = (e["certified"][c]["curve"]["certified_accuracy"] for c in ("ibp", "crown-ibp"))
    assert all(c >= i for i, c in zip(ibp, crown))                          # CROWN-IBP never looser than IBP


def test_reject_entry(linf_bench: tuple[dict, Path], tiny_mnist_model: Any, tmp_path: Path) -> None:
    """The entry's CPR numbers are ``robustkit reject``'s on the same images, settings and seed."""
    from robustkit.app.reject import run_reject

    res, out = linf_bench
    e = res["models"][0]
    rj = e["rejection"]
    assert [c["alpha"] for c in rj["curve"]] == [0.0, 0.5, 1.0] and rj["n"] == 8
    assert e["rejection_robust_acc"] == rj["curve"][0]["robust_accuracy"]
    assert e["rejection_curve_auc"] == rj["curve_auc"]
    assert res["settings"]["reject"]["steps"] == 2 and res["leaderboard"][0]["rejection_robust_acc"] == \
        e["rejection_robust_acc"]
    ref = run_reject(save(tiny_mnist_model, tmp_path / "m"), eps=0.05, alphas=[0.0, 0.5, 1.0], attack=["pgd"],
                     attack_params=QUICK["pgd"], steps=2, n=8, batch_size=64)
    for k in ("robust_accuracy_with_rejection", "curve", "curve_auc"):
        assert rj[k] == ref[k], k
    md = (out / "report.md").read_text()
    assert "with rejection (CPR)" in md and "rejection AUC" in md


@pytest.mark.parametrize(("reject", "match"), [
    ({"stepz": 2}, "stepz"),
    ({"alphas": [0.5, 2]}, "reject.alphas"),
    ({"preset": "imagenet"}, "reject: unknown CPR preset"),
    ({"attack": ["nope"]}, "nope"),
    (3, "reject"),
])
def test_bad_reject_settings(reject: Any, match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        cfg = from_dict(BenchmarkConfig, {"reject": reject, "out": str(tmp_path / "o")})
        bm.settings(cfg, {})
    assert not (tmp_path / "o").exists()


def test_cli_bad_reject_exits_2(tiny_mnist_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save(tiny_mnist_model, tmp_path / "m")
    code = main(["benchmark", "--models", str(model), "--n", "4", "--attacks", "pgd", "--reject", "--set",
                 "reject.restarts=0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "reject.restarts" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_ibp_on_a_large_l2_eps(tiny_mnist_model: Any, tmp_path: Path) -> None:
    """An L2 eps beyond IBP's default bisection top (1.0) is certified, not refused mid-run."""
    res = bm.run_benchmark({"tiny": tiny_mnist_model}, tmp_path, n=4, norm="l2", eps=1.5, attacks=["pgd"],
                           certify=["ibp"], eps_grid=[], attack_params=QUICK, progress=False)
    ibp = res["models"][0]["certified"]["ibp"]
    assert ibp["status"] == "ok" and ibp["params"]["max_eps"] == 3.0 and ibp["norm"] == "l2"
