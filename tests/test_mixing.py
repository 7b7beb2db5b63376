"""Mixed classifiers (adaptive smoothing, Bai et al. 2024): ``robustkit.mix``, ``defenses/mixing.py``,
``robustkit mix``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import PGD
from defenses.base import StepContext
from defenses.mixing import AdaptiveSmoothing
from robustkit.app.build import build_attack
from robustkit.cli import main
from robustkit.errors import InputError
from robustkit.mix import MixedNet, mix_model, mixed_part
from robustkit.threat import ThreatModel
from robustkit.zoo import RobustModel, create, load, save
from tests._optional import has_autoattack


def _members(seed: int = 0) -> tuple[RobustModel, RobustModel]:
    torch.manual_seed(seed)
    std = create("ibp-small", 10, (1, 28, 28))
    rob = create("ibp-small", 10, (1, 28, 28), mean=[0.5], std=[0.25])
    return std.eval(), rob.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_composite_equals_manual_mixing(x) -> None:
    std, rob = _members()
    model = mix_model(std, rob, alpha=0.3, std_scale=1.2, rob_scale=0.5)
    with torch.no_grad():
        manual = torch.log(0.7 * F.softmax(1.2 * std(x), 1) + 0.3 * F.softmax(0.5 * rob(x), 1))   # (B, K)
        out = model(x)
    assert out.shape == (6, 10)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(6), atol=1e-5, rtol=0)    # log of a distribution


@pytest.mark.parametrize("alpha,member", [(0.0, 0), (1.0, 1)])
def test_alpha_zero_one_are_the_members(x, alpha: float, member: int) -> None:
    models = _members()
    model = mix_model(*models, alpha=alpha)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.log_softmax(models[member](x), 1), atol=1e-5, rtol=1e-5)
        assert torch.equal(model(x).argmax(1), models[member](x).argmax(1))


def test_pgd_gradients_flow_through_both_members(x) -> None:
    std, rob = _members()
    model = mix_model(std, rob, alpha=0.5)
    y = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
    u = x.clone().requires_grad_(True)
    (g_mix,) = torch.autograd.grad(F.cross_entropy(model(u), y), [u])
    u2 = x.clone().requires_grad_(True)
    manual = torch.log(0.5 * F.softmax(std(u2), 1) + 0.5 * F.softmax(rob(u2), 1))
    (g_manual,) = torch.autograd.grad(F.cross_entropy(manual, y), [u2])
    torch.testing.assert_close(g_mix, g_manual, atol=1e-6, rtol=1e-4)
    for member in (std, rob):   # neither member alone gives the composite's gradient
        u3 = x.clone().requires_grad_(True)
        (g_one,) = torch.autograd.grad(F.cross_entropy(member(u3), y), [u3])
        assert not torch.allclose(g_one, g_mix, atol=1e-6)
    # the learned-alpha composite: gradients reach the input through the mixing network too
    learned = mix_model(std, rob, mixing_net=True).eval()
    u4 = x.clone().requires_grad_(True)
    (g4,) = torch.autograd.grad(F.cross_entropy(learned(u4), y), [u4])
    assert bool(torch.isfinite(g4).all()) and float(g4.abs().sum()) > 0
    res = PGD(eps=0.3, steps=5)(learned, x, y)             # one module to the attacks
    assert bool(ThreatModel("linf", 0.3).contains(res.x_adv, x).all())


def test_save_load_round_trip(tmp_path, x) -> None:
    std, rob = _members()
    for i, model in enumerate([mix_model(std, rob, alpha=0.25), mix_model(std, rob, mixing_net=True,
                                                                       alpha_min=0.1, alpha_max=0.9)]):
        save(model, tmp_path / str(i))
        back = load(tmp_path / str(i))
        assert back.arch == "mix" and isinstance(mixed_part(back), MixedNet)
        with torch.no_grad():
            torch.testing.assert_close(back(x), model.eval()(x), atol=0, rtol=0)
        model.train()(x)                                   # a forward that keeps gamma's graph ...
        twin = copy.deepcopy(model).eval()                 # ... does not stop a deepcopy (EMA, AWP, tests)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), model.eval()(x), atol=0, rtol=0)
        spec = json.loads((tmp_path / str(i) / "model.json").read_text())
        assert spec["arch_kwargs"]["robust"]["mean"] == [0.5]


class _BNNet(nn.Module):
    """conv + BN + ReLU + linear: a member with batch-norm statistics that must not move."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 13 * 13, 10))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


def test_objective_trains_only_the_mixing_net(mnist_test_batch) -> None:
    torch.manual_seed(0)
    net = MixedNet(_BNNet(), _BNNet(), mixing_net=True, alpha=None, input_shape=(1, 28, 28))
    model = RobustModel(net, "test-mix", 10, (1, 28, 28), (0.0,), (1.0,)).train()
    members = {k: v.clone() for k, v in {**{f"s.{k}": v for k, v in net.standard.state_dict().items()},
                                         **{f"r.{k}": v for k, v in net.robust.state_dict().items()}}.items()}
    mixer = {k: v.clone() for k, v in net.mixer.state_dict().items()}
    assert not net.standard.training and not net.robust.training and net.mixer.training
    obj = AdaptiveSmoothing(preset="mnist", steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)            # every parameter handed over, as the Trainer does
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    for step in range(2):
        loss, logs = obj.loss(model, x, y)
        assert loss.dim() == 0 and torch.isfinite(loss) and model.training
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        obj.after_step(model, StepContext(0, 1, step, 2, opt))
    now = {**{f"s.{k}": v for k, v in net.standard.state_dict().items()},
           **{f"r.{k}": v for k, v in net.robust.state_dict().items()}}
    assert all(torch.equal(members[k], now[k]) for k in members), "frozen members (weights and BN statistics)"
    assert any(not torch.equal(mixer[k], v) for k, v in net.mixer.state_dict().items()), "the mixing net learns"
    assert {"alpha_clean", "alpha_adv", "bce"} <= set(logs)


