"""The AutoAttack adapter (attacks/autoattack.py): upstream API via a fake module, real pyautoattack."""

from __future__ import annotations

import json
import sys
import types
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

import attacks  # noqa: F401  (registers the attacks, "autoattack" included)
import robustkit
from attacks._autoattack_pkg import set_override
from attacks.autoattack import AutoAttackAttack, find_package, run_autoattack
from attacks.base import AttackResult
from robustkit.data import mnist5k
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

QUICK = {"apgd.n_iter": 10, "apgd_targeted.n_iter": 10, "apgd_targeted.n_target_classes": 2,
         "fab.n_iter": 5, "square.n_queries": 30}


@pytest.fixture(scope="module")
def model(tiny_mnist_model) -> robustkit.RobustModel:
    """conftest's ibp-small briefly trained on 1,000 mnist5k images (~85-90% clean accuracy); read-only."""
    return tiny_mnist_model


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = mnist5k("test").tensors()
    return x[::50].contiguous(), y[::50].contiguous()      # 20 images, all classes


# -- a fake upstream `autoattack` module (fra31/auto-attack API) -----------------------------
class FakeAutoAttack:
    """Mimics upstream: positional-or-keyword args, ``attacks_to_run``, prints, ``bs=``, x_adv out.
    'apgd-ce' is one FGSM step, 'apgd-t' five PGD steps; the others leave points alone."""

    calls: list[tuple[list[str], int]] = []
    return_labels_supported = True

    def __init__(self, model, norm="Linf", eps=.3, seed=None, verbose=True, attacks_to_run=[],  # noqa: B006
                 version="standard", is_tf_model=False, device="cuda", log_path=None):
        if version != "custom" and attacks_to_run != []:
            raise ValueError("attacks_to_run will be overridden unless you use version='custom'")
        self.model, self.norm, self.epsilon, self.device = model, norm, eps, device
        self.attacks_to_run = attacks_to_run
        if version == "standard":
            self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]
        print(f"setting parameters for {version} version")

    def _pgd(self, x, y, steps):
        tm = ThreatModel(self.norm.lower(), self.epsilon)
        xa = x.clone()
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(self.model(xa), y), xa)
            xa = tm.project(tm.step(xa.detach(), g, self.epsilon / max(steps - 1, 1)), x)
        return xa.detach()

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
        print(f"using version including {', '.join(self.attacks_to_run)}")
        FakeAutoAttack.calls.append((list(self.attacks_to_run), x_orig.shape[0]))
        with torch.no_grad():
            robust = self.model(x_orig).argmax(1) == y_orig
        x_adv = x_orig.clone()
        for a in self.attacks_to_run:
            idx = robust.nonzero().squeeze(1)
            if a in ("apgd-ce", "apgd-t") and idx.numel():
                adv = self._pgd(x_orig[idx], y_orig[idx], 1 if a == "apgd-ce" else 5)
                with torch.no_grad():
                    hit = self.model(adv).argmax(1) != y_orig[idx]
                x_adv[idx[hit]] = adv[hit]
                robust[idx[hit]] = False
            print(f"robust accuracy after {a.upper()}: {float(robust.float().mean()):.2%}")
        with torch.no_grad():
            labels = self.model(x_adv).argmax(1)
        return (x_adv, labels) if return_labels else x_adv


class FakeAutoAttackNoLabels(FakeAutoAttack):
    """An older upstream without ``return_labels``."""

    def run_standard_evaluation(self, x_orig, y_orig, bs=250):
        return super().run_standard_evaluation(x_orig, y_orig, bs=bs)


@pytest.fixture(params=[FakeAutoAttack, FakeAutoAttackNoLabels], ids=["labels", "no-labels"])
def fake_upstream(request, monkeypatch):
    mod = types.ModuleType("autoattack")
    mod.AutoAttack = request.param
    mod.__version__ = "0.1-fake"
    monkeypatch.setitem(sys.modules, "autoattack", mod)
    FakeAutoAttack.calls = []
    return mod


