"""RobustBench ``model_info`` output (``out/robustbench/<name>.json``) and reported rows loaded back
from such files (``robustkit.app._robustbench``) into the benchmark's leaderboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import robustkit.app.benchmark as bm
from robustkit.app import _bench_report as rep
from robustkit.app import _robustbench as rb
from robustkit.cli import main
from robustkit.errors import InputError
from robustkit.zoo import save
from tests._optional import has_autoattack

# Two files as RobustBench has them (model_info/cifar10/Linf/, upstream repository, March 2025).
CARMON = {"link": "https://arxiv.org/abs/1905.13736", "name": "Unlabeled Data Improves Adversarial Robustness",
          "authors": "Yair Carmon, Aditi Raghunathan, Ludwig Schmidt, Percy Liang, John C. Duchi",
          "additional_data": True, "number_forward_passes": 1, "dataset": "cifar10", "venue": "NeurIPS 2019",
          "architecture": "WideResNet-28-10", "eps": "8/255", "clean_acc": "89.69", "reported": "62.5",
          "autoattack_acc": "59.53", "unreliable": False}
XIAO = {"link": "https://arxiv.org/abs/1905.10510", "name": "Enhancing Adversarial Defense by k-Winners-Take-All",
        "authors": "Chang Xiao, Peilin Zhong, Changxi Zheng", "additional_data": False, "number_forward_passes": 1,
        "dataset": "cifar10", "venue": "ICLR 2020", "architecture": "DenseNet-121", "eps": "0.031",
        "clean_acc": "79.28", "reported": "52.4", "footnote": "Uses eps = 0.031 instead of 8/255.",
        "autoattack_acc": "18.50", "external": "7.40", "unreliable": True}
CIFAR_LINF = {"dataset": "cifar10", "norm": "linf", "eps": 8 / 255}
AA_CHEAP = {"attacks": ["apgd-ce"], "overrides": {"apgd.n_iter": 5, "apgd.n_restarts": 1}}
N = 20


def check_format(d: dict[str, Any], ours: bool) -> None:
    """RobustBench's model_info format: key set, value types, string formats (ours: 2-decimal percents)."""
    assert set(rb.KEYS) - {"autoattack_acc"} <= set(d), set(rb.KEYS) - set(d)
    for k in ("link", "name", "authors", "dataset", "venue", "architecture", "reported"):
        assert isinstance(d[k], str), k
    assert d["additional_data"] is None or isinstance(d["additional_data"], bool)
    assert type(d["number_forward_passes"]) is int and d["number_forward_passes"] >= 1
    assert re.fullmatch(r"\d+/255|\d+(\.\d+)?", d["eps"]), d["eps"]
    pct = r"\d{1,3}\.\d{2}" if ours else r"\d{1,3}(\.\d{1,2})?"
    for k in ("clean_acc", "autoattack_acc", "external"):
        if k in d:
            assert re.fullmatch(pct, d[k]) and 0 <= float(d[k]) <= 100, (k, d[k])
    assert d["reported"] == "" or re.fullmatch(pct, d["reported"])
    assert isinstance(d.get("footnote", ""), str) and isinstance(d.get("unreliable", False), bool)


def test_reference_files_pass_the_format_check() -> None:
    check_format(CARMON, ours=False)
    check_format(XIAO, ours=False)


@pytest.mark.parametrize("eps, text", [(8 / 255, "8/255"), (4 / 255, "4/255"), (0.3, "0.3"), (0.031, "0.031"),
                                       (0.5, "0.5"), (0.0, "0"), (1 / 3, "85/255"),
                                       (0.12345678, "0.12345678")])
def test_eps_string(eps: float, text: str) -> None:
    assert rb.eps_string(eps) == text and rb.parse_eps(text) == pytest.approx(eps, rel=1e-15)


def test_percent() -> None:
    assert [rb.percent(v) for v in (0.8686, 0.025, 1.0, 0.0, 1 / 3)] == ["86.86", "2.50", "100.00", "0.00", "33.33"]


def _entry(n: int, version: str = "standard") -> dict[str, Any]:
    attacks = ["apgd-ce", "apgd-t", "fab-t", "square"] if version == "standard" else ["apgd-ce"]
    return {"name": "m", "architecture": "wrn-28-10", "dataset": "cifar10", "threat_model": "Linf", "eps": 8 / 255,
            "n": n, "clean_acc": 0.9012, "autoattack_acc": 0.5531, "robust_acc": 0.55,
            "attacks": {"autoattack": 0.5531, "pgd": 0.6},
            "autoattack": {"package": "autoattack", "package_version": "0.1", "version": version, "attacks": attacks}}


