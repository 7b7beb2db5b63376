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