def test_upstream_api_preferred_and_attributed(fake_upstream, model, data, tmp_path, capsys) -> None:
    x, y = data
    assert find_package()[1] == "autoattack"
    r = run_autoattack(model, x, y, eps=0.15, out_dir=tmp_path)
    assert (r.package, r.package_version) == ("autoattack", "0.1-fake")
    assert r.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # one call per attack, each on the points still robust
    assert [c[0] for c in FakeAutoAttack.calls] == [[a] for a in r.attacks][:len(FakeAutoAttack.calls)]
    standing = int(r.clean_correct.sum())
    for (attack,), n in FakeAutoAttack.calls:
        assert n == standing
        standing -= r.broken_by.count(attack)
    with torch.no_grad():
        pred = model(r.x_adv).argmax(1)
    assert torch.equal(r.robust, pred == y)
    assert all((b is None) == bool(rob) for b, rob in zip(r.broken_by, r.robust.tolist()))
    assert r.broken_by.count("apgd-ce") > 0 and r.robust_accuracy < r.clean_accuracy
    assert r.robust_after["square"] == r.robust_accuracy
    # its prints went to the log file, not to our stdout
    assert capsys.readouterr().out == ""
    log = (tmp_path / "autoattack.log").read_text()
    assert "robust accuracy after APGD-CE" in log and "setting parameters for standard" in log


def test_verbose_tees_to_stdout(fake_upstream, model, data, capsys) -> None:
    x, y = data
    r = run_autoattack(model, x[:4], y[:4], eps=0.1, attacks=["apgd-ce"], verbose=True)
    assert "using version including apgd-ce" in capsys.readouterr().out
    assert "using version including apgd-ce" in r.log_text and r.version == "custom"


def test_pyautoattack_standard(model, data, tmp_path, capsys) -> None:
    x, y = data
    x0 = x.clone()
    rng = torch.get_rng_state()
    r = run_autoattack(model, x, y, eps=0.1, package="pyautoattack", out_dir=tmp_path, overrides=QUICK)
    assert capsys.readouterr().out == ""
    assert torch.equal(x, x0) and torch.equal(torch.get_rng_state(), rng)
    assert r.package == "pyautoattack" and r.package_version == metadata.version("pyautoattack")
    assert r.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"] and r.version == "standard"
    assert r.robust_accuracy <= r.clean_accuracy and r.robust_accuracy < 1.0
    assert bool(ThreatModel("linf", 0.1).contains(r.x_adv, x).all())
    with torch.no_grad():
        assert torch.equal(r.robust, model(r.x_adv).argmax(1) == y)
    assert r.seconds > 0 and set(r.attack_seconds) == set(r.attacks)
    assert "running apgd-ce" in (tmp_path / "autoattack.log").read_text()
    json.dumps(r.summary())


def test_sequential_equals_one_call(model, data) -> None:
    """Per-attack sequencing reproduces the package's own single call exactly."""
    from pyautoattack import AutoAttack

    x, y = data
    r = run_autoattack(model, x, y, eps=0.1, package="pyautoattack", overrides=QUICK)
    aa = AutoAttack(model, norm="Linf", eps=0.1, seed=0, version="standard")
    for key, value in QUICK.items():
        set_override(aa, key, value)
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=250)
    assert torch.equal(r.robust, y_adv.to(y.device) == y)


@pytest.mark.parametrize("norm,eps", [("l2", 1.0), ("l1", 8.0)])
def test_pyautoattack_other_norms(model, data, norm, eps) -> None:
    x, y = data
    r = run_autoattack(model, x[:8], y[:8], eps=eps, norm=norm, attacks=["apgd-ce"], package="pyautoattack",
                       overrides={"apgd.n_iter": 5, "apgd.n_restarts": 1})
    d = (r.x_adv - x[:8]).flatten(1)
    size = d.norm(dim=1) if norm == "l2" else d.abs().sum(1)
    assert float(size.max()) <= eps * (1 + 1e-4) and r.norm == norm.upper()
    assert r.robust_accuracy <= r.clean_accuracy


