"""CPR rejection (Chen et al. 2023): ``attacks/cpr.py``, the stratified metrics and ``robustkit reject``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from attacks.cpr import CPR, inner_attack, low_confidence_loss, outer_attack
from robustkit.app.reject import stratified_accuracy
from robustkit.cli import main
from robustkit.errors import InputError
from robustkit.zoo import RobustModel, save


class _Threshold(nn.Module):
    """Two classes by the mean pixel: logits ``(s (m - 0.5), -s (m - 0.5))``; the prediction flips where the
    mean crosses 0.5, so an L-inf ball of radius r around ``x`` holds a flip iff ``|mean(x) - 0.5| < r``
    (up to clipping to [0, 1], which the test images keep clear of)."""

    def __init__(self, scale: float = 50.0) -> None:
        super().__init__()
        self.scale = scale
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2)
        m = z.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([self.w * self.scale * m, -self.w * self.scale * m], 1)


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor([2.0, 0.0, -1.0]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 3): same logits for every input
        return self.b.expand(z.shape[0], 3) + 0 * z.flatten(1).sum(1, keepdim=True)


def _model(net: nn.Module, k: int) -> RobustModel:
    return RobustModel(net, "test", k, (1, 8, 8), (0.0,), (1.0,)).eval()


def _images(means: list[float]) -> torch.Tensor:
    return torch.tensor(means).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()   # (B, 1, 8, 8) constant images


def test_cpr_rejects_where_the_prediction_flips_in_the_ball() -> None:
    model = _model(_Threshold(), 2)
    x = _images([0.2, 0.45, 0.48, 0.53, 0.58, 0.8])      # distance to the boundary 0.3, .05, .02, .03, .08, .3
    cpr = CPR(preset=None, eps_rej=0.06, steps=10, step_size=0.01)
    r = cpr(model, x)
    assert r.rejected.tolist() == [False, True, True, True, False, False]
    assert r.pred.tolist() == [1, 1, 1, 0, 0, 0]
    assert bool((r.x_rej - x).abs().amax((1, 2, 3)).le(0.06 + 1e-6).all())
    r2 = CPR(preset=None, eps_rej=0.01, steps=10, step_size=0.002)(model, x)   # a smaller ball: fewer rejections
    assert r2.rejected.tolist() == [False, False, False, False, False, False]


def test_cpr_never_rejects_a_constant_model() -> None:
    model = _model(_Constant(), 3)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    r = CPR(preset="mnist")(model, x)
    assert not bool(r.rejected.any()) and r.pred.tolist() == [0] * 5
    y = torch.tensor([0, 0, 1, 2, 0])
    assert inner_attack(model, CPR(preset="mnist"), x, y, eps0=0.3, steps=3).tolist() == [False] * 5
    assert outer_attack(model, CPR(preset="mnist"), x, y, eps=0.3, steps=3).tolist() == [False, False, True, True,
                                                                                           False]


def test_bpda_attacks_on_the_threshold_model() -> None:
    model = _model(_Threshold(), 2)
    cpr = CPR(preset=None, eps_rej=0.02, steps=10, step_size=0.005)
    x = _images([0.2, 0.42, 0.8])
    y = torch.tensor([1, 1, 0])
    # inner: a rejected point within 0.1 exists only where the boundary is within 0.1 + 0.02
    assert inner_attack(model, cpr, x, y, eps0=0.1, steps=20).tolist() == [False, True, False]
    # outer: accepted and wrong within 0.3 + margin of CPR's ball: only the first two can be pushed across
    for targets in (0, 1):
        found = outer_attack(model, cpr, x, y, eps=0.15, steps=20, targets=targets)
        assert found.tolist() == [False, True, False]


def test_stratified_metric_by_hand() -> None:
    outer = [True, False, False, False, False]
    inner = {0.0: [False, False, False, False, True],      # point 4 rejected when clean
             0.1: [False, True, False, False, True],       # point 1 rejected within 0.1 eps
             1.0: [True, True, True, False, True]}
    m = stratified_accuracy(outer, inner)
    assert m["robust_accuracy_with_rejection"] == pytest.approx(0.8)
    assert [c["robust_accuracy"] for c in m["curve"]] == pytest.approx([0.6, 0.4, 0.2])
    assert [c["rejection_rate"] for c in m["curve"]] == pytest.approx([0.2, 0.4, 0.8])
    # trapezoid over [0, 1]: 0.1 * (0.6 + 0.4) / 2 + 0.9 * (0.4 + 0.2) / 2 = 0.05 + 0.27
    assert m["curve_auc"] == pytest.approx(0.32)
    with pytest.raises(InputError, match="points"):
        stratified_accuracy([True], {0.0: [True, False]})


def test_low_confidence_loss_is_larger_near_uniform() -> None:
    z = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    u = low_confidence_loss(z)
    assert float(u[1]) > float(u[0]) and float(u[1]) == pytest.approx(np.log(3) + 0.0, abs=0.15)


def test_bad_input() -> None:
    with pytest.raises(InputError, match="unknown CPR preset"):
        CPR(preset="imagenet")
    with pytest.raises(InputError, match="CPR needs eps_rej"):
        CPR(preset=None, steps=3, step_size=0.1)
    with pytest.raises(InputError):
        CPR(preset="mnist", norm="l7")


def test_cli_reject_on_mnist5k(tmp_path, tiny_mnist_model, capsys) -> None:
    save(tiny_mnist_model, tmp_path / "m")
    assert main(["reject", "--model", str(tmp_path / "m"), "--eps", "0.3", "--n", "16", "--steps", "3",
                 "--param", "steps=3", "--targets", "2", "--alphas", "0,0.1,1",
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["n"] == 16 and [c["alpha"] for c in res["curve"]] == [0.0, 0.1, 1.0]
    accs = [c["robust_accuracy"] for c in res["curve"]]
    assert accs == sorted(accs, reverse=True)             # a larger costly ball can only lower the accuracy
    assert accs[0] <= res["robust_accuracy_with_rejection"] <= 1.0
    assert res["targets"] == 2 and res["rejector"]["eps_rej"] == 0.1
    assert (tmp_path / "out" / "plots" / "robustness_curve.png").is_file()
    assert "robust accuracy with rejection" in capsys.readouterr().out
    assert main(["reject", "--model", str(tmp_path / "m"), "--eps", "0.3", "--alphas", "0,2",
                 "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alphas must be numbers in [0, 1]" in err[0] and not (tmp_path / "bad").exists()


def test_inner_rejections_carry_over_to_larger_balls(monkeypatch: pytest.MonkeyPatch) -> None:
    """``B(x, a eps)`` lies inside every larger ball: a rejection the inner attack finds at a small alpha counts
    at every larger alpha even when the attack at the larger radius misses it (else the curve is too high)."""
    import robustkit.app.reject as rj

    model = _model(_Constant(), 3)
    x, y = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 0, 0])

    def flaky(model, cpr, x, y, *, eps0, **kw):   # finds point 1 only in the 0.1-eps ball
        return torch.tensor([False, abs(eps0 - 0.03) < 1e-9, False])

    monkeypatch.setattr(rj, "inner_attack", flaky)
    out = rj.evaluate_batch(model, CPR(preset="mnist"), x, y, eps=0.3, alphas=[1.0, 0.1, 0.0, 0.5], attacks=[],
                            steps=1, restarts=1)
    assert {a: v.tolist() for a, v in out["inner_rejected"].items()} == {
        0.0: [False, False, False], 0.1: [False, True, False], 0.5: [False, True, False], 1.0: [False, True, False]}


def test_out_that_is_a_file_is_refused_before_the_evaluation(tmp_path, tiny_mnist_model, capsys) -> None:
    save(tiny_mnist_model, tmp_path / "m")
    (tmp_path / "f").write_text("x")
    assert main(["reject", "--model", str(tmp_path / "m"), "--eps", "0.3", "--n", "4", "--steps", "1",
                 "--out", str(tmp_path / "f"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output directory" in err[0] and (tmp_path / "f").read_text() == "x"
