"""Registry contract tests: every registered name of ATTACKS, DEFENSES, MODELS and DATASETS runs
through the contract its registry promises (timm-style: the tests iterate over the registries, so a
new entry is tested the day it is registered). CERTIFIERS has its own contract test next to the
certification code.

Tiny nets and tiny budgets: the file runs in well under a minute on 2 CPU cores. A new attack or
defense needs a small configuration in ``ATTACK_CONFIGS`` / ``DEFENSE_CONFIGS``; the test says so.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from typing import Any

import pytest
import torch
from torch import nn

import attacks  # noqa: F401  (registers every attack)
import certify  # noqa: F401  (defenses may build on certify; registers certifiers)
import defenses  # noqa: F401  (registers every objective)
import robustkit.data  # noqa: F401  (registers every dataset)
import robustkit.nets  # noqa: F401  (registers every built-in net)
from attacks import AttackResult
from defenses.base import Defense, StepContext
from robustkit.data import dataset_info, load_data, make_loader
from robustkit.errors import DatasetError
from robustkit.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from robustkit.threat import ThreatModel
from robustkit.zoo import RobustModel, create, load, save
from tests._tiny import tiny_classifier

EPS = {"linf": 0.3, "l2": 3.0}
B = 6

# -- ATTACKS -------------------------------------------------------------------------------------
# name -> (norms it supports, small keyword arguments besides norm / eps / targeted)
ATTACK_CONFIGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "pgd": (("linf", "l2"), {"steps": 5, "seed": 0}),
    "apgd": (("linf", "l2"), {"n_iter": 5, "seed": 0}),
    "fast": (("linf", "l2"), {"n_iter": 5, "n_targets": 2, "seed": 0}),
    "deepfool": (("linf", "l2"), {"max_iter": 10}),
    "lgv": (("linf", "l2"), {"steps": 5}),
    "bo-hard-label": (("linf", "l2"), {"max_queries": 20, "n_init": 3, "raw_samples": 8, "acq_steps": 2,
                                       "fit_maxiter": 3, "gp_points": 10, "seed": 0}),
    "autoattack": (("linf", "l2"), {"attacks": ["apgd-ce"], "overrides": {"apgd.n_iter": 3}, "seed": 0}),
}


def _attack_cases() -> list[Any]:
    cases = []
    for name in ATTACKS.names():
        norms = ATTACK_CONFIGS[name][0] if name in ATTACK_CONFIGS else ("linf",)
        cases += [pytest.param(name, norm, id=f"{name}-{norm}") for norm in norms]
    return cases


def _supports_targeted(name: str) -> bool:
    return "targeted" in inspect.signature(ATTACKS.get(name)).parameters


def make_attack(name: str, norm: str, **kw: Any) -> Any:
    if name not in ATTACK_CONFIGS:
        pytest.fail(f"attack {name!r} is registered but has no small configuration in ATTACK_CONFIGS "
                    f"(tests/test_contracts.py): add one so that its contract is tested")
    return ATTACKS.get(name)(norm=norm, eps=EPS[norm], **ATTACK_CONFIGS[name][1], **kw)


@pytest.fixture(scope="module")
def victim() -> tuple[RobustModel, torch.Tensor, torch.Tensor]:
    """An untrained tiny net, ``B`` mnist5k test images and the net's own labels (all clean-correct)."""
    model = tiny_classifier().eval()
    x, _ = next(iter(make_loader("mnist5k", "test", batch_size=B, shuffle=True, seed=0)))   # (B, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)                                                               # (B,)
    return model, x, y


def _buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def check_result(res: Any, x: torch.Tensor) -> None:
    assert isinstance(res, AttackResult)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype and res.x_adv.device == x.device
    assert res.success.shape == (x.shape[0],) and res.success.dtype == torch.bool
    assert res.queries.shape == (x.shape[0],) and res.queries.dtype == torch.int64


