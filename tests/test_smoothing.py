"""Randomized smoothing (Cohen et al. 2019): statistics, PREDICT / CERTIFY, validity, the noise defense."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from certify import Certificate, CheckpointCS, Smooth, binom_test, clopper_pearson_lower, clopper_pearson_upper
from certify.smoothing import SmoothingCertifier, max_radius
from defenses.noise import GaussianNoise
from robustkit.registry import CERTIFIERS, DEFENSES
from robustkit.zoo import RobustModel


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread hand-offs cost more than they save on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- statistics ----------------------------------------------------------------------
def test_clopper_pearson_known_values():
    # the exact 95% interval of 5/10 is (0.18709, 0.81291): each side is one-sided at 2.5%
    assert clopper_pearson_lower(5, 10, 0.025) == pytest.approx(0.187086028, abs=1e-8)
    assert clopper_pearson_upper(5, 10, 0.025) == pytest.approx(0.812913972, abs=1e-8)
    # all n votes for cA: pABar = alpha ** (1 / n) (this sets the largest certifiable radius)
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** 0.01, rel=1e-10)
    assert clopper_pearson_lower(0, 100, 0.001) == 0.0
    assert clopper_pearson_upper(100, 100, 0.001) == 1.0
    assert clopper_pearson_upper(0, 50, 0.01) == pytest.approx(1 - 0.01 ** (1 / 50), rel=1e-10)
    assert max_radius(0.25, 100_000, 0.001) == pytest.approx(0.25 * norm.ppf(0.001 ** 1e-5))


def test_clopper_pearson_is_exact_tail_inversion():
    k, n, alpha = np.array([1, 7, 40, 99, 3000]), np.array([10, 20, 50, 100, 10_000]), 0.01
    lo, hi = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    np.testing.assert_allclose(binom.sf(k - 1, n, lo), alpha, rtol=1e-6)   # P(X >= k | p = lo) = alpha
    np.testing.assert_allclose(binom.cdf(k, n, hi), alpha, rtol=1e-6)      # P(X <= k | p = hi) = alpha
    assert np.all(lo < k / n) and np.all(hi > k / n)
    lo_t = clopper_pearson_lower(torch.tensor([7]), torch.tensor([20]), alpha)
    assert lo_t.shape == (1,) and lo_t[0] == pytest.approx(lo[1])


def test_binom_test_two_sided():
    assert binom_test(7, 10) == pytest.approx(0.34375)               # 2 * P(X >= 7), p = 1/2
    assert binom_test(10, 10) == pytest.approx(2 * 0.5 ** 10)
    np.testing.assert_allclose(binom_test(np.array([5, 60]), np.array([10, 100])), [1.0, 0.056887], atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_stats_reject_bad_alpha(bad):
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        clopper_pearson_lower(3, 10, bad)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson_lower(11, 10, 0.1)


def test_checkpoint_schedule():
    cs = CheckpointCS(100_000, 0.001, first=100, growth=2.0)
    assert cs.checkpoints[0] == 100 and cs.checkpoints[-1] == 100_000
    assert all(b > a for a, b in zip(cs.checkpoints, cs.checkpoints[1:]))
    assert cs.alpha_per_look == pytest.approx(0.001 / len(cs.checkpoints))
    assert CheckpointCS(50, 0.1, first=100).checkpoints == (50,)
    assert cs.lower(100, 100) == pytest.approx(clopper_pearson_lower(100, 100, cs.alpha_per_look))
    with pytest.raises(ValueError, match="not a checkpoint"):
        cs.lower(5, 150)
    with pytest.raises(ValueError, match="growth must be > 1"):
        CheckpointCS(1000, 0.1, growth=1.0)


def test_checkpoint_cs_is_time_uniform():
    """Monte Carlo: P(p < lower at ANY checkpoint) <= alpha, whereas per-look CP without the
    union bound (peeking) is violated more often than alpha."""
    rng = np.random.default_rng(0)
    p, alpha, paths = 0.8, 0.1, 20_000
    cs = CheckpointCS(3000, alpha, first=20, growth=1.5)
    ts = np.array(cs.checkpoints)
    steps = rng.binomial(np.diff(np.concatenate([[0], ts]))[None, :], p, size=(paths, len(ts)))
    k = steps.cumsum(1)                                                    # (paths, K) successes
    miss_cs = np.zeros(paths, bool)
    miss_peek = np.zeros(paths, bool)
    for j, t in enumerate(ts):
        miss_cs |= cs.lower(k[:, j], int(t)) > p
        miss_peek |= clopper_pearson_lower(k[:, j], int(t), alpha) > p
    slack = 3 * math.sqrt(alpha * (1 - alpha) / paths)
    assert miss_cs.mean() <= alpha + slack
    assert miss_peek.mean() > alpha + slack          # naive repeated looks break the guarantee


# -- closed-form base classifier: f(x) = [w.x + b > 0] on a (1, 2, 2) image ------------------
def _linear_model(w: torch.Tensor, b: float, mean: float = 0.1, std: float = 0.5) -> RobustModel:
    """2-class linear classifier whose *pixel-space* decision function is ``w.x + b`` (the model
    normalizes first, so the net's weights are ``w * std``): class 0 iff ``w.x + b > 0``."""
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        w_net = w * std                                                  # (w*std).((x-mean)/std) = w.x - w.mean
        lin.weight.copy_(torch.stack([w_net, -w_net]) / 2)
        bias = (b + float(w.sum()) * mean) / 2
        lin.bias.copy_(torch.tensor([bias, -bias]))
    return RobustModel(nn.Sequential(nn.Flatten(), lin), "linear", 2, (1, 2, 2), (mean,), (std,)).eval()


def _copies(margin: float, w: torch.Tensor, b: float, copies: int) -> torch.Tensor:
    """``copies`` of one image at L2 distance ``margin`` from the boundary, class 0 side."""
    x0 = torch.full((4,), 0.5)
    x0 = x0 + (margin - (w @ x0 + b) / w.norm()) * w / w.norm()
    return x0.view(1, 1, 2, 2).expand(copies, 1, 2, 2).contiguous()


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("pA", [0.75, 0.995])
def test_certified_radius_fails_at_most_alpha(sequential, pA):
    """pA = Phi(margin / sigma) and the true radius of g is the margin itself (||w|| cancels).
    Over many independent certifications, the fraction of wrong certificates stays <= alpha."""
    torch.manual_seed(1)
    sigma, alpha, copies = 0.5, 0.05, 3000
    w, b = torch.tensor([0.6, -1.2, 0.3, 0.9]), -0.1
    true_radius = sigma * norm.ppf(pA)                                   # = distance to the boundary
    model = _linear_model(w, b)
    x = _copies(true_radius, w, b, copies)
    with torch.no_grad():                                                # base classifier sanity: class 0 at x
        assert (model(x[:1]).argmax(1) == 0).all()
    cert = Smooth(model, 2, sigma).certify(x, n0=50, n=1000, alpha=alpha, batch_size=20_000, sequential=sequential)
    wrong = ~cert.abstained & ((cert.prediction != 0) | (cert.radius > true_radius))
    assert wrong.float().mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / copies)
    certified = ~cert.abstained
    assert certified.float().mean() > 0.9                                 # not vacuous
    assert cert.radius[certified].mean() > 0.6 * true_radius
    samples = cert.info["samples"]
    assert samples.shape == (copies,) and (samples <= 1000).all()
    if sequential:
        assert samples.float().mean() < 1000                             # some copies stopped early
    else:
        assert (samples == 1000).all()
    np.testing.assert_allclose(cert.radius[certified].numpy(),
                               sigma * norm.ppf(cert.info["pA_lower"][certified].numpy()), rtol=1e-9)