def test_standard_autoattack_gives_autoattack_acc() -> None:
    s = {**CIFAR_LINF, "attack_params": {"autoattack": {"version": "standard"}}}
    d = rb.model_info(_entry(10000), s)
    check_format(d, ours=True)
    assert (d["eps"], d["clean_acc"], d["autoattack_acc"], d["dataset"]) == ("8/255", "90.12", "55.31", "cifar10")
    assert (d["authors"], d["venue"], d["link"], d["reported"], d["additional_data"]) == ("", "N/A", "", "", None)
    assert "footnote" not in d and d["threat_model"] == "Linf" and d["robustkit"]["standard_autoattack"] is True
    assert list(d)[:len(rb.KEYS)] == list(rb.KEYS)                               # RobustBench's key order


@pytest.mark.parametrize("n, version, params, what", [
    (500, "standard", {}, "the first 500 of the 10000 test images"),
    (10000, "custom", {"attacks": ["apgd-ce"]}, "version 'custom' (apgd-ce)"),
    (10000, "standard", {"overrides": {"apgd.n_iter": 10}}, "with overrides apgd.n_iter=10"),
])
def test_non_standard_autoattack_is_not_autoattack_acc(n: int, version: str, params: dict[str, Any],
                                                       what: str) -> None:
    d = rb.model_info(_entry(n, version), {**CIFAR_LINF, "attack_params": {"autoattack": params}})
    check_format(d, ours=True)
    assert "autoattack_acc" not in d and d["robustkit"]["autoattack_acc"] == "55.31"
    assert what in d["footnote"] and "Not the standard AutoAttack" in d["footnote"]
    assert d["robustkit"]["standard_autoattack"] is False


def test_unknown_test_set_size_is_not_standard() -> None:
    e = {**_entry(10000), "dataset": "imagefolder:/data/val"}
    d = rb.model_info(e, {**CIFAR_LINF, "dataset": "imagefolder:/data/val", "attack_params": {}})
    assert "autoattack_acc" not in d and "does not know its full test-set size" in d["footnote"]


# -- a real (tiny) benchmark ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, tiny_mnist_model: Any) -> tuple[dict[str, Any], Path, Path]:
    root = tmp_path_factory.mktemp("rb")
    model_dir = save(tiny_mnist_model, root / "tiny")
    attacks = ["autoattack", "pgd"] if has_autoattack() else ["pgd"]
    res = bm.run_benchmark([model_dir], root / "out", n=N, eps="0.1", attacks=attacks, eps_grid=[],
                           attack_params={"pgd": {"steps": 3, "restarts": 1}, "autoattack": AA_CHEAP}, progress=False)
    return res, root / "out", model_dir


def test_benchmark_writes_model_info(bench: tuple[dict[str, Any], Path, Path]) -> None:
    res, out, _ = bench
    e = res["models"][0]
    d = json.loads((out / "robustbench" / "tiny.json").read_text())
    check_format(d, ours=True)
    assert (d["name"], d["architecture"], d["dataset"], d["eps"], d["threat_model"]) == \
        ("tiny", "ibp-small", "mnist5k", "0.1", "Linf")
    assert d["clean_acc"] == f"{100 * e['clean_acc']:.2f}" and d["number_forward_passes"] == 1
    assert "autoattack_acc" not in d                                   # 20 of 1000 images, custom AutoAttack
    if "autoattack_acc" in e:
        assert d["robustkit"]["autoattack_acc"] == f"{100 * e['autoattack_acc']:.2f}"
        assert "version 'custom' (apgd-ce) with overrides apgd.n_iter=5, apgd.n_restarts=1" in d["footnote"]
        assert f"the first {N} of the 1000 test images" in d["footnote"]
    else:
        assert "AutoAttack was not run" in d["footnote"]


