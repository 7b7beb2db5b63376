"""Hard-label BO attack (attacks/bo_hard_label.py): label-only access, query budget, ball/box,
success on an easy model, batched == one-image, input validation. Tiny images, small budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacks._oracle import LabelOracle, QueryBudgetError
from attacks._subspace import latent_dim, to_image
from attacks.bo_hard_label import BOHardLabel
from robustkit.errors import InputError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202 - tiny GPs: thread start-up costs more than it saves on shared cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class LogitsRead(AssertionError):
    pass


class Guarded(torch.Tensor):
    """Logits that can only be turned into labels (``argmax``); any other read raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        if func in (torch.Tensor.argmax, torch.argmax):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise LogitsRead(f"logits were read through {getattr(func, '__name__', func)}")


class MeanThreshold(nn.Module):
    """2 classes: class 1 iff the image mean is above ``t``. Deterministic, breakable only near ``t``."""

    def __init__(self, t: float = 0.5) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2)
        m = x.flatten(1).mean(1) - self.t
        return torch.stack([-m, m], 1) * 10


class GuardedModel(nn.Module):
    """Wraps a net: counts every evaluated row; returns ``Guarded`` logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.net(x).as_subclass(Guarded)


def images(values: list[float], shape: tuple[int, int, int] = (1, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, *shape).clone()  # constant images (B, C, H, W)
    return x, (x.flatten(1).mean(1) > 0.5).long()


def attack(**kw) -> BOHardLabel:  # noqa: ANN003
    base = {"eps": 0.3, "max_queries": 8, "n_init": 3, "dim": 2, "seed": 0, "raw_samples": 16, "acq_steps": 2,
            "fit_maxiter": 5, "bisect_steps": 2}
    return BOHardLabel(**{**base, **kw})


def test_guard_really_guards() -> None:
    g = GuardedModel(MeanThreshold())(images([0.4])[0])
    assert g.argmax(1).tolist() == [0] and type(g.argmax(1)) is torch.Tensor
    for read in (lambda t: t.max(), lambda t: t.softmax(1), lambda t: t[:, 0], lambda t: t + 0, lambda t: t.tolist()):
        with pytest.raises(LogitsRead):
            read(g)


@pytest.mark.parametrize("objective", ["distance", "indicator"])
@pytest.mark.parametrize("acquisition", ["ei", "ucb", "random"])
def test_label_only_and_every_query_counted(acquisition: str, objective: str) -> None:
    model = GuardedModel(MeanThreshold())
    x, y = images([0.45, 0.55, 0.05, 0.95])
    res = attack(acquisition=acquisition, objective=objective, max_queries=20)(model, x, y)  # raises on logit reads
    assert model.rows == int(res.queries.sum())                   # every model row is a counted query
    assert res.success.tolist() == [True, True, False, False]     # 0.05 / 0.95 are out of reach at eps=0.3
    assert res.queries[2:].tolist() == [20, 20] and bool((res.queries[:2] >= 1).all())


def test_oracle_budget_and_no_logits() -> None:
    model = MeanThreshold()
    oracle = LabelOracle(model, n=2, max_queries=2)
    x, _ = images([0.4, 0.6])
    assert not any(isinstance(getattr(oracle, k, None), nn.Module) for k in oracle.__slots__)
    out = oracle(x, torch.tensor([0, 1]))
    assert out.dtype == torch.long and out.tolist() == [0, 1]
    oracle(x[:1], torch.tensor([0]))
    with pytest.raises(QueryBudgetError):
        oracle(x[:1], torch.tensor([0]))
    assert oracle.counts.tolist() == [2, 1] and oracle.remaining().tolist() == [0, 1]


@settings(max_examples=8, deadline=None)
@given(budget=st.integers(1, 7), n_init=st.integers(1, 4), acq=st.sampled_from(["ei", "ucb", "random"]),
       norm=st.sampled_from(["linf", "l2"]), objective=st.sampled_from(["distance", "indicator"]))
def test_budget_never_exceeded(budget: int, n_init: int, acq: str, norm: str, objective: str) -> None:
    n_init = min(n_init, budget)
    model = GuardedModel(MeanThreshold(t=2.0))                     # unbreakable: every image spends the budget
    x, _ = images([0.2, 0.7])
    y = torch.zeros(2, dtype=torch.long)
    res = attack(max_queries=budget, n_init=n_init, acquisition=acq, norm=norm, eps=0.5, objective=objective)(
        model, x, y)
    assert res.queries.tolist() == [budget, budget] and model.rows == 2 * budget
    assert not bool(res.success.any()) and torch.equal(res.x_adv, x)


@settings(max_examples=10, deadline=None)
@given(budget=st.integers(1, 30), bisect=st.integers(0, 6), norm=st.sampled_from(["linf", "l2"]))
def test_budget_never_exceeded_while_bisecting(budget: int, bisect: int, norm: str) -> None:
    model = GuardedModel(MeanThreshold(t=0.5))                     # flips far outside the ball: rays bisect
    x, y = images([0.7, 0.75])
    eps = 0.05 if norm == "linf" else 0.4
    res = attack(max_queries=budget, n_init=min(3, budget), norm=norm, eps=eps, max_scale=12.0,
                 bisect_steps=bisect)(model, x, y)
    assert res.queries.tolist() == [budget, budget] and model.rows == 2 * budget
    assert not bool(res.success.any())
    assert all(1.0 < t <= 12.0 for t in res.info["ray_distance"])
    if budget >= 20 and bisect >= 3:                                # the boundary was found and bisected
        assert any(t < 12.0 for t in res.info["ray_distance"]) and res.info["bo_steps"] < budget


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
@pytest.mark.parametrize("subspace", ["fft", "upsample"])
def test_results_inside_ball_and_box(norm: str, eps: float, subspace: str) -> None:
    x, y = images([0.49, 0.51, 0.97, 0.02])
    x = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    y = (x.flatten(1).mean(1) > 0.5).long()
    x0 = x.clone()
    res = attack(norm=norm, eps=eps, subspace=subspace, max_queries=16)(MeanThreshold(), x, y)
    assert torch.equal(x, x0)                                       # input untouched
    assert bool(ThreatModel(norm, eps).contains(res.x_adv, x).all())
    assert bool(res.success[:2].all())                             # near the threshold: easy
    pred = MeanThreshold()(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)                     # success is judged on x_adv itself


def test_easy_model_targeted_and_mode_restored() -> None:
    model = MeanThreshold().train()
    x, y = images([0.4, 0.6])
    res = attack(targeted=True, max_queries=12)(model, x, 1 - y)   # target: the other class
    assert bool(res.success.all()) and model.training
    assert torch.equal(MeanThreshold()(res.x_adv).argmax(1), 1 - y)


def test_batched_equals_one_image_at_a_time() -> None:
    model = MeanThreshold()
    x, y = images([0.45, 0.05, 0.58, 0.9])
    atk = attack(max_queries=8)
    batched = atk(model, x, y)
    single = [atk(model, x[i:i + 1], y[i:i + 1]) for i in range(len(y))]
    assert batched.success.tolist() == [bool(s.success[0]) for s in single] == [True, False, True, False]
    for i, s in enumerate(single):                                  # same per-image random stream
        if int(s.queries[0]) <= atk.n_init:
            assert int(batched.queries[i]) == int(s.queries[0])


def test_subspace_maps() -> None:
    z = torch.randn(3, latent_dim("fft", 3, 2), dtype=torch.float64)
    d = to_image(z, "fft", 3, (2, 8, 8))
    assert d.shape == (3, 2, 8, 8) and d.dtype == torch.float64
    assert torch.allclose(to_image(2 * z, "fft", 3, (2, 8, 8)), 2 * d)  # linear
    u = to_image(torch.arange(4.0).view(1, 4), "upsample", 2, (1, 4, 4))
    assert u[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_registry_and_cli_introspection() -> None:
    from robustkit.app.build import attack_kwargs, build_chain

    assert ATTACKS.get("bo-hard-label") is BOHardLabel
    accepted, required, _ = attack_kwargs(BOHardLabel)
    assert {"norm", "eps", "max_queries", "subspace", "dim", "n_init", "acquisition", "targeted", "seed"} <= accepted
    assert required == {"eps"}
    (a,) = build_chain(["bo-hard-label"], {"eps": 0.3, "max_queries": 50, "subspace": "upsample"}, seed=3)
    assert a.max_queries == 50 and a.seed == 3 and a.params()["subspace"] == "upsample"


@pytest.mark.parametrize("kw,words", [
    ({"eps": -0.1}, "eps"), ({"max_queries": 3, "n_init": 5}, "n_init"), ({"subspace": "dct"}, "unknown subspace"),
    ({"acquisition": "pi"}, "unknown acquisition"), ({"norm": "l1"}, "norm"), ({"max_queries": 0}, "max_queries"),
    ({"dim": 0}, "dim"), ({"beta": -1.0}, "beta"), ({"objective": "margin"}, "unknown objective"),
    ({"bisect_steps": -1}, "bisect_steps"), ({"max_scale": 1.0}, "max_scale"), ({"gp_points": 1}, "gp_points"),
    ({"trust_region": "maybe"}, "trust_region"), ({"latent_radius": 0.0}, "latent_radius"),
])
def test_bad_input(kw: dict, words: str) -> None:
    with pytest.raises(InputError, match=words):
        BOHardLabel(**{"eps": 0.3, **kw})


def test_dim_too_large_for_images() -> None:
    x, y = images([0.4])
    with pytest.raises(InputError, match="too large"):
        BOHardLabel(eps=0.3, subspace="fft", dim=6, max_queries=5)(MeanThreshold(), x, y)  # fft on 8x8: dim <= 5
    with pytest.raises(InputError, match="too large"):
        BOHardLabel(eps=0.3, subspace="upsample", dim=9, max_queries=5)(MeanThreshold(), x, y)


@pytest.mark.slow
def test_cli_end_to_end(tiny_mnist_model, tmp_path: Path) -> None:  # noqa: ANN001
    import json

    from robustkit.cli import main
    from robustkit.zoo import save

    model_dir = save(tiny_mnist_model, tmp_path / "model")
    out = tmp_path / "bo"
    assert main(["attack", "--device", "cpu", "--n", "6", "--model", str(model_dir), "--attack", "bo-hard-label",
                 "--eps", "0.3", "--max-queries", "12", "--param", "raw_samples=16", "--param", "acq_steps=2",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["params"][0]["max_queries"] == 12
