"""Bring your own model: ``robustkit.wrap``, ``--arch package.module:ClassName`` (+ ``--arch-kwargs``),
``--weights`` with ``--strict/--no-strict``, ``--resize``; hostile or broken ``model.json`` refused.

The user module is ``tests/_user_nets.py`` (pytest puts ``tests/`` on ``sys.path``, as a user puts
their module's directory on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import _user_nets
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import robustkit
from robustkit.cli import main
from robustkit.errors import CheckpointError, ConfigError, IncompatibleError, InputError
from robustkit.zoo import CheckpointWarning, create, from_pretrained_file, is_arch, load, load_weights, save

# one quick epoch on 32 mnist5k images, no per-epoch attack
FAST = ["--dataset", "mnist5k", "--epochs", "1", "--batch-size", "16", "--eval-n", "16", "--defense", "standard",
        "--set", "data.n_train=32", "--set", "eval.attack=null", "--device", "cpu"]
X = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err.strip()


# -- wrap ------------------------------------------------------------------------------
def test_wrap_contract():
    torch.manual_seed(0)
    net = _user_nets.TinyNet(num_classes=10, in_channels=1).eval()
    model = robustkit.wrap(net, mean=[0.5], std=[0.25], input_shape=(1, 28, 28))
    assert isinstance(model, robustkit.RobustModel) and model.net is net
    assert model.num_classes == 10 and model.input_shape == (1, 28, 28)  # K read from a dry forward
    assert not model.training  # the module's mode is kept
    assert model.arch == "_user_nets:TinyNet"
    torch.testing.assert_close(model(X), net((X - 0.5) / 0.25))  # normalization inside, pixel space outside
    with pytest.raises(IncompatibleError, match="returns 10 logits but num_classes is 7"):
        robustkit.wrap(net, mean=[0.5], std=[0.25], input_shape=(1, 28, 28), num_classes=7)
    with pytest.raises(InputError, match="mean needs one number per input channel"):
        robustkit.wrap(net, mean=[0.5, 0.5, 0.5], std=[0.25], input_shape=(1, 28, 28))
    with pytest.raises(InputError, match="input_shape must be"):
        robustkit.wrap(net, mean=[0.5], std=[0.25], input_shape=(28, 28))
    with pytest.raises(InputError, match="takes an nn.Module"):
        robustkit.wrap(lambda x: x, mean=[0.5], std=[0.25], input_shape=(1, 28, 28))  # type: ignore[arg-type]
    with pytest.raises(IncompatibleError, match=r"must return \(B, K\) logits.*\(2, 10, 1\)"):
        robustkit.wrap(_user_nets.NoLogits(), mean=[0.0], std=[1.0], input_shape=(1, 28, 28))
    with pytest.raises(IncompatibleError, match="does not accept inputs.*--resize"):
        robustkit.wrap(_user_nets.Fixed56(), mean=[0.0], std=[1.0], input_shape=(1, 28, 28))
    fixed = robustkit.wrap(_user_nets.Fixed56(), mean=[0.0], std=[1.0], input_shape=(1, 28, 28), resize=56)
    assert fixed(X).shape == (4, 10)


def test_wrap_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = robustkit.wrap(_user_nets.NeedsWidth(width=3).eval(), mean=[0.1], std=[0.3], input_shape=(1, 28, 28),
                           arch_kwargs={"width": 3})
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    assert back.arch == "_user_nets:NeedsWidth" and back.arch_kwargs == {"width": 3}
    torch.testing.assert_close(back(X), model(X))
    with pytest.raises(InputError, match="missing a required argument: 'width'"):  # load could not rebuild it
        save(robustkit.wrap(_user_nets.NeedsWidth(width=3), mean=[0.0], std=[1.0], input_shape=(1, 28, 28)),
             tmp_path / "no-kwargs")

    class Local(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :3]

    with pytest.raises(InputError, match="importable module"):
        save(robustkit.wrap(Local(), mean=[0.0], std=[1.0], input_shape=(1, 28, 28)), tmp_path / "local")
    assert not (tmp_path / "no-kwargs").exists() and not (tmp_path / "local").exists()  # nothing written


# -- --arch module:Class ---------------------------------------------------------------
def test_arch_import_path_round_trip(tmp_path):
    torch.manual_seed(2)
    model = create("_user_nets:TinyNet", 5, (1, 28, 28), mean=[0.2], std=[0.5], width=4).eval()
    assert model.net.fc.out_features == 5  # num_classes passed because the class takes it
    spec = json.loads((save(model, tmp_path / "m") / "model.json").read_text())
    assert (spec["arch"], spec["arch_kwargs"], spec["num_classes"]) == ("_user_nets:TinyNet", {"width": 4}, 5)
    back = load(tmp_path / "m")
    torch.testing.assert_close(back(X), model(X))
    assert is_arch("_user_nets:TinyNet") and not is_arch("os:system") and not is_arch("no_such_mod_xyz:Net")


def test_cli_arch_and_arch_kwargs_round_trip(tmp_path, capsys):
    rc, err = run_cli(["train", "--arch", "_user_nets:TinyNet", "--arch-kwargs", '{"width": 4}', *FAST,
                       "--out", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    model = load(tmp_path / "run")
    assert model.arch == "_user_nets:TinyNet" and model.arch_kwargs == {"width": 4} and model.net.conv.out_channels == 4
    x = X.clone()
    torch.testing.assert_close(load(tmp_path / "run")(x), model(x))


def _model_dir(tmp_path: Path, arch: str, kwargs: dict) -> Path:
    d = tmp_path / "hostile"
    d.mkdir()
    save_file({"normalize.mean": torch.zeros(1, 1, 1, 1), "normalize.std": torch.ones(1, 1, 1, 1)},
              str(d / "model.safetensors"))
    (d / "model.json").write_text(json.dumps({"format": "robustkit-model/1", "arch": arch, "num_classes": 10,
                                              "input_shape": [1, 28, 28], "mean": [0.0], "std": [1.0],
                                              "arch_kwargs": kwargs}))
    return d


@pytest.mark.parametrize("arch, kwargs, what", [
    ("os:system", {"command": "echo pwned"}, "is a function, not an nn.Module subclass"),  # patched: a lambda
    ("_user_nets:make_tiny", {}, "function, not an nn.Module subclass"),
    ("os:path", {}, "module, not an nn.Module subclass"),
    ("__main__:Net", {}, "defined in __main__"),
])
def test_hostile_model_json_is_refused_without_calling_anything(tmp_path, monkeypatch, arch, kwargs, what):
    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(a))
    monkeypatch.setattr(_user_nets, "make_tiny", lambda *a, **k: called.append(a))
    with pytest.raises(CheckpointError, match=f"cannot rebuild the model.*{what}"):
        load(_model_dir(tmp_path, arch, kwargs))
    assert called == []


@pytest.mark.parametrize("arch, msg", [
    ("no_such_mod_xyz:Net", "cannot import module 'no_such_mod_xyz'.*PYTHONPATH"),
    ("_user_nets:Nope", "'_user_nets' has no attribute 'Nope'; nn.Module classes there: .*TinyNet"),
    ("_user_nets:make_tiny", "is a function, not an nn.Module subclass"),
])
def test_cli_missing_module_or_class_exits_2(tmp_path, capsys, arch, msg):
    rc, err = run_cli(["train", "--arch", arch, *FAST, "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("robustkit: error: ") and __import__("re").search(msg, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, msg", [
    (["--arch-kwargs", "{width: 4}"], "--arch-kwargs: not valid JSON"),
    (["--arch-kwargs", "[4]"], "expected a JSON object"),
    (["--arch-kwargs", '{"num_classes": 3}'], "'num_classes' is set by robustkit"),
    (["--weights", "missing.pt"], "--weights missing.pt: expected an existing state-dict file"),
    (["--arch-kwargs", '{"depth": 3}'], r"accepted: num_classes, in_channels, width"),
])
def test_cli_bad_arch_flags_exit_2(tmp_path, capsys, flags, msg):
    rc, err = run_cli(["train", "--arch", "_user_nets:TinyNet", *flags, *FAST, "--out", str(tmp_path / "run")],
                      capsys)
    assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# -- --weights, strict / not strict ------------------------------------------------------
def test_state_dict_of_another_architecture_is_a_clear_mismatch(tmp_path, capsys):
    torch.save(_user_nets.OtherNet().state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as e:
        from_pretrained_file(tmp_path / "other.pt", "_user_nets:TinyNet", 10, (1, 28, 28))
    msg = str(e.value)
    for part in ("other.pt does not match model '_user_nets:TinyNet'", "4 missing keys [conv.bias, conv.weight,",
                 "4 unexpected keys [body.1.bias, body.1.weight, head.bias, head.weight]", "--no-strict"):
        assert part in msg, msg
    with pytest.raises(CheckpointError, match="no key matches by name and shape"):  # not strict: still nothing fits
        from_pretrained_file(tmp_path / "other.pt", "_user_nets:TinyNet", 10, (1, 28, 28), strict=False)
    rc, err = run_cli(["train", "--arch", "_user_nets:TinyNet", "--weights", str(tmp_path / "other.pt"), *FAST,
                       "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "4 unexpected keys" in err and not (tmp_path / "run").exists()


def test_not_strict_loads_what_matches_and_says_what_it_skipped(tmp_path):
    torch.manual_seed(3)
    src = _user_nets.TinyNet(num_classes=10)
    torch.save(src.state_dict(), tmp_path / "ten.pt")
    with pytest.raises(CheckpointError, match=r"2 shape mismatches \[fc.weight: checkpoint \(10, 8\) vs model "
                                              r"\(5, 8\), fc.bias"):
        from_pretrained_file(tmp_path / "ten.pt", "_user_nets:TinyNet", 5, (1, 28, 28))
    torch.manual_seed(4)
    fresh = create("_user_nets:TinyNet", 5, (1, 28, 28))
    head = fresh.net.fc.weight.detach().clone()
    with pytest.warns(CheckpointWarning, match=r"shape mismatches \[fc.weight.*loaded 2 of 4 tensors"):
        load_weights(fresh, torch.load(tmp_path / "ten.pt", weights_only=True), source="ten.pt", strict=False)
    torch.testing.assert_close(fresh.net.conv.weight, src.conv.weight)  # the body came from the file
    torch.testing.assert_close(fresh.net.fc.weight, head)               # the new head kept its own init


# -- --resize ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["0", "-3", "2.5", "3x3x3", "abc", "4x0"])
def test_cli_bad_resize_exits_2(tmp_path, capsys, size):
    rc, err = run_cli(["train", "--arch", "ibp-small", f"--resize={size}", *FAST, "--out", str(tmp_path / "r")],
                      capsys)
    assert rc == 2 and "model.resize (--resize) must be H or HxW with positive integers" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("size", [0, -1, 2.5, (3, 3, 3), "x", True])
def test_bad_resize_in_create_and_wrap(size):
    with pytest.raises(InputError, match="resize must be H or HxW"):
        create("ibp-small", 10, (1, 28, 28), resize=size)
    with pytest.raises(InputError, match="resize must be H or HxW"):
        robustkit.wrap(_user_nets.TinyNet(), mean=[0.0], std=[1.0], input_shape=(1, 28, 28), resize=size)
    with pytest.raises(ConfigError, match="model.resize"):
        robustkit.config.from_dict(robustkit.config.TrainConfig, {"model": {"resize": size}})


def test_resize_is_inside_the_model(tmp_path):
    torch.manual_seed(5)
    model = create("ibp-small", 10, (1, 28, 28), resize="40x36").eval()
    plain = create("ibp-small", 10, (1, 40, 36))
    assert model.input_shape == (1, 28, 28) and model.state_dict().keys() == plain.state_dict().keys()
    x = X.clone().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.shape == (4, 1, 28, 28)  # attacks differentiate w.r.t. the data's pixels
    spec = json.loads((save(model, tmp_path / "m") / "model.json").read_text())
    assert spec["resize"] == [40, 36] and spec["input_shape"] == [1, 28, 28]
    back = load(tmp_path / "m")
    assert back.resize is not None and back.resize.size == (40, 36)
    torch.testing.assert_close(back(X), model(X))


def test_imagenet_size_net_on_28x28_needs_resize(tmp_path, capsys):
    with pytest.raises(IncompatibleError, match=r"vit_tiny_patch16_224.*does not accept inputs \(1, 28, 28\).*"
                                                r"--resize H\[xW\]"):
        create("vit_tiny_patch16_224", 10, (1, 28, 28))
    rc, err = run_cli(["train", "--arch", "vit_tiny_patch16_224", *FAST, "--out", str(tmp_path / "vit")], capsys)
    assert rc == 2 and "--resize" in err and len(err.splitlines()) == 1 and not (tmp_path / "vit").exists()
    model = create("vit_tiny_patch16_224", 10, (1, 28, 28), resize=224).eval()
    assert model(X[:2]).shape == (2, 10)


def test_cli_resize_and_no_strict_reach_the_model(tmp_path, capsys):
    rc, err = run_cli(["train", "--arch", "_user_nets:Fixed56", "--resize", "56", *FAST,
                       "--out", str(tmp_path / "fixed")], capsys)
    assert rc == 0, err
    assert load(tmp_path / "fixed").resize.size == (56, 56)
    torch.save(_user_nets.TinyNet(num_classes=3).state_dict(), tmp_path / "three.pt")
    with pytest.warns(CheckpointWarning, match="fc.weight"):
        rc, err = run_cli(["train", "--arch", "_user_nets:TinyNet", "--weights", str(tmp_path / "three.pt"),
                           "--no-strict", *FAST, "--out", str(tmp_path / "partial")], capsys)
    assert rc == 0, err


def test_bound_propagation_refuses_a_resized_model():
    """IBP / CROWN-IBP have no rule for the in-model interpolation: one clear error, not a wrong bound."""
    from certify._layers import UnsupportedLayerError, layers_of

    with pytest.raises(UnsupportedLayerError, match="resizes its input inside.*smoothing"):
        layers_of(create("ibp-small", 10, (1, 28, 28), resize=32))