def test_boundary_point_abstains():
    """On the decision boundary pA = 1/2 exactly: PREDICT and CERTIFY abstain."""
    torch.manual_seed(0)
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    model = _linear_model(w, 0.0)
    x = _copies(0.0, w, 0.0, 200)
    smooth = Smooth(model, 2, 0.25)
    pred = smooth.predict(x, n=500, alpha=0.001, batch_size=50_000)
    assert pred.shape == (200,) and pred.dtype == torch.long
    assert (pred == Smooth.ABSTAIN).float().mean() > 0.95
    cert = smooth.certify(x, n0=20, n=500, alpha=0.001, batch_size=50_000)
    assert isinstance(cert, Certificate)
    assert cert.abstained.float().mean() > 0.95
    assert (cert.prediction[cert.abstained] == -1).all() and (cert.radius[cert.abstained] == 0).all()
    seq = smooth.certify(x[:50], n0=20, n=5000, alpha=0.001, batch_size=50_000, sequential=True)
    assert seq.abstained.all()


class _Constant(nn.Module):
    def __init__(self, k: int, c: int) -> None:
        super().__init__()
        self.k, self.c = k, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, K)
        return nn.functional.one_hot(torch.full((x.shape[0],), self.c), self.k).float()


def test_constant_classifier_gets_the_maximal_radius():
    smooth = Smooth(_Constant(5, 3), 5, 0.5)
    x = torch.rand(4, 3, 8, 8)
    assert (smooth.predict(x, n=100, alpha=0.01, batch_size=64) == 3).all()
    cert = smooth.certify(x, n0=10, n=300, alpha=0.01, batch_size=64)
    assert (cert.prediction == 3).all() and not cert.abstained.any()
    torch.testing.assert_close(cert.radius, torch.full((4,), max_radius(0.5, 300, 0.01), dtype=cert.radius.dtype))
    # sequential: never more than n, and the tol rule only stops when the radius is within tol of the best
    seq = Smooth(_Constant(5, 3), 5, 0.5).certify(x, n0=10, n=20_000, alpha=0.01, batch_size=4096,
                                                  sequential=True, tol=0.1)
    assert (seq.info["samples"] < 20_000).all()
    best = 0.5 * norm.ppf(clopper_pearson_lower(20_000, 20_000, CheckpointCS(20_000, 0.01).alpha_per_look))
    assert (seq.radius >= best - 0.1 - 1e-9).all()


