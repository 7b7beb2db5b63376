"""``robustkit certify`` end to end on a tiny saved model: outputs, resume, bad input -> exit 2."""

from __future__ import annotations

import json

import pytest
import torch

import robustkit.cli as cli
from robustkit.commands import COMMANDS
from robustkit.zoo import save


@pytest.fixture(autouse=True)
def _only_certify(monkeypatch):
    """Build the parser with the certify command alone (other commands are tested elsewhere),
    and use one thread (tiny model, shared cores)."""
    monkeypatch.setattr(cli, "COMMANDS", ["certify"])
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_mnist_model):
    return str(save(tiny_mnist_model, tmp_path_factory.mktemp("model") / "m"))


def _run(*argv: str) -> int:
    return cli.main(["certify", *argv, "--device", "cpu"])


SMALL = ("--n0", "10", "--n", "200", "--batch-size", "400", "--sigma", "0.25", "--alpha", "0.01")


def test_certify_is_a_command():
    assert "certify" in COMMANDS


def test_smoothing_end_to_end(model_dir, tmp_path):
    out = tmp_path / "out"
    assert _run("--model", model_dir, *SMALL, "--n-images", "5", "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["certifier"] == "smoothing" and res["n"] == 5 and res["norm"] == "l2" and not res["deterministic"]
    assert res["params"]["n"] == 200 and res["params"]["sigma"] == 0.25 and res["params"]["alpha"] == 0.01
    rec = res["per_sample"]
    assert [r["index"] for r in rec] == [0, 1, 2, 3, 4]
    for r in rec:
        assert set(r) >= {"prediction", "radius", "abstained", "correct", "samples", "pA_lower"}
        assert r["samples"] == 210
        assert (r["radius"] == 0) == r["abstained"]
    ca = res["curve"]
    assert ca["radius"][0] == 0 and len(ca["radius"]) == len(ca["certified_accuracy"]) == 17
    assert ca["radius"][4] == 0.25 and ca["radius"][-1] == 1.0                 # the one grid: 0 .. 4 sigma
    assert all(a >= b for a, b in zip(ca["certified_accuracy"], ca["certified_accuracy"][1:]))  # non-increasing
    assert ca["certified_accuracy"][0] == sum(r["correct"] for r in rec) / 5
    acr = sum(r["radius"] for r in rec if r["correct"]) / 5
    assert res["average_certified_radius"] == pytest.approx(acr) and res["abstain_rate"] <= 1
    assert res["seconds"] > 0 and res["samples"]["mean"] == 210
    assert "probability >= 1 - alpha" in res["guarantee"]
    report = (out / "report.md").read_text()
    assert "| radius (L2) | certified accuracy |" in report and "0.2500" in report
    assert (out / "plots" / "certified_accuracy.png").stat().st_size > 1000
    assert (out / "per_image.json").is_file()


def test_sequential_end_to_end(model_dir, tmp_path):
    out = tmp_path / "seq"
    assert _run("--model", model_dir, "--n0", "10", "--n", "2000", "--batch-size", "500", "--sequential",
                "--tol", "0.1", "--n-images", "3", "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["params"]["sequential"] is True and res["params"]["tol"] == 0.1
    assert all(10 + 100 <= r["samples"] <= 10 + 2000 for r in res["per_sample"])
    assert "confidence sequence" in res["guarantee"]


def test_resume_skips_done_images(model_dir, tmp_path):
    out = tmp_path / "res"
    assert _run("--model", model_dir, *SMALL, "--n-images", "3", "--out", str(out)) == 0
    partial = out / "per_image.json"
    state = json.loads(partial.read_text())
    assert [r["index"] for r in state["records"]] == [0, 1, 2]
    state["records"][1]["seconds"] = 123.0                                    # marker: must survive the resume
    partial.write_text(json.dumps(state))
    assert _run("--model", model_dir, *SMALL, "--n-images", "6", "--out", str(out), "--resume") == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["index"] for r in res["per_sample"]] == list(range(6))
    assert res["per_sample"][1]["seconds"] == 123.0
    # settings changed -> refuse to mix, exit 2
    assert _run("--model", model_dir, *SMALL[:-4], "--sigma", "0.5", "--alpha", "0.01", "--n-images", "6",
                "--out", str(out), "--resume") == 2


@pytest.mark.parametrize("argv, message", [
    (("--sigma", "-1"), "sigma must be a number > 0"),
    (("--n0", "500", "--n", "100"), "n0 must be <= n"),
    (("--alpha", "1.5"), "alpha must be in (0, 1)"),
    (("--n-images", "100000"), "more than the"),
    (("--dataset", "nope"), "unknown dataset"),
])
def test_bad_input_exits_2(model_dir, tmp_path, capsys, argv, message):
    rc = _run("--model", model_dir, "--n", "100", "--n0", "10", *argv, "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.startswith("robustkit: error:") and err.count("\n") == 1


def test_missing_model_exits_2(tmp_path, capsys):
    assert _run("--model", str(tmp_path / "absent"), "--out", str(tmp_path / "o")) == 2
    assert "model not found" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_ibp_end_to_end(model_dir, tmp_path, method):
    out = tmp_path / method
    assert _run("--model", model_dir, "--method", method, "--eps", "0.05", "--radius", "--n-images", "6",
                "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["certifier"] == method and res["deterministic"] and res["norm"] == "linf" and res["n"] == 6
    assert res["params"]["eps"] == 0.05 and res["params"]["tol"] == 1e-3 and res["params"]["max_eps"] == 1.0
    rec = res["per_sample"]
    assert not any(r["abstained"] for r in rec) and all(0 <= r["radius"] <= 1.0 for r in rec)
    assert res["curve"]["radius"][4] == 0.05                                     # eps is on the grid
    assert res["curve"]["certified_accuracy"][4] == sum(r["correct"] and r["radius"] >= 0.05 for r in rec) / 6
    assert res["clean_accuracy"] == res["curve"]["certified_accuracy"][0] and res["samples"] is None
    assert (out / "report.md").is_file() and (out / "plots" / "certified_accuracy.png").is_file()


def test_config_recipe_and_set_overrides(model_dir, tmp_path):
    """--config + flags + --set: flags override the recipe, --set overrides both; unknown keys exit 2."""
    out = tmp_path / "cfg"
    assert _run("--config", "configs/certify_smoothing_mnist5k.yaml", "--model", model_dir, "--n", "100",
                "--set", "smoothing.n0=10", "--set", "n_images=2", "--set", f"out={out}", "--n0", "50") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["params"]["n"] == 100 and res["params"]["n0"] == 10 and res["n"] == 2
    assert _run("--config", "configs/certify_ibp_mnist5k.yaml", "--model", model_dir, "--set", "n_images=3",
                "--set", f"out={tmp_path / 'ibp'}") == 0
    assert json.loads((tmp_path / "ibp" / "results.json").read_text())["certifier"] == "ibp"
    assert _run("--model", model_dir, "--set", "smoothing.nope=1", "--out", str(tmp_path / "x")) == 2
