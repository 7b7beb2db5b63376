"""PGD and DeepFool: threat-model guarantees, purity, reproducibility, strength, input validation;
sanity checks; chained robust accuracy."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attacks  # noqa: F401  (registers every attack)
from attacks.deepfool import DeepFool
from attacks.pgd import PGD
from attacks.sanity import SanityWarning, sanity_checks
from robustkit.evaluate import adversarial_examples, robust_accuracy
from robustkit.modes import eval_mode
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

OURS = ["pgd", "deepfool"]
NORMS = ["linf", "l2"]
EPS = {"linf": 0.3, "l2": 3.0}


def make(name: str, norm: str, eps: float, **kw) -> object:
    """A small, fast configuration of attack ``name`` with budget ``eps``."""
    if name == "pgd":
        return ATTACKS.get(name)(norm=norm, eps=eps, **{"steps": 10, "seed": 0, **kw})
    return ATTACKS.get(name)(norm=norm, eps=eps, **{"max_iter": 20, **kw})


def linear_model(shape: tuple[int, int, int], k: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], k)).eval()


def test_registered() -> None:
    assert {"pgd", "deepfool"} <= set(ATTACKS.names())
    assert ATTACKS.get("pgd") is PGD and ATTACKS.get("deepfool") is DeepFool


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", OURS)
@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 4), c=st.sampled_from([1, 3]), hw=st.integers(4, 10), frac=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_inside_ball_and_box(name: str, norm: str, b: int, c: int, hw: int, frac: float, seed: int) -> None:
    eps = frac * EPS[norm] / 3
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, hw, hw, generator=g)
    x[0, 0, 0, 0] = 1.0                                    # touch the box edges
    y = torch.randint(0, 5, (b,), generator=g)
    model = linear_model((c, hw, hw), seed=seed)
    x_in = x.clone()
    res = make(name, norm, eps, **({"steps": 3} if name == "pgd" else {"max_iter": 5}))(model, x, y)
    assert torch.equal(x, x_in)                            # never in place
    assert res.x_adv.shape == x.shape and res.success.shape == (b,) and res.queries.shape == (b,)
    assert bool(ThreatModel(norm, eps).contains(res.x_adv, x).all())
    with torch.no_grad():
        flipped = model(res.x_adv).argmax(1) != y
    assert torch.equal(res.success, flipped)               # success judged on x_adv itself


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", OURS)
def test_accuracy_drops_and_inputs_untouched(tiny_mnist_model, mnist_test_batch, name: str, norm: str) -> None:
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    x_in, y_in = x.clone(), y.clone()
    res = make(name, norm, EPS[norm])(tiny_mnist_model, x, y)
    assert torch.equal(x, x_in) and torch.equal(y, y_in)
    with torch.no_grad():
        clean = (tiny_mnist_model(x).argmax(1) == y).float().mean().item()
        adv = (tiny_mnist_model(res.x_adv).argmax(1) == y).float().mean().item()
    assert clean > 0.7
    assert adv < clean - 0.4, (clean, adv)
    assert bool(ThreatModel(norm, EPS[norm]).contains(res.x_adv, x).all())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", OURS)
def test_seeded_runs_reproducible(tiny_mnist_model, mnist_test_batch, name: str, norm: str) -> None:
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    a, b = make(name, norm, EPS[norm] / 3)(tiny_mnist_model, x, y), make(name, norm, EPS[norm] / 3)(
        tiny_mnist_model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success) and torch.equal(a.queries, b.queries)


@pytest.mark.parametrize("name", OURS)
def test_model_mode_restored(tiny_mnist_model, mnist_test_batch, name: str) -> None:
    model = copy.deepcopy(tiny_mnist_model)
    x, y = mnist_test_batch[0][:4], mnist_test_batch[1][:4]
    for training in (True, False):
        model.train(training)
        make(name, "linf", 0.1)(model, x, y)
        assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_targeted_hits_targets(tiny_mnist_model, mnist_test_batch, norm: str) -> None:
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    t = (y + 1) % 10
    res = PGD(norm=norm, eps=EPS[norm] * 1.5, steps=30, targeted=True, seed=0)(tiny_mnist_model, x, t)
    with torch.no_grad():
        pred = tiny_mnist_model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == t)
    assert res.success.float().mean() > 0.6


@pytest.mark.parametrize("loss", ["ce", "dlr", "margin"])
def test_pgd_losses_and_early_stop_agree(tiny_mnist_model, mnist_test_batch, loss: str) -> None:
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    on = PGD(eps=0.3, steps=40, loss=loss, seed=1, early_stop=True)(tiny_mnist_model, x, y)
    off = PGD(eps=0.3, steps=40, loss=loss, seed=1, early_stop=False)(tiny_mnist_model, x, y)
    assert on.success.float().mean() > 0.6
    assert (on.success != off.success).sum() <= 1                  # float noise from batch-size changes only
    assert on.info["forward_passes"] < off.info["forward_passes"]  # compaction saved work
    assert off.info["forward_passes"] == 32 * 41 and off.info["backward_passes"] == 32 * 40
    assert bool((off.queries == 41).all()) and int(on.queries.max()) <= 41


def test_pgd_restarts_only_on_survivors(tiny_mnist_model, mnist_test_batch) -> None:
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    one = PGD(eps=0.15, steps=5, restarts=1, seed=0)(tiny_mnist_model, x, y)
    three = PGD(eps=0.15, steps=5, restarts=3, seed=0)(tiny_mnist_model, x, y)
    assert bool((three.success | ~one.success).all())             # restart 1 is identical, later ones add
    broken_first = one.success
    assert torch.equal(three.queries[broken_first], one.queries[broken_first])


def test_deepfool_info_and_eps(tiny_mnist_model, mnist_test_batch) -> None:
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    free = DeepFool(max_iter=50)(tiny_mnist_model, x, y)
    assert free.success.float().mean() > 0.95
    l2 = (free.x_adv - x).flatten(1).norm(dim=1)
    assert torch.allclose(free.info["l2"], l2) and torch.allclose(free.info["rho"], l2 / x.flatten(1).norm(dim=1))
    small = float(free.info["l2"][free.success].median())
    capped = DeepFool(max_iter=50, eps=small)(tiny_mnist_model, x, y)
    assert bool(ThreatModel("l2", small).contains(capped.x_adv, x).all())
    assert capped.success.sum() < free.success.sum()
    # the k - 1 gradients of one retained graph are the Jacobian rows of f'_k = f_k - f_y, per sample
    xs = x[:3].clone().requires_grad_(True)
    with eval_mode(tiny_mnist_model):
        logits = tiny_mnist_model(xs)
        w = DeepFool()._grads(logits[:, 1:4] - logits[:, :1], xs)                  # (3, b, C, H, W)
        jac = torch.autograd.functional.jacobian(
            lambda z: (lambda o: o[:, 1:4] - o[:, :1])(tiny_mnist_model(z)), x[:3])  # (b, 3, b, C, H, W)
    assert w.shape == (3, 3, 1, 28, 28)
    for i in range(3):
        assert torch.allclose(w[:, i], jac[i, :, i], atol=1e-6)


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("bad", ["shape", "nan", "range", "label", "float-label"])
def test_bad_inputs_raise(tiny_mnist_model, name: str, bad: str) -> None:
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    if bad == "shape":
        x = x[0]
    elif bad == "nan":
        x[0, 0, 0, 0] = float("nan")
    elif bad == "range":
        x = x * 2 - 0.5
    elif bad == "label":
        y = torch.tensor([1, 10])
    else:
        y = y.float()
    with pytest.raises(ValueError):
        make(name, "linf", 0.1)(tiny_mnist_model, x, y)


@pytest.mark.parametrize("kw", [{"eps": -0.1}, {"eps": "abc"}, {"norm": "l1"}, {"steps": -1}, {"restarts": 0},
                                {"step_size": 0}, {"loss": "hinge"}, {"seed": 1.5}])
def test_pgd_bad_args(kw: dict) -> None:
    with pytest.raises(ValueError):
        PGD(**{"eps": 0.1, **kw})


@pytest.mark.parametrize("kw", [{"eps": -1}, {"norm": "l0"}, {"candidates": 1}, {"max_iter": 0},
                                {"overshoot": -0.1}])
def test_deepfool_bad_args(kw: dict) -> None:
    with pytest.raises(ValueError):
        DeepFool(**kw)


def test_pgd_accepts_fraction_eps_and_dlr_needs_classes() -> None:
    assert PGD(eps="8/255").eps == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match="classes"):
        model = linear_model((1, 4, 4), k=2)
        model.num_classes = 2
        PGD(eps=0.1, loss="dlr")(model, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


# -- sanity checks -----------------------------------------------------------------------------
class _Softmax(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


class _Noisy(_Softmax):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.1 * torch.randn_like(x))


class _Rounded(_Softmax):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x))                        # zero gradient everywhere


def test_sanity_checks(tiny_mnist_model, mnist_test_batch) -> None:
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    assert sanity_checks(tiny_mnist_model, x, y) == []
    cases = {"probabilities": _Softmax(tiny_mnist_model), "randomized": _Noisy(tiny_mnist_model),
             "zero": _Rounded(tiny_mnist_model)}
    for word, model in cases.items():
        model.eval()
        with pytest.warns(SanityWarning, match=word):
            msgs = sanity_checks(model, x, y)
        assert any(word in m for m in msgs)
    model = copy.deepcopy(tiny_mnist_model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert any("train mode" in m for m in sanity_checks(model, x, y))
    assert model.training


# -- robust accuracy ---------------------------------------------------------------------------
def test_robust_accuracy_chain(tiny_mnist_model, mnist_test_batch) -> None:
    x, y = mnist_test_batch
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    weak = PGD(eps=0.1, steps=5, seed=0)
    strong = PGD(eps=0.25, steps=10, seed=0)
    r1 = robust_accuracy(tiny_mnist_model, loader, weak)
    r2 = robust_accuracy(tiny_mnist_model, loader, [weak, strong])
    assert r1["n"] == r2["n"] == 64 and r1["clean_accuracy"] == r2["clean_accuracy"]
    assert r2["robust_accuracy"] <= r1["robust_accuracy"] <= r1["clean_accuracy"]
    assert r2["attacks"] == ["pgd", "pgd#2"]
    per = r2["per_attack"]
    assert per[1]["attacked"] == per[0]["attacked"] - per[0]["broken"]
    assert set(r2["broken_by"]) <= {"pgd", "pgd#2", None}
    assert bool((r2["robust"] == (r2["clean_correct"] & ~r2["success"])).all())
    assert r2["mean_linf"] <= 0.25 + 1e-5
    adv = adversarial_examples(tiny_mnist_model, loader, strong)
    assert adv["x_adv"].shape == x.shape
    assert bool(((adv["pred_adv"] != adv["y"]) | ~adv["success"]).all())
