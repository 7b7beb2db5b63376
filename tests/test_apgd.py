"""APGD (attacks/apgd.py) and the fast ensemble (attacks/fast.py) on a tiny, briefly trained model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attacks  # noqa: F401  (registers the attacks)
import robustkit
from attacks.apgd import APGD
from attacks.base import AttackResult
from attacks.fast import FastEnsemble
from robustkit.data import mnist5k
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel


@pytest.fixture(scope="module")
def model(tiny_mnist_model) -> robustkit.RobustModel:
    """conftest's ibp-small briefly trained on 1,000 mnist5k images (~85-90% clean accuracy); read-only."""
    return tiny_mnist_model


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = mnist5k("test").tensors()
    return x[::20].contiguous(), y[::20].contiguous()      # 50 images, all classes


def pgd10(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tm: ThreatModel) -> torch.Tensor:
    """Plain 10-step PGD on CE, random start, step 2.5 eps / 10 (Madry et al. 2018): success (B,)."""
    xa = tm.random_start(x, torch.Generator().manual_seed(0))
    for _ in range(10):
        xa = xa.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        xa = tm.project(tm.step(xa.detach(), g, tm.default_step_size(10)), x)
    with torch.no_grad():
        return model(xa).argmax(1) != y


CASES = [
    ("apgd-ce-linf", lambda: APGD(norm="linf", eps=0.1, n_iter=20)),
    ("apgd-ce-l2", lambda: APGD(norm="l2", eps=1.5, n_iter=20, n_restarts=2)),
    ("apgd-dlr", lambda: APGD(norm="linf", eps=0.1, n_iter=20, loss="dlr")),
    ("apgd-t", lambda: APGD(norm="linf", eps=0.1, n_iter=10, loss="dlr-targeted", n_targets=3)),
    ("fast", lambda: FastEnsemble(norm="linf", eps=0.1, n_iter=10, n_targets=2, extra="apgd-dlr")),
    ("fast-l2", lambda: FastEnsemble(norm="l2", eps=1.5, n_iter=10, n_targets=2)),
]


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_inside_ball_inputs_unchanged_success_honest(model, data, make) -> None:
    x, y = data
    x0, y0 = x.clone(), y.clone()
    attack = make()
    r = attack(model, x, y)
    assert isinstance(r, AttackResult)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert r.x_adv.shape == x.shape and r.success.shape == y.shape and r.queries.shape == y.shape
    assert bool(ThreatModel(attack.norm, attack.eps).contains(r.x_adv, x).all())
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    with torch.no_grad():
        assert torch.equal(r.success, model(r.x_adv).argmax(1) != y)      # judged on x_adv itself
    assert bool(r.success.any()) and not bool(r.success.all())
    assert int(r.queries.min()) >= 1


def test_reproducible_with_seed(model, data) -> None:
    x, y = data
    a = APGD(eps=0.1, n_iter=10, n_restarts=2, seed=3)
    r1, r2 = a(model, x, y), a(model, x, y)
    assert torch.equal(r1.x_adv, r2.x_adv) and torch.equal(r1.success, r2.success)
    f = FastEnsemble(eps=0.1, n_iter=5, n_targets=2, seed=1)
    assert torch.equal(f(model, x, y).x_adv, f(model, x, y).x_adv)


def test_stronger_than_pgd10(model, data) -> None:
    x, y = data
    for norm, eps in (("linf", 0.1), ("l2", 1.5)):
        tm = ThreatModel(norm, eps)
        pgd_success = pgd10(model, x, y, tm)
        apgd = APGD(norm=norm, eps=eps, n_iter=50)(model, x, y)
        fast = FastEnsemble(norm=norm, eps=eps, n_iter=25, n_targets=2)(model, x, y)
        assert int(apgd.success.sum()) >= int(pgd_success.sum()), norm
        assert int(fast.success.sum()) >= int(apgd.success.sum()) - 1, norm


def test_targeted_hits_the_target(model, data) -> None:
    x, y = data
    target = (y + 1) % 10
    for loss in ("ce", "dlr-targeted"):
        r = APGD(eps=0.3, n_iter=30, loss=loss, targeted=True)(model, x, target)
        with torch.no_grad():
            pred = model(r.x_adv).argmax(1)
        assert torch.equal(r.success, pred == target)
        assert float(r.success.float().mean()) >= 0.8, loss


def test_early_exit_spends_less_on_broken_points(model, data) -> None:
    x, y = data
    r = APGD(eps=0.1, n_iter=40)(model, x, y)
    assert int(r.queries[r.success].float().mean()) < int(r.queries[~r.success].min())
    assert r.info["backward_passes"] < 41 * x.shape[0]


def test_fast_reports_stages(model, data) -> None:
    x, y = data
    r = FastEnsemble(eps=0.1, n_iter=10, n_targets=2)(model, x, y)
    bb = r.info["broken_by"]
    assert len(bb) == x.shape[0]
    assert all((b is None) == (not s) for b, s in zip(bb, r.success.tolist()))
    assert set(bb) <= {None, "clean", "apgd-ce", "apgd-t"}
    after = r.info["robust_after"]
    assert list(after) == ["clean", "apgd-ce", "apgd-t"]
    assert after["apgd-t"] <= after["apgd-ce"] <= after["clean"]
    assert after["apgd-t"] == pytest.approx(1 - float(r.success.float().mean()))


def test_registry_mode_and_bad_args(model, data) -> None:
    assert ATTACKS.get("apgd") is APGD and ATTACKS.get("fast") is FastEnsemble
    x, y = data
    m = copy.deepcopy(model).train()
    APGD(eps=0.1, n_iter=2)(m, x[:4], y[:4])
    assert m.training
    for kw in ({"loss": "hinge"}, {"norm": "l0"}, {"n_iter": 0}, {"eps": -1.0}, {"rho": 0.0},
               {"targeted": True, "loss": "dlr"}):
        with pytest.raises(ValueError):
            APGD(**kw)
    with pytest.raises(ValueError):
        FastEnsemble(extra="square")
    assert APGD(eps="8/255").params()["eps"] == pytest.approx(8 / 255)