def test_own_file_reads_back(bench: tuple[dict[str, Any], Path, Path]) -> None:
    res, out, _ = bench
    s, e = res["settings"], res["models"][0]
    (row,) = rb.reported_entries([out / "robustbench" / "tiny.json"], s)
    assert row["evaluated"] is False and row["status"] == "reported, not evaluated here"
    assert row["clean_acc"] == pytest.approx(e["clean_acc"]) and row["threat_model"] == "Linf"
    assert row["eps"] == 0.1 and "eps_mismatch" not in row["flags"]
    if "autoattack_acc" in e:
        assert row["autoattack_acc"] == pytest.approx(e["autoattack_acc"])
        assert "Not the standard AutoAttack" in row["flags"]["non_standard_autoattack"]


def test_robustbench_files_read_back(tmp_path: Path) -> None:
    folder = tmp_path / "model_info" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    for name, d in (("Carmon2019Unlabeled", CARMON), ("Xiao2020Enhancing", XIAO)):
        (folder / f"{name}.json").write_text(json.dumps(d))
    flat = tmp_path / "Carmon2019Unlabeled.json"                       # outside model_info/<ds>/<threat>/
    flat.write_text(json.dumps(CARMON))
    rows = rb.reported_entries({"carmon": folder / "Carmon2019Unlabeled.json", "b": folder / "Xiao2020Enhancing.json",
                                "c": flat, "model": "some/run/dir"}, CIFAR_LINF)
    carmon, xiao, copy = rows
    assert (carmon["name"], carmon["clean_acc"], carmon["autoattack_acc"]) == ("carmon", 0.8969, 0.5953)
    assert carmon["flags"] == {} and carmon["threat_model"] == "Linf" and carmon["eps"] == 8 / 255
    assert xiao["best_known_acc"] == pytest.approx(0.074) and set(xiao["flags"]) == {"eps_mismatch", "unreliable"}
    assert "0.031" in xiao["flags"]["eps_mismatch"] and "8/255" in xiao["flags"]["eps_mismatch"]
    assert set(copy["flags"]) == {"threat_model_unstated"}


def _bad(tmp_path: Path, name: str, content: Any) -> Path:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


@pytest.mark.parametrize("name, content, match", [
    ("x.json", "{not json", "not valid JSON"),
    ("x.json", [1, 2], "expected a JSON object"),
    ("x.json", {k: v for k, v in CARMON.items() if k != "clean_acc"}, "no clean_acc"),
    ("x.json", {**CARMON, "clean_acc": "high"}, "clean_acc must be a percent string"),
    ("x.json", {**CARMON, "autoattack_acc": "120"}, "between 0 and 100"),
    ("x.json", {**CARMON, "additional_data": "yes"}, "additional_data must be a JSON boolean"),
    ("x.json", {**CARMON, "number_forward_passes": "1"}, "number_forward_passes must be a JSON integer"),
    ("x.json", {**CARMON, "eps": "eight"}, "eps must be a number or a fraction"),
    ("x.json", {**CARMON, "dataset": "imagenet"}, "dataset 'imagenet' is not this benchmark's 'cifar10'"),
    ("x.json", {**CARMON, "threat_model": "L2"}, "threat model L2 is not this benchmark's Linf"),
    ("x.json", {k: v for k, v in CARMON.items() if k != "autoattack_acc"}, "no autoattack_acc"),
    ("model.json", {"arch": "ibp-small", "num_classes": 10}, "pass its directory instead"),
])
def test_malformed_file(tmp_path: Path, name: str, content: Any, match: str) -> None:
    p = _bad(tmp_path, name, content)
    with pytest.raises(InputError, match=match) as err:
        rb.reported_entries([p], CIFAR_LINF)
    assert str(p) in str(err.value) and str(err.value).count("\n") == 0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.json: no such file"):
        rb.reported_entries([tmp_path / "nope.json"], CIFAR_LINF)


