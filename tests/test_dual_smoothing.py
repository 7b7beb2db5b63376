"""Dual randomized smoothing (Xia et al. 2024): the pixel split, closed-form coverage, contract, CLI, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

import robustkit.cli as cli
from certify import Certificate, Certifier, DualSmoothingCertifier, image_seeds
from certify.dual_smoothing import dual_max_radius
from robustkit.composite import DualSubimageNet, checkerboard_merge, checkerboard_split, dual_model
from robustkit.errors import InputError
from robustkit.registry import CERTIFIERS
from robustkit.zoo import RobustModel, create, load, save

SIGMA = 0.5


# -- the split --------------------------------------------------------------------------------------
def test_checkerboard_split_is_a_permutation():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    left, right = checkerboard_split(x)
    assert left.shape == right.shape == (2, 3, 4, 3)
    assert left[0, 0, 0].tolist() == [0, 2, 4] and right[0, 0, 0].tolist() == [1, 3, 5]     # even row
    assert left[0, 0, 1].tolist() == [7, 9, 11] and right[0, 0, 1].tolist() == [6, 8, 10]   # odd row: shifted
    assert torch.equal(checkerboard_merge(left, right), x)
    assert sorted(torch.cat([left.flatten(), right.flatten()]).tolist()) == x.flatten().tolist()
    d = torch.randn(5, 1, 28, 28)
    dl, dr = checkerboard_split(d)                      # ||d||^2 = ||d_l||^2 + ||d_r||^2: the radius rule needs it
    sq = [t.flatten(1).norm(dim=1) ** 2 for t in (d, dl, dr)]
    assert torch.allclose(sq[0], sq[1] + sq[2])
    with pytest.raises(InputError, match="width must be even"):
        checkerboard_split(torch.zeros(1, 1, 4, 5))


# -- closed form: two linear sub-classifiers ---------------------------------------------------------
def _linear(w: torch.Tensor, b: float) -> RobustModel:
    """Two-class linear classifier of a (1, 2, 1) sub-image: class 0 iff ``w.z + b > 0``."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w, -w]) / 2)
        lin.bias.copy_(torch.tensor([b / 2, -b / 2]))
    return RobustModel(nn.Sequential(nn.Flatten(), lin), "linear", 2, (1, 2, 1), (0.0,), (1.0,))


WL, BL, WR, BR = torch.tensor([0.8, -0.6]), 0.1, torch.tensor([-1.0, 2.0]), -0.3


def _dual_linear() -> RobustModel:
    net = DualSubimageNet(_linear(WL, BL), _linear(WR, BR))
    return RobustModel(net, "dual-subimage", 2, (1, 2, 2), (0.0,), (1.0,)).eval()


