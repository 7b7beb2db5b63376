"""Denoised smoothing (Salman et al. 2020) and its zeroth-order variant (Zhang et al. 2022): the composite,
the frozen classifier, the RGE estimate, closed-form coverage of the composite, training + CLI on mnist5k."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

import robustkit.cli as cli
from certify import Smooth, SmoothingCertifier, image_seeds
from defenses import DenoiserMSE, DenoiserStab
from defenses.denoiser import frozen
from defenses.trainer import fit
from robustkit.composite import DenoisedNet, DnCNN, denoised_model
from robustkit.data import Data, TensorLoader, load_data
from robustkit.errors import InputError
from robustkit.zoo import RobustModel, create, load, save


def _loader(n: int, batch_size: int = 32, seed: int = 0) -> TensorLoader:
    data = load_data("mnist5k", "train")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorLoader(Data(data.info, data.images[idx], data.labels[idx]), batch_size=batch_size, shuffle=True,
                        seed=seed)


def _noisy_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return float((model(x + sigma * torch.randn(x.shape, generator=g)).argmax(1) == y).float().mean())


def test_dncnn_and_composite(tiny_mnist_model, tmp_path):
    torch.manual_seed(0)
    d = DnCNN(1, depth=4, width=8)
    assert len([m for m in d.modules() if isinstance(m, nn.Conv2d)]) == 4
    assert d(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    comp = denoised_model(tiny_mnist_model, depth=3, width=8).eval()
    with torch.no_grad():
        comp.net.denoiser.body[-1].weight.zero_()
        comp.net.denoiser.body[-1].bias.zero_()                    # residual learning: D = identity
        x = torch.rand(4, 1, 28, 28)
        assert torch.equal(comp(x), tiny_mnist_model(x))
        again = load(save(comp, tmp_path / "c"))
        assert again.arch == "denoised" and torch.equal(again(x), comp(x))
    with pytest.raises(InputError, match="depth must be"):
        DnCNN(1, depth=1)


# -- the objectives: frozen classifier, RGE -------------------------------------------------------------
@pytest.mark.parametrize("defense", [DenoiserMSE(sigma=0.5), DenoiserStab(sigma=0.5),
                                     DenoiserStab(sigma=0.5, target="label"), DenoiserStab(sigma=0.5, zo_queries=8)],
                         ids=["mse", "stab", "clf", "zo-stab"])
def test_only_the_denoiser_learns(defense, tiny_mnist_model):
    torch.manual_seed(0)
    comp = denoised_model(tiny_mnist_model, depth=3, width=8)
    clf_before = {k: v.clone() for k, v in comp.net.classifier.state_dict().items()}
    den_before = [p.detach().clone() for p in comp.net.denoiser.parameters()]
    opt = torch.optim.SGD(comp.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)   # all parameters
    fit(comp, defense, _loader(64), epochs=1, optimizer=opt)
    assert all(torch.equal(v, clf_before[k]) for k, v in comp.net.classifier.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(den_before, comp.net.denoiser.parameters()))


def test_rge_estimates_the_classifier_gradient(tiny_mnist_model):
    """E[RGE] -> grad as q grows and mu -> 0: with q = 20,000 directions in d = 784 the estimate points along
    the autograd gradient of the frozen classifier's loss (cosine > 0.9); the cosine grows with q."""
    torch.manual_seed(0)
    z = torch.rand(2, 1, 28, 28)
    t = torch.tensor([3, 7])
    zg = z.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(F.cross_entropy(frozen(tiny_mnist_model, zg), t, reduction="sum"), zg)
    cos = []
    for q in (200, 20_000):
        est, loss0, _ = DenoiserStab(zo_queries=q, zo_mu=0.005)._rge(tiny_mnist_model, z, t)
        cos.append(F.cosine_similarity(est.flatten(1), true.flatten(1)).min().item())
        assert loss0.item() == pytest.approx(F.cross_entropy(tiny_mnist_model(z), t).item(), rel=1e-5)
    assert cos[1] > 0.9 and cos[1] > cos[0]


def test_bad_settings_and_models(tiny_mnist_model, mnist_test_batch):
    for kw, msg in (({"sigma": 0}, "sigma"), ({"target": "soft"}, "target"), ({"zo_queries": 0}, "zo_queries"),
                    ({"zo_mu": -1.0}, "zo_mu")):
        with pytest.raises(InputError, match=msg):
            DenoiserStab(**kw)
    x, y = mnist_test_batch
    with pytest.raises(InputError, match="trains the denoiser of a 'denoised' model"):
        DenoiserMSE().loss(tiny_mnist_model, x[:4], y[:4])
    with pytest.raises(InputError, match="denoised_model takes a RobustModel"):
        denoised_model(nn.Linear(2, 2))


# -- closed form: a shifting denoiser in front of a linear classifier ----------------------------------
def _closed_form(w: torch.Tensor, b: float, shift: float) -> RobustModel:
    """D(x) = x - shift (the DnCNN body is a constant), F(z) = class 0 iff w.z + b > 0: g's radius at x is
    (w.(x - shift) + b) / ||w||, the distance to the composite's boundary."""
    den = DnCNN(1, depth=2, width=1)
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        for p in den.parameters():
            p.zero_()
        den.body[-1].bias.fill_(shift)
        lin.weight.copy_(torch.stack([w, -w]) / 2)
        lin.bias.copy_(torch.tensor([b / 2, -b / 2]))
    clf = RobustModel(nn.Sequential(nn.Flatten(), lin), "linear", 2, (1, 2, 2), (0.0,), (1.0,))
    return RobustModel(DenoisedNet(den, clf), "denoised", 2, (1, 2, 2), (0.0,), (1.0,)).eval()


