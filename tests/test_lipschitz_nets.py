"""Lipschitz-by-construction layers and nets (robustkit._lipschitz_*) and the EMMA loss.

Soundness: every ``lipschitz_bound()`` is >= the exact spectral norm of the dense Jacobian (float64,
small inputs, several random inits and points); for the linear operators the Jacobian *is* the
operator, so the bound is checked against the operator's exact norm. Tightness checks make sure
the bounds are not vacuous (orthogonal layers ~1, the DFT bound within a few % of the exact norm).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.emma import EMMA, emma_logits
from robustkit._lipschitz_bounds import conv_bound
from robustkit._lipschitz_layers import LiResConv, LLNHead, MinMax, OrthoLinear, OrthoPatchConv, SLLConv, SLLLinear
from robustkit._lipschitz_nets import LipschitzNet, lipschitz_split, model_lipschitz
from robustkit.errors import InputError
from robustkit.zoo import RobustModel, create, load, save

SEEDS = (0, 1, 2)


def jacobian_norm(f, x: torch.Tensor) -> float:
    """Exact ``||J_f(x)||_2`` of ``f: (1, *shape) -> (1, ...)`` at ``x`` (float64)."""
    jac = torch.autograd.functional.jacobian(lambda z: f(z.view_as(x)).flatten(), x.flatten())
    return float(torch.linalg.matrix_norm(jac, ord=2))


def worst_jacobian(f, shape: tuple[int, ...], points: int = 3, scale: float = 1.0) -> float:
    g = torch.Generator().manual_seed(123)
    return max(jacobian_norm(f, scale * torch.randn(1, *shape, generator=g, dtype=torch.float64))
               for _ in range(points))


# -- the DFT bound of a convolution --------------------------------------------------------------
@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,size", [
    (3, 4, 3, 1, 1, 1, 1, 6), (2, 5, 3, 2, 1, 1, 1, 7), (4, 4, 3, 1, 2, 2, 1, 6),
    (4, 6, 5, 1, 0, 1, 2, 7), (1, 3, 4, 2, 0, 1, 1, 8), (2, 2, 3, 3, (1, 0), 1, 1, 7),
])
def test_conv_bound_is_an_upper_bound(cin, cout, k, stride, padding, dilation, groups, size):
    for seed in SEEDS:
        torch.manual_seed(seed)
        w = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)
        exact = worst_jacobian(lambda x, w=w: F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation,
                                                       groups=groups), (cin, size, size), points=1)
        bound = conv_bound(w, (size, size), stride, padding, dilation, groups)
        assert bound >= exact * (1 - 1e-9)
        if stride == 1:
            assert bound <= 1.5 * exact, "the circular bound of a stride-1 conv is close to its norm"


def test_conv_bound_exact_for_the_identity():
    w = torch.zeros(3, 3, 3, 3)
    w[:, :, 1, 1] = torch.eye(3)
    assert conv_bound(w, (5, 5), padding=1) == pytest.approx(1.0, abs=1e-5)


# -- layers --------------------------------------------------------------------------------------
LAYERS = {
    "sll-conv": (lambda: SLLConv(3, 5), (3, 6, 6)),
    "sll-linear": (lambda: SLLLinear(12, 7), (12,)),
    "patch-conv-up": (lambda: OrthoPatchConv(1, 8, 2), (1, 5, 5)),        # 4 -> 8: columns orthonormal
    "patch-conv-down": (lambda: OrthoPatchConv(4, 6, 2), (4, 6, 6)),      # 16 -> 6: rows orthonormal
    "ortho-linear": (lambda: OrthoLinear(20, 8), (20,)),
    "lln-head": (lambda: LLNHead(16, 10), (16,)),
    "minmax": (lambda: MinMax(), (6, 3, 3)),
    "liresconv": (lambda: LiResConv(4, (5, 5), scale=1.0), (4, 5, 5)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_bound_covers_jacobian(name):
    make, shape = LAYERS[name]
    for seed in SEEDS:
        torch.manual_seed(seed)
        layer = make().double().eval()
        if name == "liresconv":                    # a non-trivial residual branch (the init is ~ identity)
            with torch.no_grad():
                layer.weight.normal_(0, 0.3)
        bound = layer.lipschitz_bound()
        exact = worst_jacobian(layer, shape, points=3, scale=2.0)
        assert bound >= exact * (1 - 1e-9), f"{name}: bound {bound} < Jacobian norm {exact}"
        if name.startswith(("sll", "patch", "ortho", "minmax")):
            assert bound <= 1.0 + 1e-5, f"{name} must be 1-Lipschitz by construction"
        if name.startswith(("patch", "ortho")):
            assert exact >= 0.98, f"{name}: an orthogonalised layer keeps its top singular value ~1"


def test_liresconv_estimate_converges_below_the_bound():
    torch.manual_seed(0)
    block = LiResConv(6, (6, 6), scale=1.0, n_iter=200).double().train()
    with torch.no_grad():
        block.weight.normal_(0, 0.3)
    est = float(block.lipschitz_estimate().detach())               # 200 power iterations
    exact = worst_jacobian(lambda x: F.conv2d(x, block.kernel(), padding=1), (6, 6, 6), points=1)
    assert est == pytest.approx(exact, rel=1e-3)
    assert exact <= block.lipschitz_bound() <= 1.5 * exact
    assert block.lipschitz_estimate().requires_grad


def test_liresconv_refuses_images_larger_than_its_bound_covers():
    """A zero-padded convolution's norm grows with the image: the bound for 3x3 inputs is below the norm on
    32x32 ones, so the block must not run there (the certifier would trust the smaller bound)."""
    torch.manual_seed(0)
    block = LiResConv(4, (3, 3)).double()
    with torch.no_grad():
        block.weight.normal_()
    big = worst_jacobian(lambda x: F.conv2d(x, block.kernel(), padding=1), (4, 12, 12), points=1)
    assert big > block.lipschitz_bound()
    with pytest.raises(InputError, match="built for 3x3"):
        block(torch.zeros(1, 4, 12, 12, dtype=torch.float64))
    assert block(torch.zeros(1, 4, 2, 3, dtype=torch.float64)).shape == (1, 4, 2, 3)   # smaller: a restriction


@pytest.mark.parametrize("arch, kw", [("sll-small", {"width": 0}), ("sll-small", {"dense": 0}),
                                      ("liresnet-small", {"width": 0}), ("liresnet-small", {"depth": 2.5})])
def test_builders_refuse_bad_sizes(arch, kw):
    with pytest.raises(InputError):
        create(arch, 10, (1, 28, 28), **kw)


def test_sll_is_not_the_identity():
    """The SLL residual branch is active: the layer moves its input."""
    torch.manual_seed(0)
    layer = SLLConv(3, 6)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert float((layer(x) - x).norm()) > 1e-3 * float(x.norm())


# -- nets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sll-small", "liresnet-small"])
def test_net_bound_covers_jacobian(arch):
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = create(arch, 5, (1, 8, 8), mean=(0.5,), std=(0.5,), width=4, dense=16).double().eval()
        if arch == "liresnet-small":
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, LiResConv):
                        m.weight.normal_(0, 0.3)
        bound = model_lipschitz(model)                       # includes Normalize's 1 / std = 2
        assert bound == pytest.approx(2 * model.net.lipschitz_bound())
        exact = worst_jacobian(model, (1, 8, 8), points=3)
        assert bound >= exact * (1 - 1e-9), f"{arch}: bound {bound} < Jacobian norm {exact}"
        g = torch.Generator().manual_seed(seed)
        x, x2 = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64).split(1)
        with torch.no_grad():
            assert float((model(x) - model(x2)).norm()) <= bound * float((x - x2).norm())


def test_net_bound_survives_save_load(tmp_path):
    torch.manual_seed(0)
    model = create("liresnet-small", 10, (1, 28, 28))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LiResConv):
                m.weight.normal_(0, 0.3)
    save(model, tmp_path / "m")
    assert model_lipschitz(load(tmp_path / "m")) == pytest.approx(model_lipschitz(model), rel=1e-6)


def test_model_lipschitz_rejects_other_nets():
    with pytest.raises(InputError, match="Lipschitz"):
        model_lipschitz(create("ibp-small", 10, (1, 28, 28)))


def test_split_of_a_plain_sequential_bounds_the_net():
    """lc * ||W_head||_2 bounds a Conv/ReLU/Linear net (the generic EMMA path)."""
    for seed in SEEDS:
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding="same"),
                            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 12), nn.ReLU(), nn.Linear(12, 5))
        model = RobustModel(net.double(), "tiny", 5, (1, 8, 8), (0.5,), (0.25,))
        lc, w = lipschitz_split(model)
        bound = float(lc.detach()) * float(torch.linalg.matrix_norm(w.detach(), ord=2))
        assert bound >= worst_jacobian(model, (1, 8, 8)) * (1 - 1e-6)
        assert lc.requires_grad and w.requires_grad


def test_split_rejects_unknown_layers():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 36, 3))
    with pytest.raises(InputError, match="BatchNorm2d"):
        lipschitz_split(RobustModel(net, "tiny", 3, (1, 8, 8), (0.0,), (1.0,)))


# -- EMMA ----------------------------------------------------------------------------------------
@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = create("sll-small", 10, (1, 28, 28), width=4, dense=32).train()
    return model, torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))


def test_emma_equals_ce_at_eps_zero(batch):
    model, x, y = batch
    loss, _ = EMMA(preset=None, eps=0.0, min_ratio=1.0, max_ratio=1.0, ramp_fraction=0.0).loss(model, x, y)
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y)
    assert float(loss.detach()) == pytest.approx(float(ce), rel=1e-6)


def test_emma_loss_finite_gradients_flow_and_exceeds_ce(batch):
    model, x, y = batch
    emma = EMMA(preset="mnist")
    loss, logs = emma.loss(model, x, y)
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y)
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > float(ce)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert logs["eps_train"] == pytest.approx(0.9) and 0.0 <= float(logs["certified_acc"]) <= 1.0
    assert json.loads(json.dumps(emma.params()))["defense"] == "emma"


def test_emma_logits_official_form():
    """Per class: ``z_j + min(max(-z_j / (eps K), 0.01), 1) * eps * K`` with ``z_y = 0``."""
    logits = torch.tensor([[2.0, 1.0, -3.0]])
    k = torch.tensor([[0.0, 2.0, 1.0]])
    out = emma_logits(logits, torch.tensor([0]), k, eps=1.0)          # z = [0, -1, -5]
    assert torch.allclose(out, torch.tensor([[0.0, -1.0 + 0.5 * 2.0, -5.0 + 1.0 * 1.0]]))


def test_emma_schedule_and_bad_input():
    e = EMMA(preset="cifar10")
    assert e.eps_at(0.0) == pytest.approx(0.1 * 36 / 255) and e.eps_at(0.5) == e.eps_at(1.0)
    assert e.eps_at(1.0) == pytest.approx(3 * 36 / 255)
    with pytest.raises(InputError, match="preset"):
        EMMA(preset="imagenet22k")
    with pytest.raises(InputError, match="ramp_fraction"):
        EMMA(preset="mnist", ramp_fraction=2.0)


def test_cli_train_emma_one_epoch(tmp_path):
    from robustkit.cli import main

    rc = main(["train", "--arch", "sll-small", "--dataset", "mnist5k", "--defense", "emma", "--epochs", "1",
               "--batch-size", "50", "--set", "data.n_train=200", "--eval-n", "50", "--set", "eval.attack=null",
               "--set", "defense.params.preset=mnist", "--arch-kwargs", '{"width": 4, "dense": 32}',
               "--optimizer", "adam", "--lr", "0.001", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and math.isfinite(recs[0]["train_loss"])
    assert recs[0]["train_lipschitz"] > 0
    model = load(tmp_path / "r" / "checkpoints" / "last")
    assert isinstance(model.net, LipschitzNet) and model_lipschitz(model) > 0


def test_cli_train_emma_refuses_a_model_without_the_split(tmp_path):
    from robustkit.cli import main

    out = tmp_path / "bad"
    rc = main(["train", "--arch", "lenet", "--dataset", "mnist5k", "--defense", "emma", "--epochs", "1",
               "--set", "data.n_train=50", "--set", "eval.attack=null", "--set", "defense.params.preset=mnist",
               "--device", "cpu", "--out", str(out)])
    assert rc == 2 and not out.exists()                                # refused before anything is written


def test_recipe_loads_and_builds():
    from pathlib import Path

    from robustkit.app.train import build_defense
    from robustkit.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / "train_emma_mnist5k.yaml", [])
    d = build_defense(cfg)
    assert isinstance(d, EMMA) and d.eps == pytest.approx(0.3) and d.eps_at(1.0) == pytest.approx(0.9)
    assert cfg.model.arch == "sll-small"
