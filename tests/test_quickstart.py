"""The main job end to end, on tiny settings: every stage runs, the report links its parts, and a
re-run resumes (skips finished stages)."""

import json

import torch

from robustkit.app.quickstart import Settings, run_quickstart

TINY = Settings(pretrain_epochs=1, finetune_epochs=1, trades_steps=2, noise_epochs=1, ibp_epochs=2, eval_n=50,
                smoothing_images=4, smoothing_n0=20, smoothing_n=200, bench_n=16, ibp_images=32,
                attack_params={"autoattack": {"attacks": ["apgd-ce"], "overrides": {"apgd.n_iter": 5}},
                               "pgd": {"steps": 5, "restarts": 1}, "fast": {"n_iter": 5}})


def test_quickstart_tiny_end_to_end(tmp_path):
    logs: list[str] = []
    report = run_quickstart(tmp_path, torch.device("cpu"), progress=False, log=logs.append, settings=TINY)
    text = report.read_text()
    assert "## Leaderboard" in text and "## Certified robustness" in text and "## Training curves" in text
    for stage in ("standard", "finetune", "noise", "ibp"):
        assert (tmp_path / stage / "checkpoints" / "best" / "model.safetensors").is_file()
        assert (tmp_path / stage / "plots" / "training_curves.png").is_file()
    bench = json.loads((tmp_path / "benchmark" / "results.json").read_text())
    assert [e["name"] for e in bench["models"]] and all(e["robust_acc"] <= e["clean_acc"] for e in bench["models"])
    cert = json.loads((tmp_path / "certify" / "results.json").read_text())
    ibp_curve = cert["ibp"]["ibp"]["curve"]
    assert ibp_curve["certified_accuracy"] == sorted(ibp_curve["certified_accuracy"], reverse=True)
    assert (tmp_path / "certify" / "plots" / "smoothing_certified_accuracy.png").is_file()
    logs.clear()
    run_quickstart(tmp_path, torch.device("cpu"), progress=False, log=logs.append, settings=TINY)
    assert sum("done already" in m for m in logs) == 4  # the four training stages are skipped on a re-run


# -- --full: the plan only (the full run takes half an hour; it is never run in the tests) ---------------------------
def test_full_plan_from_the_cli(tmp_path, capsys):
    from robustkit.cli import main

    out = tmp_path / "full"
    assert main(["quickstart", "--full", "--plan", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quickstart on fashion-mnist" in text and "first 10000 test images" in text
    assert "APGD-CE + APGD-DLR (AutoAttack's code; NOT standard AutoAttack)" in text
    assert "on 10000 test images" in text and "n=10000" in text and not out.exists()
    assert main(["quickstart", "--data-root", str(tmp_path)]) == 2          # --data-root only with --full
    assert "--data-root is for --full" in capsys.readouterr().err


def test_full_settings_match_the_recipes(tmp_path):
    """The full run is what configs/*_fashion_full.yaml say (so the recipes cannot drift from it)."""
    from pathlib import Path

    from robustkit.app.quickstart import autoattack_label, benchmark_config, stage_configs
    from robustkit.config import BenchmarkConfig, CertifyConfig, TrainConfig, load_config, to_dict

    s = Settings.full()
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert s.dataset == "fashion-mnist" and s.n_train is None and s.bench_n == s.ibp_images == 10_000
    stages = stage_configs(s, tmp_path)
    for stage, recipe in (("standard", "train"), ("finetune", "finetune"), ("noise", "noise"), ("ibp", "ibp")):
        want = to_dict(stages[stage])
        want["model"]["pretrained"] = None                                  # the recipe takes --model
        assert to_dict(load_config(configs / f"{recipe}_fashion_full.yaml", [], TrainConfig)) == want, stage
    sm = load_config(configs / "certify_smoothing_fashion_full.yaml", [], CertifyConfig)
    assert (sm.dataset, sm.n_images, sm.smoothing.sigma, sm.smoothing.n0, sm.smoothing.n, sm.smoothing.alpha) == \
        (s.dataset, s.smoothing_images, s.sigma, s.smoothing_n0, s.smoothing_n, s.alpha)
    ibp = load_config(configs / "certify_ibp_fashion_full.yaml", [], CertifyConfig)
    assert (ibp.dataset, ibp.n_images, float(ibp.bounds.eps)) == (s.dataset, s.ibp_images, s.ibp_eps)
    bench = to_dict(load_config(configs / "benchmark_fashion_full.yaml", [], BenchmarkConfig))
    ours = to_dict(benchmark_config(tmp_path, s))
    keys = ("dataset", "norm", "eps", "n", "attacks", "attack_params", "certify", "eps_grid", "seed")
    assert {k: bench[k] for k in keys} == {k: ours[k] for k in keys}
    assert "NOT standard AutoAttack" in autoattack_label(s) and autoattack_label(Settings()) == "AutoAttack"