def _image(m_left: float, m_right: float) -> torch.Tensor:
    """A (1, 1, 2, 2) image whose left / right sub-images lie at signed distances ``m_left`` / ``m_right``
    from their classifiers' boundaries (class-0 side when positive)."""
    def place(w: torch.Tensor, b: float, m: float) -> torch.Tensor:
        z0 = torch.full((2,), 0.5)
        return z0 + (m - (w @ z0 + b) / w.norm()) * w / w.norm()

    left, right = place(WL, BL, m_left), place(WR, BR, m_right)
    return checkerboard_merge(left.view(1, 1, 2, 1), right.view(1, 1, 2, 1))


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("pl,pr", [(0.9, 0.6), (0.995, 0.995), (0.97, 0.4)])
def test_certified_radius_fails_at_most_alpha(sequential, pl, pr):
    """p_s = Phi(m_s / sigma); g predicts 0 iff m_l + m_r > 0, a linear function of x with gradient norm
    sqrt(2), so g's true radius is (m_l + m_r) / sqrt(2). Over many independent certifications, the fraction
    of wrong certificates stays <= alpha -- also when one side is below 1/2 (pr = 0.4)."""
    torch.manual_seed(2)
    alpha, copies = 0.05, 3000
    m_l, m_r = SIGMA * norm.ppf(pl), SIGMA * norm.ppf(pr)
    true_radius = (m_l + m_r) / math.sqrt(2)
    model = _dual_linear()
    x = _image(m_l, m_r).expand(copies, 1, 2, 2).contiguous()
    with torch.no_grad():
        assert model(x[:1]).argmax(1).item() == 0
    cert = DualSmoothingCertifier(sigma=SIGMA, n0=50, n=1000, alpha=alpha, batch_size=20_000,
                                  sequential=sequential)(model, x)
    wrong = ~cert.abstained & ((cert.prediction != 0) | (cert.radius > true_radius))
    assert wrong.float().mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / copies)
    certified = ~cert.abstained
    assert certified.float().mean() > 0.9                                          # not vacuous
    assert cert.radius[certified].mean() > 0.6 * true_radius
    lo_l, lo_r = cert.info["pA_lower_left"].numpy(), cert.info["pA_lower_right"].numpy()
    np.testing.assert_allclose(cert.radius[certified].numpy(),
                               (SIGMA * (norm.ppf(lo_l) + norm.ppf(lo_r)) / math.sqrt(2))[certified.numpy()],
                               rtol=1e-9)
    samples = cert.info["samples"]
    assert (samples <= 2 * (50 + 1000)).all() and (samples > 100).all()
    if sequential:
        assert samples.float().mean() < 2 * (50 + 1000)                         # some branches stopped early
    else:
        assert (samples == 2 * (50 + 1000)).all()
    if (pl, pr) == (0.9, 0.6):
        # the official code's sqrt(R_l^2 + R_r^2) overshoots g's radius whenever the sides differ
        rl, rr = (cert.info[k].clamp_min(0) for k in ("radius_left", "radius_right"))
        official = (rl ** 2 + rr ** 2).sqrt()
        assert ((official > true_radius) & certified).float().mean() > 0.5


def test_max_radius_and_all_votes():
    """A far-away image: every vote agrees on both sides, the radius is the maximum for these settings."""
    model = _dual_linear()
    x = _image(50.0, 50.0)
    cert = DualSmoothingCertifier(sigma=SIGMA, n0=20, n=500, alpha=0.01)(model, x, seeds=torch.tensor([3]))
    assert not cert.abstained.item() and cert.prediction.item() == 0
    assert cert.radius.item() == pytest.approx(dual_max_radius(SIGMA, 500, 0.01))
    assert dual_max_radius(SIGMA, 500, 0.01) == pytest.approx(math.sqrt(2) * SIGMA * norm.ppf(0.005 ** (1 / 500)))


def test_boundary_point_abstains():
    torch.manual_seed(0)
    x = _image(0.3, -0.3).repeat(20, 1, 1, 1)                 # m_l + m_r = 0: on g's boundary
    cert = DualSmoothingCertifier(sigma=SIGMA, n0=20, n=500, alpha=0.01)(_dual_linear(), x)
    assert cert.abstained.float().mean() > 0.8 and (cert.radius[cert.abstained] == 0).all()


# -- contract on a real composite ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def dual_mnist() -> RobustModel:
    torch.manual_seed(0)
    return create("dual-subimage", 10, (1, 28, 28), sub_arch="ibp-small").eval()


def test_certifier_contract_on_dual_model(dual_mnist, mnist_test_batch):
    certifier = CERTIFIERS.get("dual-smoothing")(sigma=0.25, n0=10, n=60, alpha=0.01, batch_size=128)
    assert isinstance(certifier, Certifier) and certifier.name == "dual-smoothing" and certifier.norm == "l2"
    assert not certifier.deterministic and certifier.radius_scale == 0.25 and "alpha/2" in certifier.guarantee
    json.dumps(certifier.params())
    with pytest.raises(TypeError):
        CERTIFIERS.get("dual-smoothing")(0.25)
    x = mnist_test_batch[0][:5].clone()
    x0, seeds = x.clone(), image_seeds(0, range(5))
    model = dual_mnist.train()
    try:
        cert = certifier(model, x, seeds=seeds)
        assert all(m.training for m in model.modules())                          # modes restored
    finally:
        model.eval()
    assert torch.equal(x, x0) and isinstance(cert, Certificate)
    assert cert.prediction.dtype == torch.int64 and cert.radius.dtype == torch.float64 and cert.radius.shape == (5,)
    assert (cert.prediction[cert.abstained] == -1).all() and (cert.radius[cert.abstained] == 0).all()
    assert all(v.shape == (5,) for v in cert.info.values())
    # per-image seeds: an image alone, another batch size, the same certificate
    alone = CERTIFIERS.get("dual-smoothing")(sigma=0.25, n0=10, n=60, alpha=0.01, batch_size=7)(
        model, x[3:4], seeds=seeds[3:4])
    assert torch.equal(alone.radius, cert.radius[3:4]) and torch.equal(alone.prediction, cert.prediction[3:4])
    assert torch.equal(alone.info["pA_lower_left"], cert.info["pA_lower_left"][3:4])


