"""The CLI's error boundary (design contract 10): bad input is one line ``robustkit: error: ...`` and
exit 2, with nothing written; anything else is a bug: exit 1 and one line that says so and how to
get the traceback; ``ROBUSTKIT_DEBUG=1`` re-raises. Every case fails before any model runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustkit.cli import main
from robustkit.errors import ConfigError, InputError, RobustkitError
from robustkit.registry import DEFENSES, Registry, RegistryError
from robustkit.zoo import create, save


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("ROBUSTKIT_DEBUG", raising=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """An mnist-shaped 10-class model and a 5-class one (incompatible with every 10-class dataset)."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    return {"mnist": str(save(create("ibp-small", 10, (1, 28, 28)), d / "mnist")),
            "five": str(save(create("ibp-small", 5, (1, 28, 28)), d / "five"))}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("robustkit: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


TRAIN = ["--dataset", "mnist5k", "--epochs", "1", "--set", "data.n_train=32", "--set", "eval.attack=null",
         "--device", "cpu"]

# (argv with {mnist}/{five}/{out} placeholders, words the message must contain)
BAD_INPUT = [
    (["eval", "--model", "{out}/no-such-run", "--device", "cpu"], "model not found"),
    (["eval", "--model", "{mnist}", "--dataset", "no-such-data", "--device", "cpu"], "valid datasets: "),
    (["eval", "--model", "{mnist}", "--device", "tpu"], "unknown device 'tpu'"),
    (["eval", "--model", "{mnist}", "--device", "cuda:99"], "cuda:99"),
    (["eval", "--model", "{five}", "--device", "cpu"], "model has 5 classes, dataset 'mnist5k' has 10"),
    (["eval", "--model", "{mnist}", "--n", "0", "--device", "cpu"], "must be >= 1"),
    (["attack", "--model", "{mnist}", "--attack", "no-such-attack", "--n", "4", "--device", "cpu", "--out",
      "{out}/r"], "no-such-attack"),
    (["attack", "--model", "{mnist}", "--attack", "pgd", "--eps", "lots", "--n", "4", "--device", "cpu",
      "--out", "{out}/r"], "eps"),
    (["train", "--model", "ibp-small", "--defense", "no-such-defense", "--out", "{out}/r", *TRAIN],
     "valid defenses: "),
    (["train", "--model", "ibp-small", "--eps", "lots", "--out", "{out}/r", *TRAIN], "eps"),
    (["train", "--model", "ibp-small", "--set", "optim.lrate=0.1", "--out", "{out}/r", *TRAIN],
     "unknown config key optim.lrate"),
    (["train", "--model", "ibp-small", "--set", "defense.params.nope=1", "--out", "{out}/r", *TRAIN],
     "defense.params for 'standard'"),
    (["train", "--model", "ibp-small", "--set", "model.kwargs.depth=3", "--out", "{out}/r", *TRAIN],
     "model.kwargs for 'ibp-small'"),
    (["train", "--model", "ibp-small", "--set", "optim.momentum=-1", "--out", "{out}/r", *TRAIN],
     "optim.momentum must be >= 0"),
    (["train", "--model", "ibp-small", "--defense", "trades", "--set", "defense.params.steps=many", "--out",
      "{out}/r", *TRAIN], "steps must be an integer"),
    (["train", "--model", "ibp-small", "--out", "{out}/r", *TRAIN, "--device", "tpu"], "unknown device"),
    (["train", "--model", "no-such-arch", "--out", "{out}/r", *TRAIN], "pretrained model not found"),
    (["train", "--model", "ibp-small", "--resume", "--out", "{out}/r", *TRAIN], "nothing to resume"),
    (["finetune", "--model", "{mnist}", "--dataset", "cifar10", "--epochs", "1", "--device", "cpu", "--out",
      "{out}/r"], "expects inputs (1, 28, 28), but dataset 'cifar10' has (3, 32, 32)"),
    (["finetune", "--model", "{five}", "--out", "{out}/r", *TRAIN], "model has 5 classes"),
]


@pytest.mark.parametrize("argv, words", BAD_INPUT, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD_INPUT)])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(models, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    argv = [a.format(out=out, **models) for a in argv]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert words in err, err
    assert not out.exists(), f"{sorted(p.name for p in out.rglob('*'))} written before the input was rejected"


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "three", "--out", "x"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [KeyError("some_key"), TypeError("unsupported operand"), ValueError("boom"),
                                 RuntimeError("shape mismatch")])
