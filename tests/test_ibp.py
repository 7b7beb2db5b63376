"""IBP / CROWN-IBP: soundness first (bounds contain every point of the ball), then the API,
the certifiers, the training objective and its schedule, and the pipeline's IBP results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certify.base import Certificate
from certify.ibp import (
    UnsupportedLayerError,
    certified_radius,
    certify,
    ibp_and_crown_margins,
    interval_bounds,
    margin_bounds,
)
from defenses._ibp_schedule import IBPSchedule, ramp
from defenses.base import StepContext
from defenses.ibp import IBPTraining
from robustkit.app._certify_report import write_outputs
from robustkit.app.certify import Points, certified_at, certify_points
from robustkit.registry import CERTIFIERS, DEFENSES
from robustkit.threat import ThreatModel
from robustkit.zoo import RobustModel, create

SHAPE, K = (2, 8, 8), 5


def _randomize_bn(net: nn.Module, g: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g))   # negative scales too
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


def _nets() -> dict[str, nn.Module]:
    c = SHAPE[0]
    return {
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(c * 64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                             nn.Linear(16, K)),
        "conv": nn.Sequential(nn.Conv2d(c, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                              nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 20), nn.ReLU(), nn.Linear(20, K)),
        "bn": nn.Sequential(nn.Conv2d(c, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 16),
                            nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, K)),
        "avgpool": nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                                 nn.Linear(6 * 16, 12), nn.ReLU(), nn.Linear(12, K)),
        "maxpool": nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(6 * 16, K)),
        "nested": nn.Sequential(nn.Sequential(nn.Conv2d(c, 4, 3), nn.Identity(), nn.ReLU()), nn.Dropout(0.5),
                                nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4 * 36, 10), nn.ReLU())),
                                nn.Linear(10, K), nn.Identity()),
    }


def _model(name: str, seed: int = 0) -> RobustModel:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _nets()[name]
    _randomize_bn(net, g)
    mean = tuple(float(v) for v in torch.rand(SHAPE[0], generator=g) * 0.5)
    std = tuple(float(v) for v in torch.rand(SHAPE[0], generator=g) * 0.5 + 0.2)
    return RobustModel(net, name, K, SHAPE, mean, std).double().eval()


def _ball_points(x: torch.Tensor, eps: float, n: int, norm: str = "linf") -> torch.Tensor:
    """``(n, B, C, H, W)`` points of the ball ∩ [0, 1]: half uniform, half corners (sign vectors)."""
    g = torch.Generator().manual_seed(1)
    b = x.shape[0]
    if norm == "linf":
        u = torch.rand((n // 2, *x.shape), generator=g, dtype=x.dtype) * 2 - 1
        s = torch.randint(0, 2, (n - n // 2, *x.shape), generator=g).to(x.dtype) * 2 - 1
        delta = torch.cat([u, s]) * eps
    else:
        d = torch.randn((n, *x.shape), generator=g, dtype=x.dtype)
        d = d / d.flatten(2).norm(dim=2).view(n, b, 1, 1, 1)
        r = torch.ones(n, b, 1, 1, 1, dtype=x.dtype)
        r[: n // 2] = torch.rand(n // 2, b, 1, 1, 1, generator=g, dtype=x.dtype)
        delta = d * r * eps
    return (x.unsqueeze(0) + delta).clamp(0, 1)


def _logits_at(model: nn.Module, pts: torch.Tensor) -> torch.Tensor:
    n, b = pts.shape[:2]
    with torch.no_grad():
        return model(pts.flatten(0, 1)).view(n, b, -1)                      # (n, B, K)


def _inputs(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


ALL = list(_nets())
CROWN = ALL                          # every layer type has a backward rule (certify/_layers.py), max pooling too
TOL = 1e-9


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_interval_and_margin_bounds_contain_every_sampled_point(name: str, norm: str) -> None:
    model, x = _model(name), _inputs()
    eps = 0.05 if norm == "linf" else 0.4
    y = torch.tensor([0, 1, 2, 3])
    pts = _ball_points(x, eps, 2000, norm)
    z = _logits_at(model, pts)                                               # (n, B, K)
    lo, hi = interval_bounds(model, x, eps, norm=norm)
    assert (z >= lo - TOL).all() and (z <= hi + TOL).all()
    true_margin = z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1)) - z  # (n, B, K)
    mb = margin_bounds(model, x, y, eps, norm=norm)
    assert (true_margin >= mb - TOL).all()
    naive = lo.gather(1, y.view(-1, 1)) - hi
    naive = naive.scatter(1, y.view(-1, 1), 0.0)
    assert (mb >= naive - TOL).all()
    assert (mb > naive + 1e-6).any(), "last-layer elision should be strictly tighter somewhere"
    if name in CROWN:
        ibp, crown = ibp_and_crown_margins(model, x, y, eps, norm=norm)
        assert torch.allclose(ibp, mb)
        assert (true_margin >= crown - TOL).all()
        both = margin_bounds(model, x, y, eps, norm=norm, method="crown-ibp")
        assert (both >= mb).all() and (true_margin >= both - TOL).all()


@pytest.mark.parametrize("name", ALL)
def test_eps_zero_is_exact(name: str) -> None:
    model, x = _model(name), _inputs()
    y = torch.tensor([4, 3, 2, 1])
    z = model(x).detach()
    lo, hi = interval_bounds(model, x, 0.0)
    assert torch.allclose(lo, z, atol=1e-10) and torch.allclose(hi, z, atol=1e-10)
    exact = z.gather(1, y.view(-1, 1)) - z
    method = "crown-ibp" if name in CROWN else "ibp"
    assert torch.allclose(margin_bounds(model, x, y, 0.0, method=method), exact, atol=1e-9)


def test_l2_first_layer_uses_the_exact_dual_norm() -> None:
    """A linear model on a ball inside [0, 1]: the L2 bounds are exact (random points cannot probe that)."""
    lin = nn.Linear(SHAPE[0] * 64, K).double()
    model = RobustModel(nn.Sequential(nn.Flatten(), lin), "lin", K, SHAPE, (0.1, 0.2), (0.5, 0.25)).double().eval()
    x, eps, y = torch.full((2, *SHAPE), 0.5, dtype=torch.float64), 0.3, torch.tensor([1, 3])
    z = model(x).detach()
    std = torch.tensor([0.5, 0.25], dtype=torch.float64).repeat_interleave(64)
    w = lin.weight.detach() / std                                             # (K, D) in pixel space
    lo, hi = interval_bounds(model, x, eps, norm="l2")
    assert torch.allclose(lo, z - eps * w.norm(dim=1)) and torch.allclose(hi, z + eps * w.norm(dim=1))
    exact = z.gather(1, y.view(-1, 1)) - z - eps * (w[y].unsqueeze(1) - w.unsqueeze(0)).norm(dim=2)
    assert torch.allclose(margin_bounds(model, x, y, eps, norm="l2", method="crown-ibp"), exact)


def test_per_sample_eps_tensor_matches_scalar_calls() -> None:
    model, x = _model("conv"), _inputs()
    eps = torch.tensor([0.0, 0.01, 0.05, 0.2], dtype=torch.float64)
    lo, hi = interval_bounds(model, x, eps)
    for i in range(4):
        lo_i, hi_i = interval_bounds(model, x[i:i + 1], float(eps[i]))
        assert torch.allclose(lo[i], lo_i[0]) and torch.allclose(hi[i], hi_i[0])
    width = (hi - lo).sum(1)
    assert (width[1:] >= width[:-1]).all()


def test_crown_ibp_is_tighter_on_a_trained_model(tiny_mnist_model: RobustModel,
                                                 mnist_test_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = mnist_test_batch
    ibp, crown = ibp_and_crown_margins(tiny_mnist_model, x[:16], y[:16], 0.02)
    both = margin_bounds(tiny_mnist_model, x[:16], y[:16], 0.02, method="crown-ibp")
    assert (both >= ibp).all() and torch.equal(both, torch.maximum(ibp, crown))
    assert (crown > ibp).float().mean() > 0.5  # CROWN is usually tighter on a naturally trained net


def _pgd_breaks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int = 20
                ) -> torch.Tensor:
    """A tiny L-inf PGD (CE, random start) on the per-sample ``eps``: ``(B,)`` bool, label changed."""
    tm = ThreatModel("linf", eps)
    x_adv = tm.random_start(x, torch.Generator().manual_seed(0))
    broken = torch.zeros_like(y, dtype=torch.bool)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        broken |= logits.argmax(1) != y
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_adv)
        x_adv = tm.project(tm.step(x_adv.detach(), grad, tm.default_step_size(steps)), x)
    return broken | (model(x_adv).argmax(1) != y)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_certified_radius_is_certified_monotone_and_unbreakable(
        tiny_mnist_model: RobustModel, mnist_test_batch: tuple[torch.Tensor, torch.Tensor], method: str) -> None:
    model, (x, y) = tiny_mnist_model, mnist_test_batch
    tol = 2e-3
    r = certified_radius(model, x, y, method=method, tol=tol, max_eps=0.25)
    correct = model(x).argmax(1) == y
    assert r.shape == (x.shape[0],) and (r[~correct] == 0).all()
    pos = r > 0
    assert pos.sum() >= 10, "the tiny model should certify a few samples at small radii"
    assert certify(model, x[pos], y[pos], r[pos], method).all()
    assert certify(model, x[pos], y[pos], r[pos] / 2, method).all()
    if method == "ibp":  # IBP bounds only widen with eps, so radius + tol is not certified
        assert not certify(model, x[pos], y[pos], r[pos] + 1.01 * tol, method).any()
    assert not _pgd_breaks(model, x[pos], y[pos], r[pos]).any()
    # and at a fixed eps: certified samples resist PGD
    cert = certify(model, x, y, 0.01, method)
    assert not _pgd_breaks(model, x[cert], y[cert], torch.full((int(cert.sum()),), 0.01)).any()


def test_certifier_registry_returns_certificates(tiny_mnist_model: RobustModel,
                                                 mnist_test_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = mnist_test_batch[0][:8], mnist_test_batch[1][:8]
    for name in ("ibp", "crown-ibp"):
        cert = CERTIFIERS.get(name)(tol=1e-2, max_eps=0.2)(tiny_mnist_model, x)
        assert isinstance(cert, Certificate) and cert.radius.shape == (8,) and not cert.abstained.any()
        assert 0.0 <= cert.certified_accuracy(y, 0.0) <= 1.0


def test_unsupported_layers_are_named() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"PreActResNet.*PreActBlock.*residual"):
        interval_bounds(create("preact-resnet18", 10, (3, 32, 32)).eval(), torch.rand(1, 3, 32, 32), 0.1)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(UnsupportedLayerError, match=r"model\.2: Tanh"):
        margin_bounds(tanh, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1)
    with pytest.raises(UnsupportedLayerError, match="BatchNorm2d in train mode"):
        interval_bounds(_model("bn").train(), _inputs(), 0.1)
    assert issubclass(UnsupportedLayerError, ValueError)


def test_invalid_arguments() -> None:
    model, x, y = _model("mlp"), _inputs(), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        interval_bounds(model, x, -0.1)
    with pytest.raises(ValueError):
        margin_bounds(model, x, y, torch.tensor([0.1, -0.1, 0.1, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        certify(model, x, y, 0.1, method="crown")
    with pytest.raises(ValueError, match="norm"):
        interval_bounds(model, x, 0.1, norm="l1")


# -- training --------------------------------------------------------------------------------
def test_schedule_has_the_promised_ramps() -> None:
    s = IBPSchedule(eps_train=0.2, kappa_final=0.5, warmup_fraction=0.1, ramp_fraction=0.4)
    assert s.eps(0.0) == 0.0 and s.kappa(0.0) == 1.0 and s.beta(0.0) == 1.0 and s.in_warmup(0.05)
    assert s.eps(0.1) == 0.0 and s.kappa(0.1) == 1.0
    assert s.eps(0.3) == pytest.approx(0.1) and s.kappa(0.3) == pytest.approx(0.75) and s.beta(0.3) == 0.5
    assert s.eps(0.5) == pytest.approx(0.2) and s.kappa(0.5) == 0.5 and s.beta(0.5) == 0.0
    assert s.eps(1.0) == pytest.approx(0.2) and s.kappa(1.0) == 0.5
    eps = [s.eps(t / 100) for t in range(101)]
    assert all(a <= b for a, b in zip(eps, eps[1:]))
    assert ramp(0.5, 2.0, 4.0, 0.0, 0.0) == 4.0
    with pytest.raises(ValueError):
        IBPSchedule(eps_train=0.1, warmup_fraction=0.6, ramp_fraction=0.6)


def test_defense_defaults_follow_gowal_et_al() -> None:
    d = DEFENSES.get("ibp")(eps="0.1")
    assert isinstance(d, IBPTraining) and d.eps_train == pytest.approx(0.11) and d.kappa_final == 0.5
    assert d.warmup_fraction == pytest.approx(2 / 60) and d.ramp_fraction == pytest.approx(10 / 60)
    d.before_loss(nn.Identity(), torch.zeros(1), torch.zeros(1), StepContext(0, 60, 1_000, 1_000))  # 1k / 60k
    assert d._eps == 0.0 and d._kappa == 1.0
    d.before_loss(nn.Identity(), torch.zeros(1), torch.zeros(1), StepContext(7, 60, 7_000, 1_000))  # mid-ramp
    assert d._eps == pytest.approx(0.055) and d._kappa == pytest.approx(0.75)


def test_ibp_training_lowers_its_loss(mnist_test_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28)).train()
    d = IBPTraining(eps=0.05, crown_ibp=True)
    d.set_progress(0.0)                                  # warm-up: nominal loss only, no bounds needed
    loss, logs = d.loss(model, x, y)
    assert loss.item() == pytest.approx(logs["nominal_ce"].item()) and "robust_ce" not in logs
    d.set_progress(0.1)                                  # mid-ramp: beta mix of CROWN-IBP and IBP
    assert 0 < d._beta < 1
    d.loss(model, x, y)[0].backward()
    d.set_progress(1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss, logs = d.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and set(logs) >= {"loss", "robust_ce", "verified_acc", "eps", "kappa"}


def test_ibp_training_rejects_batchnorm_in_train_mode() -> None:
    model = _model("bn").float().train()
    with pytest.raises(UnsupportedLayerError, match="BN-free"):
        IBPTraining(eps=0.1).loss(model, _inputs().float(), torch.tensor([0, 1, 2, 3]))


# -- the pipeline's IBP results ---------------------------------------------------------------
def test_anchor_splits_the_bisection_at_eps(tiny_mnist_model: RobustModel,
                                            mnist_test_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """With the threat eps as anchor, radius >= eps exactly when certified at eps; the radius is certified."""
    model, (x, y) = tiny_mnist_model, mnist_test_batch
    eps = 0.0123
    r = certified_radius(model, x, y, "ibp", tol=1e-2, max_eps=0.25, anchor=eps)
    assert r.dtype == torch.float64
    assert torch.equal(r >= eps, certify(model, x, y, eps, "ibp"))
    pos = r > 0
    assert certify(model, x[pos], y[pos], r[pos], "ibp").all()
    plain = certified_radius(model, x, y, "ibp", tol=1e-2, max_eps=0.25)
    assert ((r - plain).abs() <= 1e-2).all()                    # both within tol of the same largest radius


def test_pipeline_ibp_results_and_plot(tiny_mnist_model: RobustModel,
                                       mnist_test_batch: tuple[torch.Tensor, torch.Tensor], tmp_path) -> None:
    x, y = mnist_test_batch[0][:40], mnist_test_batch[1][:40]
    certifier = CERTIFIERS.get("crown-ibp")(eps="1/100", tol=2e-2, max_eps=0.25, batch_size=24)
    res = certify_points(tiny_mnist_model, Points.first(x, y), certifier, chunk=16, progress=False)
    flags = certify(tiny_mnist_model, x, y, 0.01, "crown-ibp")
    assert res["certifier"] == "crown-ibp" and res["params"]["eps"] == 0.01 and res["n"] == 40
    assert torch.equal(certified_at(res, 0.01), flags)                       # radius >= eps <=> certified at eps
    clean = float((tiny_mnist_model(x).argmax(1) == y).float().mean())
    assert 0 < float(flags.float().mean()) <= clean == pytest.approx(res["clean_accuracy"])
    curve = res["curve"]
    assert curve["certified_accuracy"][0] == pytest.approx(clean)
    assert curve["radius"][4] == 0.01 and curve["certified_accuracy"][4] == pytest.approx(float(flags.float().mean()))
    assert res["average_certified_radius"] == pytest.approx(sum(r["radius"] for r in res["per_sample"]
                                                                if r["correct"]) / 40)
    write_outputs(tmp_path, res)
    assert (tmp_path / "plots" / "certified_accuracy.png").is_file() and (tmp_path / "report.md").is_file()