def test_objective_learns_to_separate_clean_from_adversarial(mnist_test_batch) -> None:
    """A few steps of the code's BCE objective push alpha up on adversarial and down on clean inputs."""
    torch.manual_seed(0)
    std, rob = _members()
    model = mix_model(std, rob, mixing_net=True).train()
    obj = AdaptiveSmoothing(preset="mnist", steps=3, c_prod=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    for _ in range(15):
        loss, logs = obj.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert logs["alpha_adv"] > logs["alpha_clean"] + 0.2, logs


def test_bad_input() -> None:
    std, rob = _members()
    with pytest.raises(InputError, match="alpha must be a number in"):
        mix_model(std, rob, alpha=1.5)
    with pytest.raises(InputError, match="share classes"):
        mix_model(std, create("ibp-small", 7, (1, 28, 28)))
    with pytest.raises(InputError, match="not a submodule"):
        mix_model(std, rob, mixing_net=True, rob_layer="nope")
    with pytest.raises(InputError, match="mix composite"):
        AdaptiveSmoothing(preset="mnist").loss(std.train(), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="eps_low"):
        AdaptiveSmoothing(preset="mnist", eps_low=0.9, eps_high=0.5)


def test_cli_mix_then_train_and_attack(tmp_path, capsys) -> None:
    std, rob = _members()
    save(std, tmp_path / "std")
    save(rob, tmp_path / "rob")
    assert main(["mix", "--standard", str(tmp_path / "std"), "--robust", str(tmp_path / "rob"), "--alpha", "0.4",
                 "--out", str(tmp_path / "mix"), "--device", "cpu"]) == 0
    assert load(tmp_path / "mix").arch == "mix"
    assert main(["attack", "--model", str(tmp_path / "mix"), "--attack", "pgd", "--eps", "0.3", "--steps", "3",
                 "--n", "8", "--out", str(tmp_path / "att"), "--device", "cpu"]) == 0
    assert "robust_accuracy" in (tmp_path / "att" / "results.json").read_text()
    assert main(["mix", "--standard", str(tmp_path / "std"), "--robust", str(tmp_path / "rob"), "--mixing-net",
                 "--out", str(tmp_path / "mixnet"), "--device", "cpu"]) == 0
    assert main(["train", "--model", str(tmp_path / "mixnet"), "--dataset", "mnist5k", "--defense",
                 "adaptive-smoothing", "--set", "defense.params.preset=mnist", "--set", "defense.params.steps=2",
                 "--set", "data.n_train=64", "--epochs", "1", "--batch-size", "32", "--eval-n", "16", "--out",
                 str(tmp_path / "run"), "--device", "cpu"]) == 0
    trained = load(tmp_path / "run")
    assert torch.equal(trained.net.standard.state_dict()["net.0.weight"], std.state_dict()["net.0.weight"])
    capsys.readouterr()
    assert main(["train", "--model", str(tmp_path / "mix"), "--dataset", "mnist5k", "--defense", "adaptive-smoothing",
                 "--epochs", "1", "--out", str(tmp_path / "run-fixed"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixing network of a mix composite" in err[0] and not (tmp_path / "run-fixed").exists()
    assert main(["train", "--model", str(tmp_path / "mix"), "--dataset", "mnist5k", "--defense", "standard",
                 "--epochs", "1", "--out", str(tmp_path / "run-frozen"), "--device", "cpu"]) == 2   # nothing to train
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trainable parameters" in err[0] and not (tmp_path / "run-frozen").exists()
    assert main(["mix", "--standard", str(tmp_path / "std"), "--robust", str(tmp_path / "rob"), "--alpha", "2",
                 "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alpha must be a number in [0.0, 1.0]" in err[0]
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not has_autoattack(), reason="needs the autoattack package (test extra)")
def test_autoattack_runs_end_to_end_on_the_composite(tiny_mnist_model, mnist_test_batch) -> None:
    """The composite is one module to AutoAttack: the evaluation engine verifies every claimed break."""
    torch.manual_seed(0)
    weak = create("ibp-small", 10, (1, 28, 28)).eval()
    model = mix_model(tiny_mnist_model, weak, mixing_net=True).eval()
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    aa = build_attack("autoattack", {"attacks": ["apgd-ce", "apgd-t"], "overrides": {"apgd.n_iter": 5}},
                      norm="linf", eps=0.3, seed=0)
    res = aa(model, x, y)
    assert bool(ThreatModel("linf", 0.3).contains(res.x_adv, x).all())
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert bool(res.success.any()) and bool((pred[res.success] != y[res.success]).all())


def test_cli_mix_out_that_is_a_file(tmp_path, capsys) -> None:
    std, rob = _members()
    save(std, tmp_path / "std")
    save(rob, tmp_path / "rob")
    (tmp_path / "f").write_text("x")
    assert main(["mix", "--standard", str(tmp_path / "std"), "--robust", str(tmp_path / "rob"),
                 "--out", str(tmp_path / "f"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output directory" in err[0]