def test_pyautoattack_rand_version(model, data) -> None:
    x, y = data
    r = run_autoattack(model, x[:6], y[:6], eps=0.1, version="rand", package="pyautoattack",
                       overrides={"apgd.n_iter": 3, "apgd.eot_iter": 2})
    assert r.attacks == ["apgd-ce", "apgd-dlr"] and r.version == "rand"


def test_resume_from_state(model, data, tmp_path) -> None:
    x, y = data
    state = tmp_path / "aa_state.json"
    kw = dict(eps=0.1, attacks=["apgd-ce", "square"], package="pyautoattack", overrides=QUICK, state_path=state)
    r1 = run_autoattack(model, x, y, **kw)
    assert r1.resumed == [] and state.is_file()
    r2 = run_autoattack(model, x, y, **kw)
    assert r2.resumed == ["apgd-ce", "square"] and r2.broken_by == r1.broken_by
    assert torch.equal(r2.x_adv, r1.x_adv) and torch.equal(r2.robust, r1.robust)
    with pytest.raises(ValueError, match="other inputs"):
        run_autoattack(model, x.flip(0), y.flip(0), **kw)


def test_registered_attack_wrapper(model, data) -> None:
    assert ATTACKS.get("autoattack") is AutoAttackAttack
    x, y = data
    a = AutoAttackAttack(eps=0.1, attacks=["apgd-ce"], package="pyautoattack", overrides={"apgd.n_iter": 5})
    r = a(model, x, y)
    assert isinstance(r, AttackResult) and r.x_adv.device == x.device
    assert torch.equal(r.success, torch.tensor([b is not None for b in r.info["broken_by"]]))
    assert r.info["package"] == "pyautoattack" and a.params()["version"] == "custom"


@pytest.mark.parametrize("kw", [{"version": "fancy"}, {"norm": "l0"}, {"attacks": ["pgd"]},
                                {"version": "rand", "attacks": ["apgd-ce"]}, {"version": "custom"},
                                {"eps": -0.1}, {"package": "foolbox"}])
def test_bad_input_raises(model, data, kw) -> None:
    x, y = data
    args = {"eps": 0.1, **kw}
    with pytest.raises(ValueError):
        run_autoattack(model, x[:2], y[:2], **args)
    with pytest.raises(ValueError):
        AutoAttackAttack(**args)


def test_bad_tensors_raise(model, data) -> None:
    x, y = data
    with pytest.raises(ValueError):
        run_autoattack(model, x[:2] * 255, y[:2], eps=0.1)
    with pytest.raises(ValueError):
        run_autoattack(model, x[:2], y[:3], eps=0.1)


def test_norm_names_parsed_by_threat_model() -> None:
    """Norm spellings go through ``robustkit.threat.parse_norm`` (L1 allowed for AutoAttack only)."""
    from robustkit.errors import InputError

    assert AutoAttackAttack(norm="L-inf", eps=0.1).norm == "linf"
    assert AutoAttackAttack(norm="L2", eps=0.5).norm == "l2" and AutoAttackAttack(norm="l1", eps=5).norm == "l1"
    with pytest.raises(InputError, match="allowed: linf, l2, l1"):
        AutoAttackAttack(norm="l0", eps=0.1)


def test_missing_package_is_a_user_error(monkeypatch) -> None:
    from attacks._autoattack_pkg import AutoAttackMissing
    from robustkit.errors import RobustkitError

    monkeypatch.setitem(sys.modules, "autoattack", None)          # import autoattack -> ImportError
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(AutoAttackMissing, match="pip install pyautoattack") as info:
        find_package()
    assert isinstance(info.value, RobustkitError) and isinstance(info.value, ImportError)
