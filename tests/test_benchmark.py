"""``robustkit.app.benchmark`` / ``robustkit benchmark``: two tiny MNIST models, 40 images, cheap attacks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import robustkit.app.benchmark as bm
from robustkit.app import _bench_attacks
from robustkit.app import _bench_report as rep
from robustkit.cli import main
from robustkit.zoo import create, save
from tests._optional import has_autoattack

CHEAP = {"pgd": {"steps": 10, "restarts": 1},
         "autoattack": {"attacks": ["apgd-ce"], "overrides": {"apgd.n_iter": 10, "apgd.n_restarts": 1}},
         "deepfool": {"max_iter": 10, "candidates": 4},
         "fast": {"n_iter": 5, "n_targets": 1}}
SMOOTH = {"n0": 10, "n": 100, "n_images": 8}


ATTACKS = ["autoattack", "pgd", "deepfool"] if has_autoattack() else ["pgd", "deepfool"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_mnist_model: Any) -> list[Path]:
    """A trained model directory, and a run directory (noise defense, sigma 0.25) holding a copy with
    perturbed weights."""
    root = tmp_path_factory.mktemp("bench_models")
    trained = save(tiny_mnist_model, root / "trained")
    other = copy.deepcopy(tiny_mnist_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    run = root / "noisy"
    save(other, run / "checkpoints" / "best")
    (run / "config.yaml").write_text("defense:\n  name: noise\n  params:\n    sigma: 0.25\n")
    return [trained, run]


@pytest.fixture(scope="module")
def bench(model_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench_out")
    res = bm.run_benchmark(model_dirs, out, n=40, eps=0.1, attacks=ATTACKS, certify=["ibp", "smoothing"],
                           eps_grid=[0, 0.05, 0.1], attack_params=CHEAP, smoothing=SMOOTH, batch_size=64,
                           progress=False)
    return res, out


def test_results_json_and_report(bench: tuple[dict[str, Any], Path]) -> None:
    res, out = bench
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["settings"]["attacks"] == ATTACKS and len(on_disk["models"]) == 2
    for e in on_disk["models"]:
        for key in ("name", "architecture", "dataset", "threat_model", "eps", "clean_acc", "robust_acc", "attacks",
                    "seconds", "certified", "breakdown", "flags", "eps_curve"):
            assert key in e, key
        assert e["threat_model"] == "Linf" and e["eps"] == 0.1 and e["dataset"] == "mnist5k"
        assert set(e["attacks"]) == set(ATTACKS) and set(ATTACKS) <= set(e["seconds"])
        assert (out / "models" / f"{e['name']}.json").is_file()
    assert {e["name"] for e in res["models"]} == {"trained", "noisy"}
    md = (out / "report.md").read_text()
    assert "| rank | model | architecture | clean |" in md and "worst case" in md
    assert (out / "plots" / "robust_accuracy_vs_eps.png").is_file()
    assert (out / "plots" / "certified_accuracy_linf.png").is_file()     # IBP; one plot per norm
    assert (out / "plots" / "certified_accuracy_l2.png").is_file()       # smoothing (L2)


def test_accuracies_are_consistent(bench: tuple[dict[str, Any], Path]) -> None:
    res, _ = bench
    for e in res["models"]:
        assert 0.0 <= e["robust_acc"] <= e["clean_acc"] <= 1.0
        assert 0.0 <= e["worst_class_robust_acc"] <= e["robust_acc"]          # worst class <= average
        for acc in e["attacks"].values():
            assert e["robust_acc"] <= acc + 1e-12 and acc <= e["clean_acc"]
        # worst case per point = clean-correct points no attack broke
        broken_points = len(e["breakdown"]["broken_by"])
        assert e["robust_acc"] == pytest.approx(e["clean_acc"] - broken_points / e["n"])
        curve = e["eps_curve"]
        assert curve["eps"] == [0.0, 0.05, 0.1] and curve["robust_acc"][0] == e["clean_acc"]
        assert curve["robust_acc"][-1] == e["attacks"]["pgd"]
        ibp = e["certified"]["ibp"]
        assert ibp["status"] == "ok" and ibp["certified_acc"] <= e["robust_acc"]
    accs = [e.get("autoattack_acc", e["robust_acc"]) for e in res["models"]]
    assert accs == sorted(accs, reverse=True)


@pytest.mark.skipif(not has_autoattack(), reason="AutoAttack package not installed")
def test_autoattack_recorded(bench: tuple[dict[str, Any], Path]) -> None:
    res, _ = bench
    for e in res["models"]:
        assert e["autoattack_acc"] <= e["clean_acc"] and e["autoattack_acc"] == e["attacks"]["autoattack"]
        assert e["autoattack"]["package"] and e["autoattack"]["package_version"]
        assert e["autoattack"]["attacks"] == ["apgd-ce"]
        assert set(e["breakdown"]["per_attack"]["autoattack"]["sub_attacks"]) <= {"apgd-ce"}
        assert all(a == "autoattack/apgd-ce" for p in e["breakdown"]["broken_by"].values() for a in p
                   if a.startswith("autoattack"))


def test_smoothing_sigma_from_run_config(bench: tuple[dict[str, Any], Path]) -> None:
    res, _ = bench
    by_name = {e["name"]: e for e in res["models"]}
    sm = by_name["noisy"]["certified"]["smoothing"]
    assert sm["status"] == "ok" and sm["sigma"] == 0.25 and sm["n_images"] == 8
    assert "certified_acc" not in sm                      # L-inf benchmark: no L2 comparison at eps
    assert by_name["trained"]["certified"]["smoothing"]["status"] == "n/a"


def test_rerun_reuses_per_model_results(bench: tuple[dict[str, Any], Path], model_dirs: list[Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    res, out = bench

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("attack ran again although the per-model result could be reused")

    monkeypatch.setattr(_bench_attacks, "evaluate_sharded", boom)
    again = bm.run_benchmark(model_dirs, out, n=40, eps=0.1, attacks=ATTACKS, certify=["ibp", "smoothing"],
                             eps_grid=[0, 0.05, 0.1], attack_params=CHEAP, smoothing=SMOOTH, batch_size=64,
                             progress=False)
    assert again["models"] == json.loads(json.dumps(res["models"]))


def test_broken_certifier_raises_soundness_error(model_dirs: list[Path], tmp_path: Path) -> None:
    def claims_everything(model: Any, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
        return torch.ones(x.shape[0], dtype=torch.bool)

    with pytest.raises(bm.SoundnessError, match="certified"):
        bm.run_benchmark(model_dirs[:1], tmp_path, n=20, eps=0.3, attacks=["pgd"], eps_grid=[],
                         attack_params=CHEAP, certifiers={"broken": claims_everything}, progress=False)
    res = json.loads((tmp_path / "results.json").read_text())
    violations = res["flags"]["trained"]["soundness_violations"]
    assert violations and {v["certifier"] for v in violations} == {"broken"}
    assert "SOUNDNESS VIOLATION" in (tmp_path / "report.md").read_text()


def test_weaker_autoattack_flag() -> None:
    b = {"autoattack": torch.tensor([True, False, False]), "pgd": torch.tensor([True, True, False])}
    f = rep.flags(b, {"ibp": torch.tensor([False, False, True])}, {"autoattack": {}, "pgd": {"unverified": 2}})
    assert f == {"weaker_autoattack": {"pgd": [1]}, "soundness_violations": [], "unverified_successes": {"pgd": 2}}


@pytest.mark.parametrize("kw, match", [
    ({"attacks": ["pgd", "nope"]}, "unknown attack 'nope'; valid attacks: .*pgd"),
    ({"n": 5000}, "n=5000 is larger than the 1000 test images"),
    ({"eps": -0.1}, "eps must be >= 0"),
    ({"certify": ["magic"]}, "unknown certifier 'magic'"),
])
def test_bad_input(model_dirs: list[Path], tmp_path: Path, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bm.run_benchmark(model_dirs[:1], tmp_path, **{"n": 10, "attacks": ["pgd"], **kw})
    assert not (tmp_path / "results.json").exists()


def test_model_of_another_dataset(tmp_path: Path) -> None:
    d = save(create("ibp-small", 10, (3, 32, 32)), tmp_path / "cifar_model")
    with pytest.raises(ValueError, match=r"expects inputs \(3, 32, 32\).*\(1, 28, 28\)"):
        bm.run_benchmark([d], tmp_path / "out", n=10, attacks=["pgd"])


def test_cli(model_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["benchmark", "--models", str(model_dirs[0]), "--out", str(tmp_path), "--eps-grid", "none"]
    assert main(base + ["--attacks", "pgd,bogus"]) == 2
    assert "valid attacks" in capsys.readouterr().err
    assert main(base + ["--n", "100000"]) == 2
    assert "larger than the 1000 test images" in capsys.readouterr().err
    assert main(base + ["--n", "10", "--attacks", "pgd", "--param", "pgd.steps=3", "--param", "pgd.restarts=1"]) == 0
    assert "results:" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["models"][0]["attack_params"]["pgd"]["steps"] == 3

    def unsound(*a: Any, **k: Any) -> None:
        raise bm.SoundnessError("1 point(s) broken by an attack although certified at eps=0.3")

    monkeypatch.setattr(bm, "benchmark", unsound)
    assert main(base) == 3
    assert "SOUNDNESS ERROR: 1 point(s) broken" in capsys.readouterr().err


def test_certificates_not_available(tiny_mnist_model: Any, tmp_path: Path) -> None:
    """IBP on a net it cannot bound -> "n/a" with the reason; on an L2 threat model IBP runs in its L2
    mode, and smoothing reports certified accuracy at radius eps."""
    from robustkit.zoo import RobustModel

    tanh = RobustModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.Tanh()),
                       "tanh-linear", 10, (1, 28, 28), (0.0,), (1.0,))
    quick = {"pgd": {"steps": 2, "restarts": 1}}
    res = bm.run_benchmark({"tanh": tanh}, tmp_path / "a", n=10, eps=0.1, attacks=["pgd"], certify=["ibp"],
                           eps_grid=[], attack_params=quick, progress=False)
    ibp = res["models"][0]["certified"]["ibp"]
    assert ibp["status"] == "n/a" and "Tanh" in ibp["reason"]
    res = bm.run_benchmark({"tiny": tiny_mnist_model}, tmp_path / "b", n=10, norm="l2", eps=1.0, attacks=["pgd"],
                           certify=["ibp", "smoothing"], sigma=0.25, eps_grid=[], attack_params=quick,
                           smoothing=SMOOTH, progress=False)
    e = res["models"][0]
    assert e["threat_model"] == "L2" and e["certified"]["ibp"]["status"] == "ok"
    assert e["certified"]["ibp"]["norm"] == "l2"
    assert 0.0 <= e["certified"]["smoothing"]["certified_acc"] <= 1.0
    assert "not the base model" in e["certified"]["smoothing"]["guarantee"]


def test_false_claims_are_not_counted(model_dirs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A fake attack claiming every point (out of the box / out of the ball) breaks nothing, from the
    Python API and from the command; the flag counts its rejected claims."""
    from _fake_attacks import Liar

    from robustkit.registry import ATTACKS

    monkeypatch.setitem(ATTACKS._items, "liar", Liar)
    res = bm.run_benchmark(model_dirs[:1], tmp_path / "api", n=20, eps=0.1, attacks=["liar", "pgd"], eps_grid=[],
                           attack_params={"pgd": {"steps": 3, "restarts": 1}, "liar": {"how": "box"}},
                           progress=False)
    e = res["models"][0]
    correct = round(e["clean_acc"] * e["n"])
    assert correct > 0 and e["attacks"]["liar"] == e["clean_acc"] and e["robust_acc"] == e["attacks"]["pgd"]
    assert e["flags"]["unverified_successes"] == {"liar": correct}
    assert e["breakdown"]["per_attack"]["liar"]["broken"] == 0
    out = tmp_path / "cli"
    assert main(["benchmark", "--models", str(model_dirs[0]), "--out", str(out), "--n", "20", "--eps", "0.1",
                 "--attacks", "liar", "--eps-grid", "none", "--param", "liar.how=outside"]) == 0
    e = json.loads((out / "results.json").read_text())["models"][0]
    assert e["attacks"]["liar"] == e["robust_acc"] == e["clean_acc"]
    assert e["flags"]["unverified_successes"] == {"liar": correct} and "failed the re-check" in (out / "report.md"
                                                                                                 ).read_text()


def test_cli_config_recipe(model_dirs: list[Path], tmp_path: Path) -> None:
    """``--config`` + flags + ``--set``, and ``--param`` (one override parser) on top."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "benchmark_mnist5k_linf.yaml"
    out = tmp_path / "recipe"
    assert main(["benchmark", "--config", str(recipe), "--models", str(model_dirs[0]), "--out", str(out),
                 "--n", "10", "--attacks", "pgd", "--set", "certify=[]", "--set", "eps_grid=none",
                 "--param", "pgd.steps=2", "--param", "pgd.restarts=1"]) == 0
    res = json.loads((out / "results.json").read_text())
    s = res["settings"]
    assert (s["n"], s["attacks"], s["certify"], s["eps_grid"], s["eps"], s["batch_size"]) == \
        (10, ["pgd"], [], [], 0.3, 500)
    assert s["attack_params"] == {"autoattack": {"version": "standard"}, "pgd": {"steps": 2, "restarts": 1}}
    assert res["models"][0]["attack_params"]["pgd"]["steps"] == 2
    assert main(["benchmark", "--config", str(recipe), "--models", str(model_dirs[0]), "--param", "steps=2"]) == 2