def test_a_bug_exits_1_and_says_so(models, tmp_path, capsys, monkeypatch, exc):
    """An exception that is not a RobustkitError -- even a ValueError / KeyError -- is a bug."""
    import robustkit.app.eval as eval_cmd
    import robustkit.app.train as pipeline

    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(pipeline, "build_schedule", broken)
    assert main(["train", "--model", "ibp-small", "--out", str(tmp_path / "r"), *TRAIN]) == 1
    monkeypatch.setattr(eval_cmd, "clean_accuracy", broken)
    assert main(["eval", "--model", models["mnist"], "--n", "8", "--device", "cpu"]) == 1
    for err in capsys.readouterr().err.splitlines():
        assert err.startswith("robustkit: internal error (this is a bug in robustkit"), err
        assert f"{type(exc).__name__}: " in err and str(exc.args[0]) in err and "ROBUSTKIT_DEBUG=1" in err


def test_debug_reraises_bugs_and_user_errors(models, capsys, monkeypatch):
    import robustkit.app.eval as eval_cmd

    monkeypatch.setenv("ROBUSTKIT_DEBUG", "1")

    def broken(*args, **kwargs):
        raise KeyError("some_key")

    monkeypatch.setattr(eval_cmd, "clean_accuracy", broken)
    with pytest.raises(KeyError, match="some_key"):
        main(["eval", "--model", models["mnist"], "--n", "8", "--device", "cpu"])
    with pytest.raises(RobustkitError, match="unknown device"):
        main(["eval", "--model", models["mnist"], "--device", "tpu"])
    monkeypatch.setenv("ROBUSTKIT_DEBUG", "0")  # "0" means off
    assert main(["eval", "--model", models["mnist"], "--device", "tpu"]) == 2


def test_keyboard_interrupt_exits_130(models, capsys, monkeypatch):
    import robustkit.app.eval as eval_cmd

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cmd, "clean_accuracy", interrupted)
    assert main(["eval", "--model", models["mnist"], "--n", "8", "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "robustkit: interrupted\n"


def test_error_types():
    """RegistryError is bad input (exit 2) and still a KeyError / ValueError for library callers."""
    r: Registry = Registry("widget")
    with pytest.raises(RegistryError) as e:
        r.get("gamma")
    assert isinstance(e.value, InputError) and isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert str(e.value) == "unknown widget 'gamma'; valid widgets: (none registered)"  # no KeyError quotes
    assert issubclass(ConfigError, InputError) and issubclass(InputError, ValueError)


@pytest.mark.parametrize("make, words", [
    (lambda: DEFENSES.get("trades")(steps=1.5), "steps must be an integer"),
    (lambda: DEFENSES.get("noise")(sigma="big"), "sigma must be a number"),
    (lambda: DEFENSES.get("standard")(label_smoothing=1.0), "label_smoothing must be < 1"),
    (lambda: DEFENSES.get("awp")("trades", gamma="x"), "gamma must be a number"),
    (lambda: create("wrn", 10, (3, 32, 32), depth=11), r"6n\+4"),
    (lambda: create("ibp-small", 1, (1, 28, 28)), "num_classes must be >= 2"),
    (lambda: create("lenet", 10, (1, 28, 28), width=3), "model.kwargs for 'lenet'"),
])
def test_library_validation_raises_input_errors(make, words):
    import defenses  # noqa: F401  (registers the objectives)

    with pytest.raises(InputError, match=words):
        make()


def test_schedule_knobs_are_checked():
    from defenses.schedules import make_schedule

    with pytest.raises(InputError, match="LR schedule 'cosine'.*peak_at"):
        make_schedule("cosine", peak_at=0.3)  # a knob of another schedule is no longer dropped silently
    with pytest.raises(InputError, match="gamma"):
        make_schedule("step", gamma=0)
    assert make_schedule("step", milestones=[0.5], gamma=0.5)(0.75) == pytest.approx(0.5)


def test_run_dir_is_checked_before_writing(tmp_path):
    from robustkit.errors import CheckpointError
    from robustkit.runs import RunDir

    with pytest.raises(CheckpointError, match="nothing to resume"):
        RunDir(tmp_path / "fresh").check(resume=True)
    assert not (tmp_path / "fresh").exists()
    assert Path(RunDir(tmp_path / "fresh").create("{}").path / "config.yaml").is_file()