@pytest.mark.parametrize("name,norm", _attack_cases())
def test_attack_contract(victim, name: str, norm: str) -> None:
    model0, x, y = victim
    model = copy.deepcopy(model0).train()                  # called in train mode: must run in eval, restore
    x_in, y_in, bufs = x.clone(), y.clone(), _buffers(model)
    attack = make_attack(name, norm)
    res = attack(model, x, y)
    check_result(res, x)
    assert torch.equal(x, x_in) and torch.equal(y, y_in)                       # never in place
    assert all(m.training for m in model.modules())                            # mode restored
    assert all(torch.equal(a, b) for a, b in zip(bufs, _buffers(model)))       # BN statistics untouched
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert bool(ThreatModel(norm, EPS[norm]).contains(res.x_adv, x).all())
    with torch.no_grad():
        pred = model0(res.x_adv).argmax(1)
    assert bool(res.success.any()), "a large eps on an untrained net: some image must break"
    assert bool((pred[res.success] != y[res.success]).all()), "success must mean misclassified"
    assert bool((res.queries >= 0).all())
    if res.info.get("queries_counted", True):
        assert bool((res.queries >= 1).all()), "every attacked image costs at least one model query"
    if "max_queries" in ATTACK_CONFIGS[name][1]:
        assert int(res.queries.max()) <= ATTACK_CONFIGS[name][1]["max_queries"]
    json.dumps(attack.params())                                                # results.json-able
    empty = attack(model0, x[:0], y[:0])
    check_result(empty, x[:0])


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if _supports_targeted(n)])
def test_attack_targeted(victim, name: str) -> None:
    model, x, y = victim
    with torch.no_grad():
        target = model(x).topk(2, dim=1).indices[:, 1]                          # (B,) runner-up, never y
    res = make_attack(name, "linf", targeted=True)(model, x, target)
    check_result(res, x)
    assert bool(ThreatModel("linf", EPS["linf"]).contains(res.x_adv, x).all())
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert bool((pred[res.success] == target[res.success]).all()), "targeted success must reach the target"
    assert bool(res.success.any()), "a large eps on an untrained net: some image must reach its runner-up class"


# -- DEFENSES ------------------------------------------------------------------------------------
SMALL_ADV = {"preset": "mnist", "steps": 2, "step_size": 0.15}
DEFENSE_CONFIGS: dict[str, dict[str, Any]] = {
    "standard": {}, "noise": {"sigma": 0.25}, "ibp": {"eps": 0.1},
    "pgd-at": SMALL_ADV, "trades": SMALL_ADV, "mart": SMALL_ADV, "fast-at": {"preset": "mnist"},
    "adr": SMALL_ADV, "dafa": SMALL_ADV, "emma": {"preset": "mnist"},
    "arow": SMALL_ADV, "score": SMALL_ADV, "doubly-robust": SMALL_ADV,
    "awp": {"gamma": 0.01, "warmup_epochs": 0},
    "rwp": {"gamma": 0.01, "warmup_epochs": 0, "c_min": 100.0, "iterations": 2},   # c_min: every sample
    "sam": {"rho": 0.05}, "amp": {"epsilon": 0.5, "inner_steps": 2},
    "denoiser-mse": {"sigma": 0.25}, "denoiser-stab": {"sigma": 0.25, "zo_queries": 4},
    "adaptive-smoothing": {"preset": "mnist", "steps": 2},
}


def _trainee(name: str) -> RobustModel:
    """The model an objective trains: the tiny classifier; a tiny ``denoised`` composite for the
    denoiser objectives (they train its denoiser, the classifier frozen)."""
    if name == "adaptive-smoothing":   # trains the mixing network of a mix composite, members frozen
        torch.manual_seed(0)
        return create("mix", 10, (1, 28, 28), mixing_net=True, alpha=None, width=4)
    if not name.startswith("denoiser-"):
        return tiny_classifier(bn=False)
    torch.manual_seed(0)
    return create("denoised", 10, (1, 28, 28), classifier="ibp-small", depth=3, width=4)


def _is_wrapper(name: str) -> bool:
    return "inner" in inspect.signature(DEFENSES.get(name)).parameters


def _config(name: str) -> dict[str, Any]:
    if name not in DEFENSE_CONFIGS:
        pytest.fail(f"defense {name!r} is registered but has no small configuration in DEFENSE_CONFIGS "
                    f"(tests/test_contracts.py): add one so that its contract is tested")
    return DEFENSE_CONFIGS[name]


OBJECTIVES = [n for n in DEFENSES.names() if not _is_wrapper(n)]
WRAPPERS = [n for n in DEFENSES.names() if _is_wrapper(n)]