class _LevelClassifier(nn.Module):
    """Class = the image's mean brightness bucket (0..K-1); noise with small sigma cannot move it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x.mean((1, 2, 3)) * 10).floor().clamp(0, 9).long()
        return nn.functional.one_hot(level, 10).float()


def test_images_packed_in_one_batch_keep_their_own_votes():
    """n smaller than batch_size and not dividing it: rows of several images share forward batches."""
    levels = torch.tensor([0.05, 0.95, 0.35, 0.55, 0.15, 0.75, 0.25])
    x = levels.view(-1, 1, 1, 1).expand(7, 1, 16, 16).contiguous()
    smooth = Smooth(_LevelClassifier(), 10, 0.01)
    cert = smooth.certify(x, n0=3, n=37, alpha=0.01, batch_size=64)
    assert cert.prediction.tolist() == (levels * 10).floor().long().tolist()
    assert (cert.info["nA"] == 37).all()
    assert smooth.predict(x, n=37, alpha=0.01, batch_size=50).tolist() == cert.prediction.tolist()


def test_model_mode_is_restored_and_input_unchanged():
    model = _linear_model(torch.tensor([1.0, 1.0, 0.0, 0.0]), -0.5).train()
    x = torch.rand(3, 1, 2, 2)
    x0 = x.clone()
    Smooth(model, 2, 0.25).certify(x, n0=5, n=20, alpha=0.1, batch_size=16)
    assert model.training and torch.equal(x, x0)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma must be a number > 0"),
    ({"sigma": -1.0}, "sigma must be a number > 0"),
    ({"n0": 200, "n": 100}, r"n0 must be <= n"),
    ({"n0": 0}, "n0 must be an integer >= 1"),
    ({"n": 0}, "n must be an integer >= 1"),
    ({"alpha": 0.0}, r"alpha must be in \(0, 1\)"),
    ({"alpha": 1.0}, r"alpha must be in \(0, 1\)"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"tol": -0.1, "sequential": True}, "tol must be >= 0"),
])
def test_validation(kwargs, match):
    model = _linear_model(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.0)
    sigma = kwargs.pop("sigma", 0.25)
    args = {"n0": 10, "n": 100, "alpha": 0.01, "batch_size": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        Smooth(model, 2, sigma).certify(torch.rand(2, 1, 2, 2), **args)


def test_validation_inputs():
    model = _linear_model(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.0)
    smooth = Smooth(model, 2, 0.25)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        smooth.certify(torch.rand(1, 2, 2), n0=1, n=10, alpha=0.1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        smooth.predict(torch.rand(1, 1, 2, 2), n=10, alpha=2.0)
    with pytest.raises(ValueError, match="num_classes"):
        Smooth(model, 1, 0.25)


def test_registered():
    assert CERTIFIERS.get("smoothing") is SmoothingCertifier
    assert DEFENSES.get("noise") is GaussianNoise


# -- Gaussian-noise training ------------------------------------------------------------
def test_noise_defense_trains_and_does_not_clip():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 4, 4)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    model = RobustModel(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), "tiny", 2, (1, 4, 4), (0.5,), (0.25,))
    seen = []
    model.net.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    defense = GaussianNoise(sigma=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def avg_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(sum(defense.loss(model, x, y)[0] for _ in range(20)) / 20)

    before = avg_loss()
    model.train()
    for _ in range(30):
        opt.zero_grad()
        loss, logs = defense.loss(model, x, y)
        loss.backward()
        opt.step()
    assert set(logs) == {"loss", "noisy_acc"}
    assert avg_loss() < before
    pixels = torch.cat(seen) * 0.25 + 0.5                                # undo Normalize: pixel space
    assert pixels.min() < 0 and pixels.max() > 1                         # not clipped to [0, 1]
    assert defense.params()["sigma"] == 0.5
    with pytest.raises(TypeError):
        GaussianNoise(0.5)  # type: ignore[misc]  # keyword-only
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(sigma=-1.0)