def test_dual_model_roundtrip(tmp_path):
    torch.manual_seed(0)
    left, right = create("ibp-small", 10, (1, 28, 14)), create("ibp-small", 10, (1, 28, 14))
    model = dual_model(left, right).eval()
    x = torch.rand(3, 1, 28, 28)
    xl, xr = checkerboard_split(x)
    with torch.no_grad():
        want = torch.log((left(xl).softmax(1) + right(xr).softmax(1)) / 2)
        assert torch.allclose(model(x), want, atol=1e-6)
        again = load(save(model, tmp_path / "m"))
        assert torch.equal(again(x), model(x)) and again.arch == "dual-subimage"
    with pytest.raises(InputError, match="share arch"):
        dual_model(left, create("lenet", 10, (1, 28, 14)))


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [({"sigma": 0}, "sigma"), ({"n0": 0}, "n0"),
                                    ({"n0": 20, "n": 10}, "n0 must be <= n"), ({"alpha": 1.0}, "alpha"),
                                    ({"first": 0}, "first"), ({"growth": 1.0}, "growth")])
def test_bad_settings(kw, msg):
    with pytest.raises(InputError, match=msg):
        DualSmoothingCertifier(**kw)


def test_bad_model_and_input(tiny_mnist_model, dual_mnist):
    c = DualSmoothingCertifier(n0=5, n=10)
    with pytest.raises(InputError, match="needs a dual-subimage model"):
        c(tiny_mnist_model, torch.rand(2, 1, 28, 28))
    with pytest.raises(InputError, match=r"float image batch"):
        c(dual_mnist, torch.rand(1, 28, 28))
    with pytest.raises(InputError, match="seeds must have shape"):
        c(dual_mnist, torch.rand(2, 1, 28, 28), seeds=torch.arange(3))
    with pytest.raises(InputError, match="takes images"):
        c(dual_mnist, torch.rand(2, 1, 28, 26))
    with pytest.raises(InputError, match="even image width"):
        create("dual-subimage", 10, (1, 28, 27))


# -- the CLI on mnist5k ----------------------------------------------------------------------------------
def test_cli_dual_smoothing_end_to_end(dual_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ["certify"])
    model_dir = save(dual_mnist, tmp_path / "dual")
    out = tmp_path / "out"
    argv = ["certify", "--model", str(model_dir), "--method", "dual-smoothing", "--n0", "10", "--n", "100",
            "--alpha", "0.01", "--sigma", "0.25", "--batch-size", "500", "--n-images", "4", "--out", str(out),
            "--device", "cpu"]
    assert cli.main(argv) == 0
    assert "dual-smoothing" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["certifier"] == "dual-smoothing" and res["n"] == 4 and res["norm"] == "l2"
    assert res["params"]["n"] == 100 and res["max_radius"] == pytest.approx(dual_max_radius(0.25, 100, 0.01))
    for r in res["per_sample"]:
        assert r["samples"] == 2 * (10 + 100) and (r["radius"] == 0) == r["abstained"]
        assert {"pA_lower_left", "pA_lower_right", "radius_left", "radius_right"} <= set(r)
    assert (out / "report.md").is_file()
    # an ordinary classifier is refused with one line, exit 2
    plain = save(create("ibp-small", 10, (1, 28, 28)), tmp_path / "plain")
    argv[2] = str(plain)
    assert cli.main(argv[:-2] + ["--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a dual-subimage model" in err[0]
    assert not (tmp_path / "o2").exists()                                    # nothing written before the check