@pytest.fixture(scope="module")
def train_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader("mnist5k", "train", batch_size=16, shuffle=False)))


def _step(defense: Defense, model: RobustModel, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, Any]:
    """One Trainer-style step; checks the objective's contract on the way. Returns the logs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ctx = StepContext(epoch=0, epochs=1, step=0, steps_per_epoch=1, optimizer=opt)
    defense.before_loss(model, x, y, ctx)
    loss, logs = defense.loss(model, x, y)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad
    assert math.isfinite(float(loss.detach()))
    assert isinstance(logs, dict) and all(isinstance(k, str) for k in logs)
    assert all(isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and not v.requires_grad)
               for v in logs.values())
    assert model.training, "the objective must hand the model back in train mode"
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), "the loss must reach the weights"
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    opt.step()
    defense.after_step(model, ctx)
    return logs


@pytest.mark.parametrize("name", OBJECTIVES)
def test_defense_contract(train_batch, name: str) -> None:
    x, y = train_batch
    defense = DEFENSES.get(name)(**_config(name))
    assert isinstance(defense, Defense)
    model = _trainee(name).train()
    x_in = x.clone()
    _step(defense, model, x, y, lr=0.01)
    assert torch.equal(x, x_in)
    assert json.loads(json.dumps(defense.params()))["defense"] == name


@pytest.mark.parametrize("inner", OBJECTIVES)
@pytest.mark.parametrize("name", WRAPPERS)
def test_weight_perturbation_wraps_objective(train_batch, name: str, inner: str) -> None:
    """AWP / RWP wrap any objective; RWP needs per-sample losses (``objective``) and says so otherwise.
    With a zero learning rate the perturbation is removed bit for bit after the step."""
    x, y = train_batch
    base = DEFENSES.get(inner)(**_config(inner))
    if name == "rwp" and not hasattr(base, "objective"):
        with pytest.raises(ValueError, match="per-sample"):
            DEFENSES.get(name)(base, **_config(name))
        return
    defense = DEFENSES.get(name)(base, **_config(name))
    model = _trainee(inner).train()
    before = [p.detach().clone() for p in model.parameters()]
    _step(defense, model, x, y, lr=0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    params = json.loads(json.dumps(defense.params()))
    assert params["weight_perturbation"] == name and params["inner"]["defense"] == inner


# -- MODELS --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MODELS.names())
def test_model_contract(arch: str, tmp_path) -> None:
    """Builds with its builder's default input shape, returns (B, K) logits for a non-default K, and a
    save/load round trip gives identical outputs."""
    shape = tuple(inspect.signature(MODELS.get(arch)).parameters["input_shape"].default)
    torch.manual_seed(0)
    model = create(arch, num_classes=7, input_shape=shape).eval()
    assert isinstance(model, RobustModel) and model.num_classes == 7 and tuple(model.input_shape) == shape
    x = torch.rand(2, *shape)                                                   # (2, C, H, W)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 7) and logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
        save(model, tmp_path / "m")
        again = load(tmp_path / "m")
        assert torch.equal(logits, again(x))
    assert again.arch == arch and again.num_classes == 7 and tuple(again.input_shape) == shape


# -- DATASETS ------------------------------------------------------------------------------------
DATA_ROOT = os.environ.get("ROBUSTKIT_DATA_ROOT")   # where torchvision datasets live, if anywhere


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_contract(name: str, split: str) -> None:
    """Every registered dataset available offline: [0, 1] float images (B, C, H, W), labels in range,
    info consistent with ``dataset_info``. Unavailable ones skip with the loader's reason."""
    try:
        data = load_data(name, split, data_root=DATA_ROOT)
    except DatasetError as e:
        pytest.skip(f"{name} not available offline: {e}")
    info = data.info
    assert info.name == name and info == dataset_info(name)
    assert len(data) > 0 and data.images.dim() == 4 and tuple(data.images.shape[1:]) == tuple(info.input_shape)
    assert data.labels.shape == (len(data),) and data.labels.dtype == torch.int64
    assert int(data.labels.min()) >= 0 and int(data.labels.max()) < info.num_classes
    x, y = next(iter(make_loader(name, split, batch_size=8, data_root=DATA_ROOT)))
    assert x.shape == (min(8, len(data)), *info.input_shape) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < info.num_classes
