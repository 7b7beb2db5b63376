"""Common corruptions (Hendrycks & Dietterich 2019, CIFAR-10-C definitions): the transforms, the
metrics (CE / mCE) and ``robustkit corruptions`` end to end on mnist5k."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import robustkit.cli as cli
from robustkit._corruptions import NAMES, corrupt
from robustkit._corruptions.weather import FROST
from robustkit._corruptions_config import CorruptionsConfig, corruption_names, severity_list
from robustkit.app.corruptions import accuracy_table, corruption_errors, corruption_seeds, evaluate_corruptions
from robustkit.config import from_dict, load_yaml
from robustkit.data import load_data, to_float
from robustkit.errors import ConfigError, InputError
from robustkit.zoo import save

RANDOM = set(NAMES) - {"defocus_blur", "zoom_blur", "contrast", "brightness", "pixelate", "jpeg_compression"}


@pytest.fixture(scope="module")
def gray() -> torch.Tensor:
    """32 mnist5k test images, all classes: ``(32, 1, 28, 28)`` in [0, 1]."""
    return to_float(load_data("mnist5k", "test").images[::31][:32])


@pytest.fixture(scope="module")
def rgb(gray) -> torch.Tensor:
    """The digits at 32 px in random foreground / background colours: ``(32, 3, 32, 32)``."""
    g = torch.Generator().manual_seed(0)
    fg, bg = torch.rand(32, 3, 1, 1, generator=g), torch.rand(32, 3, 1, 1, generator=g)
    d = F.interpolate(gray, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    return d * fg + (1 - d) * bg


def _images(gray, rgb, c: int, size: int) -> torch.Tensor:
    x = gray if c == 1 else rgb
    return x[:6] if x.shape[-1] == size else F.interpolate(x[:6], size=size, mode="bilinear").clamp(0, 1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("c,size", [(1, 28), (3, 32), (1, 32), (3, 28)])
def test_shape_range_dtype_and_determinism(name, c, size, gray, rgb):
    x = _images(gray, rgb, c, size)
    before = x.clone()
    seeds = torch.arange(10, 10 + x.shape[0])
    for s in (1, 5):
        y = corrupt(x, name, s, seeds)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x)                                          # every severity >= 1 changes it
        assert torch.equal(corrupt(x, name, s, seeds), y)                     # same seeds, same images
        assert torch.equal(corrupt(x[2:4], name, s, seeds[2:4]), y[2:4])      # an image depends on itself only
    assert torch.equal(x, before)                                             # input untouched
    assert torch.equal(corrupt(x, name, 0, seeds), x)                         # severity 0 = clean
    if name in RANDOM:
        assert not torch.equal(corrupt(x, name, 3, seeds + 1), corrupt(x, name, 3, seeds))


def _distance(x: torch.Tensor, name: str) -> list[float]:
    """Mean L2 distance to the clean images at severities 0..5 (same seeds at every severity)."""
    seeds = torch.arange(x.shape[0])
    return [float((corrupt(x, name, s, seeds) - x).flatten(1).norm(dim=1).mean()) for s in range(6)]


NON_MONOTONE = ("glass_blur", "frost", "elastic_transform")   # by their CIFAR-C tables, see below


@pytest.mark.parametrize("name", [n for n in NAMES if n not in NON_MONOTONE])
def test_severity_monotone_in_distance(name, gray, rgb):
    for x in (gray, rgb):
        d = _distance(x, name)
        assert d[0] == 0 and d[1] > 0
        # motion blur: severities 3 and 4 differ only in the kernel's negligible tail (radius 6 vs 8 at
        # sigma 2) -- in CIFAR-10-C too (RobustBench's Standard model: 74.4 % vs 74.8 %)
        assert all(b >= a - 1e-3 * d[-1] for a, b in zip(d, d[1:])), (name, d)
        assert d[5] > d[1]


def test_the_three_non_monotone_tables_behave_as_in_cifar10c(gray, rgb):
    """Glass blur, frost and elastic are not monotone in pixel distance by their CIFAR-C tables."""
    for x in (gray, rgb):
        # glass blur (sigma, iterations) = (.05, 1), (.25, 1), (.4, 1), (.25, 2), (.4, 2): severity 3 (more
        # blur, one pass) moves least of 1-3, severity 4 (two passes) most -- the order of CIFAR-10-C's own
        # accuracies (RobustBench Standard: 53.4, 55.7, 57.0, 43.2, 45.7 %)
        d = _distance(x, "glass_blur")
        assert d[3] < min(d[1], d[2]) and d[4] == max(d[1:])
        # elastic: the affine jitter (0.08 .. 0.03 of the image size) dominates the pixel distance and
        # shrinks with severity while the local displacement grows
        d = _distance(x, "elastic_transform")
        assert all(b <= a + 1e-6 for a, b in zip(d[1:], d[2:])) and d[5] > 0
        # frost = clip(a x + b F): with the same seed the same texture F at every severity, the image
        # weight a falls and the frost weight b rises (so b / a rises)
        seeds = torch.arange(x.shape[0])
        ys = [corrupt(x, "frost", s, seeds) for s in range(1, 6)]
        share = [b / a for a, b in FROST]
        assert all(q > p for p, q in zip(share, share[1:]))
        ok = torch.stack([(y < 1) for y in ys]).all(0)                        # pixels no severity clips
        tex = [((y - a * x) / b)[ok] for y, (a, b) in zip(ys, FROST)]
        assert ok.float().mean() > 0.3
        for t in tex[1:]:
            assert torch.allclose(t, tex[0], atol=1e-4)


def test_bad_input_raises_one_clear_error(gray):
    seeds = torch.arange(4)
    x = gray[:4]
    for bad, match in [(lambda: corrupt(x, "rain", 1, seeds), "valid corruptions: gaussian_noise"),
                       (lambda: corrupt(x, "fog", 6, seeds), "severity must be an integer 0..5"),
                       (lambda: corrupt(x, "fog", True, seeds), "severity"),
                       (lambda: corrupt(x.repeat(1, 2, 1, 1), "fog", 1, seeds), "1 \\(gray\\) or 3 \\(RGB\\)"),
                       (lambda: corrupt(x[..., :8, :8], "fog", 1, seeds), "16 to 64 px"),
                       (lambda: corrupt(x[0], "fog", 1, seeds), "\\(B, C, H, W\\)"),
                       (lambda: corrupt(x, "fog", 1, seeds[:3]), "one seed per image")]:
        with pytest.raises(InputError, match=match):
            bad()
    assert corrupt(x, "Gaussian-Noise", 1, seeds).shape == x.shape        # names as RobustBench's or dashed


def test_config_names_and_severities():
    assert corruption_names("all") == list(NAMES) and corruption_names(None) == list(NAMES)
    assert corruption_names("fog, gaussian-noise,fog") == ["gaussian_noise", "fog"]        # paper order, no repeats
    assert severity_list("5,1,3") == [1, 3, 5] and severity_list(2) == [2] and severity_list(None) == [1, 2, 3, 4, 5]
    for bad in ("0", "6", "x", ""):
        with pytest.raises(ConfigError):
            severity_list(bad)
    with pytest.raises(ConfigError, match="corruptions: unknown corruption 'rain'"):
        CorruptionsConfig(corruptions="rain")
    cfg = from_dict(CorruptionsConfig, load_yaml("configs/corruptions_fashion_full.yaml"))
    assert cfg.dataset == "fashion-mnist" and cfg.corruptions == list(NAMES) and cfg.severities == [1, 2, 3, 4, 5]


def test_seeds_differ_per_corruption_severity_and_image():
    idx = torch.arange(4)
    seen = {tuple(corruption_seeds(s, c, v, idx).tolist()) for s in (0, 1) for c in NAMES for v in range(1, 6)}
    assert len(seen) == 2 * 15 * 5
    assert len(set(corruption_seeds(0, "fog", 1, idx).tolist())) == 4


def test_metrics_and_batch_size_invariance(tiny_mnist_model, gray):
    x, y = gray[:12], load_data("mnist5k", "test").labels[::31][:12]
    names, sev = ["gaussian_noise", "fog", "glass_blur"], [1, 5]
    a = evaluate_corruptions({"m": tiny_mnist_model}, x, y, torch.arange(12), names, sev, batch_size=5)
    b = evaluate_corruptions({"m": tiny_mnist_model}, x, y, torch.arange(12), names, sev, batch_size=12)
    assert torch.equal(a["correct"]["m"], b["correct"]["m"]) and torch.equal(a["clean"]["m"], b["clean"]["m"])
    t = accuracy_table(a["clean"]["m"], a["correct"]["m"], names, sev)
    acc = a["correct"]["m"].float().mean(2)
    assert t["corruptions_acc"] == pytest.approx(float(acc.mean()))
    assert t["corruptions_acc_fog"] == pytest.approx(float(acc[1].mean()))
    assert t["corruption_accuracy"]["glass_blur"]["5"] == pytest.approx(float(acc[2, 1]))
    self_ce = corruption_errors(t, t, names, sev)
    assert all(v == pytest.approx(100) for v in self_ce["ce"].values() if v is not None)
    # a model with half the baseline's errors: CE 50 on every corruption
    base = {"clean_accuracy": 0.5, "corruption_accuracy": {c: {"1": 0.4, "5": 0.2} for c in names}}
    half = {"clean_accuracy": 0.75, "corruption_accuracy": {c: {"1": 0.7, "5": 0.6} for c in names}}
    ce = corruption_errors(half, base, names, sev)
    assert ce["mce"] == pytest.approx(50) and ce["mce_over"] == 3
    # relative: (0.3 + 0.4 - 2 * 0.25) / (0.6 + 0.8 - 2 * 0.5) = 0.2 / 0.4
    assert ce["relative_mce"] == pytest.approx(50)


# -- the CLI ------------------------------------------------------------------------------------
@pytest.fixture(autouse=False)
def only_corruptions(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["corruptions"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_mnist_model):
    return str(save(tiny_mnist_model, tmp_path_factory.mktemp("model") / "m"))


def _run(*argv: str) -> int:
    return cli.main(["corruptions", *argv, "--device", "cpu"])


def test_cli_writes_results_heatmap_and_robustbench_files(only_corruptions, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run("--model", model_dir, "--baseline", model_dir, "--n", "6", "--batch-size", "4", "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 6 and res["corruptions"] == list(NAMES) and res["severities"] == [1, 2, 3, 4, 5]
    assert set(res["corruption_accuracy"]) == set(NAMES)
    acc = [res["corruption_accuracy"][c][str(s)] for c in NAMES for s in range(1, 6)]
    assert all(0 <= a <= 1 and round(a * 6) == pytest.approx(a * 6) for a in acc)        # k / 6
    assert res["corruptions_acc"] == pytest.approx(sum(acc) / 75)
    assert all(f"corruptions_acc_{c}" in res for c in NAMES)
    assert res["mce"] == pytest.approx(100)                                     # the baseline against itself
    info = json.loads((out / "model_info.json").read_text())
    assert info["eps"] is None and info["corruptions_acc"] == f"{100 * res['corruptions_acc']:.2f}"
    assert info["corruptions_mce"] == "100.00" and info["threat_model"] == "corruptions"
    csv = (out / "unaggregated_results.csv").read_text().splitlines()
    assert csv[0].startswith(",gaussian_noise,gaussian_noise") and csv[1].startswith(",1,2,3,4,5,1") and len(csv) == 3
    assert (out / "plots" / "corruption_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mCE 100.00" in (out / "report.md").read_text()
    assert "mean corruption accuracy" in capsys.readouterr().out
    # the baseline as an earlier run's results.json: the same numbers, on the same images
    again = tmp_path / "again"
    assert _run("--model", model_dir, "--baseline", str(out / "results.json"), "--n", "6", "--corruptions",
                "fog,glass_blur", "--severities", "2,5", "--out", str(again)) == 0
    res2 = json.loads((again / "results.json").read_text())
    assert res2["corruption_accuracy"] == {c: {s: res["corruption_accuracy"][c][s] for s in ("2", "5")}
                                           for c in ("glass_blur", "fog")}
    assert res2["mce"] == pytest.approx(100) and res2["severities"] == [2, 5]


@pytest.mark.parametrize("argv,match", [
    (["--corruptions", "rain"], "unknown corruption 'rain'"),
    (["--severities", "1,7"], "each severity is an integer 1..5"),
    (["--n", "5000"], "n=5000 is more than the 1000 test images"),
    (["--dataset", "cifar10"], ""),
    (["--baseline", "RESULTS"], "scored on other images"),
    (["--baseline", "missing/results.json"], "not a robustkit corruptions results.json"),
    (["--seed", "-1"], "seed must be >= 0"),
])
def test_cli_bad_input_exits_2_with_one_line(only_corruptions, model_dir, tmp_path, capsys, argv, match):
    if "RESULTS" in argv:
        f = tmp_path / "results.json"
        f.write_text(json.dumps({"format": "robustkit-corruptions/1", "dataset": "mnist5k", "n": 99, "seed": 0}))
        argv = [str(f) if a == "RESULTS" else a for a in argv]
    out = tmp_path / "out"
    assert _run("--model", model_dir, "--n", "4", "--out", str(out), *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustkit: error: ") and "\n" not in err and match in err
    assert not out.exists()                                                     # nothing written


def test_cli_output_path_is_checked_before_work(only_corruptions, model_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert _run("--model", model_dir, "--n", "4", "--out", str(f / "sub")) == 2
    assert "is a file" in capsys.readouterr().err
    assert _run("--n", "4", "--out", str(tmp_path / "o")) == 2
    assert "needs a model" in capsys.readouterr().err


def test_benchmark_entry_gets_corruptions_acc(tiny_mnist_model, tmp_path):
    from robustkit.app.benchmark import benchmark
    from robustkit.config import BenchmarkConfig

    cfg = BenchmarkConfig(n=6, attacks="pgd", attack_params={"pgd": {"steps": 2, "restarts": 1}}, eps_grid="none",
                          corruptions="fog,contrast", batch_size=6, out=str(tmp_path / "bench"))
    assert cfg.corruptions == ["fog", "contrast"] and BenchmarkConfig().corruptions is None
    res = benchmark(cfg, {"tiny": tiny_mnist_model}, progress=False)
    e = res["models"][0]
    assert res["settings"]["corruptions"] == ["fog", "contrast"]
    assert e["corruptions_acc"] == pytest.approx((e["corruptions_acc_fog"] + e["corruptions_acc_contrast"]) / 2)
    assert "corruptions_acc_snow" not in e and "corruptions" in e["seconds"]
    assert "| corruptions |" in (tmp_path / "bench" / "report.md").read_text()
    with pytest.raises(ConfigError, match="unknown corruption"):
        BenchmarkConfig(corruptions="rain")


def test_cli_resume_computes_only_missing_batches(only_corruptions, model_dir, tmp_path, monkeypatch, capsys):
    import robustkit.app.corruptions as app

    out = tmp_path / "out"
    base = ["--model", model_dir, "--n", "6", "--batch-size", "2", "--corruptions", "fog", "--severities", "1,4",
            "--out", str(out)]
    assert _run(*base) == 0
    first = json.loads((out / "results.json").read_text())
    units = sorted((out / "parts").glob("unit-*.json"))
    assert len(units) == 3                                                     # one file per batch of 2
    units[1].unlink()
    calls = []
    real = app.corrupt
    monkeypatch.setattr(app, "corrupt", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert _run(*base, "--resume") == 0
    assert calls == ["fog", "fog"]                                              # one batch, two severities
    again = json.loads((out / "results.json").read_text())
    assert (again["corruption_accuracy"], again["clean_accuracy"]) == (first["corruption_accuracy"],
                                                                       first["clean_accuracy"])
    capsys.readouterr()
    assert _run(*base, "--resume", "--seed", "1") == 2                         # other settings: not mixed in
    assert "different settings" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_same_results(model_dir, tmp_path):
    from _torchrun import robustkit as run_robustkit

    argv = ["corruptions", "--model", model_dir, "--n", "6", "--batch-size", "2", "--corruptions", "glass_blur,fog",
            "--severities", "1,5", "--device", "cpu"]
    one = run_robustkit([*argv, "--out", str(tmp_path / "one")])
    two = run_robustkit([*argv, "--out", str(tmp_path / "two")], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert r1["corruption_accuracy"] == r2["corruption_accuracy"] and r1["clean_accuracy"] == r2["clean_accuracy"]
