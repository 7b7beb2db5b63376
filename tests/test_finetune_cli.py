"""``robustkit finetune`` / ``train`` flags: starts from the pretrained weights, exact resume, clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from defenses.trainer import Trainer
from robustkit.cli import main
from robustkit.commands._train_args import add_train_args, config_from_args
from robustkit.zoo import create, save

# a few steps on 64 images: 1-step TRADES + AWP, no per-epoch attack
FAST = ["--dataset", "mnist5k", "--batch-size", "32", "--eval-n", "50", "--set", "data.n_train=64",
        "--set", "eval.attack=null", "--set", "defense.params.preset=mnist", "--set", "defense.params.steps=1",
        "--set", "defense.params.step_size=0.3", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    torch.manual_seed(123)
    return str(save(create("ibp-small", 10, (1, 28, 28)), tmp_path_factory.mktemp("pre") / "model"))


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def test_flags_map_onto_the_config(tmp_path):
    p = argparse.ArgumentParser()
    add_train_args(p)
    (tmp_path / "c.yaml").write_text("seed: 7\noptim: {lr: 0.3, momentum: 0.8}\ndefense: {name: mart}\n")
    args = p.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.05", "--defense", "trades", "--eps",
                         "8/255", "--beta", "3", "--weight-perturbation", "rwp", "--epochs", "4", "--set",
                         "defense.wp_params.c_min=2", "--set", "optim.lr=0.07", "--out", str(tmp_path / "r")])
    cfg = config_from_args(args, base={"schedule": {"name": "slow-start-fast-decay"}})
    assert (cfg.seed, cfg.optim.momentum, cfg.optim.lr, cfg.epochs) == (7, 0.8, 0.07, 4)  # --set wins over --lr
    assert cfg.defense.name == "trades" and cfg.defense.params == {"eps": "8/255", "beta": 3.0}
    assert cfg.defense.weight_perturbation == "rwp" and cfg.defense.wp_params == {"c_min": 2}
    assert cfg.eval.eps == "8/255" and cfg.schedule.name == "slow-start-fast-decay" and args.seed == 7


@pytest.mark.parametrize("plain_state_dict", [False, True])
def test_finetune_starts_from_the_pretrained_weights(pretrained, tmp_path, plain_state_dict):
    """With lr = 0 (and AWP restoring bit-exactly) the fine-tuned weights are the pretrained ones."""
    src = pretrained
    extra: list[str] = []
    if plain_state_dict:  # a bare classifier state dict, as papers release them
        from robustkit.zoo import load

        src = str(tmp_path / "net.pt")
        torch.save(load(pretrained).net.state_dict(), src)
        extra = ["--arch", "ibp-small"]
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", src, *extra, "--weight-perturbation", "awp", "--epochs", "1", "--lr", "0",
               "--out", str(out), *FAST])
    assert rc == 0
    before = load_file(str(Path(pretrained) / "model.safetensors"))
    after = weights(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "slow-start-fast-decay" in (out / "config.yaml").read_text()


def test_resume_mid_finetune_matches_an_uninterrupted_run(pretrained, tmp_path, monkeypatch):
    common = ["finetune", "--model", pretrained, "--weight-perturbation", "awp", "--epochs", "2", "--lr", "0.05",
              "--checkpoint-every", "1", *FAST]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    calls = {"n": 0}
    real = Trainer._train_step

    def crash_at_step_3(self, x, y, ctx):
        calls["n"] += 1
        if calls["n"] == 4:  # steps 0-2 done (and checkpointed), interrupted in step 3 (epoch 2)
            raise KeyboardInterrupt
        return real(self, x, y, ctx)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_3)
    assert main([*common, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(Trainer, "_train_step", real)
    assert main(["finetune", "--out", str(tmp_path / "b"), "--resume", "--device", "cpu"]) == 0  # its config.yaml
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, message", [
    (["--defense", "nope"], "valid defenses"),
    (["--weight-perturbation", "awp", "--set", "defense.wp_params.gamma=-1"], "gamma must be"),
    (["--set", "defense.params.beta=-2"], "beta must be"),
    (["--schedule", "zigzag"], "unknown LR schedule"),
    (["--arch", "ibp-medium"], "pretrained model is 'ibp-small'"),
])
def test_bad_input_exits_2_with_a_clear_message(pretrained, tmp_path, capsys, argv, message):
    rc = main(["finetune", "--model", pretrained, "--epochs", "1", "--out", str(tmp_path / "r"), *FAST, *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("robustkit: error:") and message in err and "Traceback" not in err


def test_missing_or_mismatched_pretrained_exit_2(pretrained, tmp_path, capsys):
    rc = main(["finetune", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r"), *FAST])
    assert rc == 2 and "pretrained model not found" in capsys.readouterr().err
    rc = main(["finetune", "--out", str(tmp_path / "r"), *FAST])
    assert rc == 2 and "needs a pretrained model" in capsys.readouterr().err
    sd = tmp_path / "other.pt"
    torch.save(create("lenet", 10, (1, 28, 28)).net.state_dict(), sd)
    rc = main(["finetune", "--model", str(sd), "--arch", "ibp-small", "--out", str(tmp_path / "r2"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match model 'ibp-small'" in err