@pytest.mark.parametrize("pA", [0.8, 0.99])
def test_composite_certificate_fails_at_most_alpha(pA):
    """Plain ``smoothing`` certifies the composite: over many certifications of one image the fraction of
    wrong certificates (wrong class or radius above the closed-form one) stays <= alpha."""
    torch.manual_seed(3)
    sigma, alpha, copies, shift = 0.5, 0.05, 3000, 0.2
    w, b = torch.tensor([1.0, -0.5, 0.7, 0.2]), -0.4
    model = _closed_form(w, b, shift)
    true_radius = sigma * norm.ppf(pA)
    x0 = torch.full((4,), 0.5)
    margin = (w @ (x0 - shift) + b) / w.norm()
    x = (x0 + (true_radius - margin) * w / w.norm()).view(1, 1, 2, 2).expand(copies, 1, 2, 2).contiguous()
    with torch.no_grad():
        assert model(x[:1]).argmax(1).item() == 0
    cert = SmoothingCertifier(sigma=sigma, n0=50, n=1000, alpha=alpha, batch_size=20_000)(model, x)
    wrong = ~cert.abstained & ((cert.prediction != 0) | (cert.radius > true_radius))
    assert wrong.float().mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / copies)
    assert (~cert.abstained).float().mean() > 0.9 and cert.radius[~cert.abstained].mean() > 0.6 * true_radius
    # without the shift the same image sits elsewhere relative to the boundary: the denoiser is in the loop
    unshifted = Smooth(_closed_form(w, b, 0.0), 2, sigma).certify(x[:200], n0=50, n=1000, alpha=alpha)
    assert abs(unshifted.radius.mean().item() - cert.radius[:200].mean().item()) > 0.05


# -- training helps, then smoothing certifies the composite (mnist5k) ------------------------------------
def test_denoiser_training_helps_the_frozen_classifier(tiny_mnist_model, mnist_test_batch):
    """MSE then Stab (Salman et al.'s recipe), a few hundred steps: the classifier's accuracy on noisy images
    rises once the denoiser is in front of it, and smoothing certifies more at radius sigma / 2."""
    torch.manual_seed(0)
    sigma = 0.5
    x, y = mnist_test_batch
    comp = denoised_model(tiny_mnist_model, depth=3, width=16)
    fit(comp, DenoiserMSE(sigma=sigma), _loader(1000), epochs=1,
        optimizer=torch.optim.Adam(comp.parameters(), lr=2e-3))
    fit(comp, DenoiserStab(sigma=sigma), _loader(500, seed=1), epochs=1,
        optimizer=torch.optim.Adam(comp.parameters(), lr=2e-4))
    before, after = _noisy_accuracy(tiny_mnist_model, x, y, sigma), _noisy_accuracy(comp, x, y, sigma)
    assert after > before + 0.05, (before, after)
    cert = SmoothingCertifier(sigma=sigma, n0=20, n=200, alpha=0.01, batch_size=2000)
    seeds = image_seeds(0, range(16))
    ca = [cert(m, x[:16], seeds=seeds).certified_accuracy(y[:16], sigma / 2) for m in (tiny_mnist_model, comp)]
    assert ca[1] >= ca[0], ca


def test_cli_train_denoiser_then_certify(tiny_mnist_model, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["train", "certify"])
    start = save(denoised_model(tiny_mnist_model, depth=2, width=4), tmp_path / "start")
    run = tmp_path / "run"
    assert cli.main(["train", "--model", str(start), "--defense", "denoiser-mse", "--set", "defense.params.sigma=0.5",
                     "--epochs", "1", "--batch-size", "32", "--set", "data.n_train=64", "--eval-n", "20",
                     "--set", "eval.attack=null", "--set", "eval.best_by=clean_accuracy", "--optimizer", "adam",
                     "--lr", "0.001", "--dataset", "mnist5k", "--out", str(run), "--device", "cpu"]) == 0
    trained = load(run)
    assert trained.arch == "denoised"
    assert torch.equal(trained.net.classifier.net[0].weight, tiny_mnist_model.net[0].weight)   # frozen
    out = tmp_path / "cert"
    assert cli.main(["certify", "--model", str(run), "--method", "smoothing", "--sigma", "0.5", "--n0", "10",
                     "--n", "50", "--alpha", "0.01", "--n-images", "3", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["certifier"] == "smoothing" and res["n"] == 3
    # a plain classifier handed to a denoiser objective: exit 2, one line
    plain = save(create("ibp-small", 10, (1, 28, 28)), tmp_path / "plain")
    assert cli.main(["train", "--model", str(plain), "--defense", "denoiser-stab", "--epochs", "1",
                     "--set", "data.n_train=32", "--set", "eval.attack=null", "--dataset", "mnist5k",
                     "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    assert not (tmp_path / "bad").exists()                                  # refused before anything is written