def test_leaderboard_marks_reported_rows(bench: tuple[dict[str, Any], Path, Path], tmp_path: Path) -> None:
    """Reported rows join the ranking, marked, in results.json and report.md; they never enter the
    flags, the soundness check, the per-model sections or the model_info files."""
    res, out, _ = bench
    s = res["settings"]
    top = _bad(tmp_path, "Top2099.json", {**CARMON, "dataset": "mnist5k", "eps": "0.1", "clean_acc": "99.00",
                                          "autoattack_acc": "98.00", "threat_model": "Linf"})
    low = _bad(tmp_path, "Low.json", {**CARMON, "dataset": "mnist5k", "eps": "0.3", "clean_acc": "10.00",
                                      "autoattack_acc": "0.0", "threat_model": "Linf"})
    reported = rb.reported_entries([top, low], s)
    dest = tmp_path / "board"
    full = rep.write_all(dest, {**json.loads(json.dumps(res)), "reported": reported})
    board = full["leaderboard"]
    scores = [r.get("autoattack_acc", r.get("robust_acc")) for r in board]
    assert board[0]["name"] == "Top2099" and {r["name"] for r in board} == {"Top2099", "tiny", "Low"}
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in board] == [1, 2, 3]
    assert {r["name"]: r["evaluated"] for r in board} == {"Top2099": False, "tiny": True, "Low": False}
    assert board[0]["status"] == rb.STATUS and board[0]["source"] == str(top)
    on_disk = json.loads((dest / "results.json").read_text())
    assert on_disk["leaderboard"] == board and [e["name"] for e in on_disk["reported"]] == ["Top2099", "Low"]
    assert [e["name"] for e in on_disk["models"]] == ["tiny"] and set(on_disk["flags"]) <= {"tiny"}
    assert sorted(p.name for p in (dest / "robustbench").iterdir()) == ["tiny.json"]
    md = (dest / "report.md").read_text()
    table = md[md.index("| rank |"):].split("\n\n")[0]          # the leaderboard table
    lines = [ln for ln in table.splitlines() if not ln.startswith("|---")]
    assert lines[0].endswith("| numbers |") and "| AutoAttack |" in lines[0]
    assert lines[1].startswith("| 1 | Top2099 |") and lines[1].endswith("| reported, not evaluated here |")
    (tiny_line,) = [ln for ln in lines if "| tiny |" in ln]
    assert tiny_line.endswith("| evaluated here |") and len(lines) == 1 + 3      # header, three rows
    assert "## tiny" in md and "## Top2099" not in md and "## Low" not in md
    assert "**Flag:** reported at eps 0.3, not this benchmark's 0.1" in md
    (low_line,) = [ln for ln in lines if "| Low |" in ln]
    assert low_line.endswith("| reported, not evaluated here (flagged, see below) |")


def test_cli_leaderboard_with_reported_files(bench: tuple[dict[str, Any], Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through ``robustkit benchmark`` (needs the two-line hook in app/benchmark.py):
    an evaluated model beside a reported file; a file of another dataset exits 2 naming the file
    before any work; only reported files: a leaderboard without loading any data or model."""
    _, out, model_dir = bench
    ours = out / "robustbench" / "tiny.json"
    other = _bad(tmp_path, "Other.json", {**CARMON, "dataset": "mnist5k", "eps": "0.1", "threat_model": "Linf"})
    dest = tmp_path / "cli"
    base = ["benchmark", "--n", "10", "--eps", "0.1", "--attacks", "pgd", "--param", "pgd.steps=2",
            "--param", "pgd.restarts=1", "--eps-grid", "none"]
    assert main([*base, "--models", str(model_dir), str(other), "--out", str(dest)]) == 0
    printed = capsys.readouterr().out
    assert "Other: reported, not evaluated here: clean 0.8969  AutoAttack 0.5953" in printed
    res = json.loads((dest / "results.json").read_text())
    assert [e["name"] for e in res["models"]] == ["tiny"] and [e["name"] for e in res["reported"]] == ["Other"]
    assert "| reported, not evaluated here |" in (dest / "report.md").read_text()

    cifar = _bad(tmp_path, "Carmon.json", CARMON)
    assert main([*base, "--models", str(model_dir), str(cifar), "--out", str(tmp_path / "bad")]) == 2
    assert f"{cifar}: dataset 'cifar10' is not this benchmark's 'mnist5k'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    def no_loading(*a: Any, **k: Any) -> None:
        raise AssertionError("a benchmark of reported files only loaded data or a model")

    if not has_autoattack():          # our file then has no AutoAttack number to rank by
        return
    monkeypatch.setattr(bm, "load_data", no_loading)
    monkeypatch.setattr(bm, "load_models", no_loading)
    only = tmp_path / "only"
    assert main([*base, "--models", str(ours), str(other), "--out", str(only)]) == 0
    res = json.loads((only / "results.json").read_text())
    assert res["models"] == [] and {r["name"] for r in res["leaderboard"]} == {"Other", "tiny"}
    assert "No model was evaluated here" in (only / "report.md").read_text()
