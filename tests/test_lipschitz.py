"""Lipschitz certificates (certify/lipschitz.py): soundness first -- every per-layer bound is >= the
exact spectral norm of the layer's dense operator (autograd Jacobian, SVD), network bounds are >=
the empirical constant, no attack beats a certified radius -- then the certifier, the pipeline,
the CLI and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import robustkit.cli as cli
from attacks.deepfool import DeepFool
from attacks.pgd import PGD
from certify._gram import conv2d_bound, gram_bound, matrix_bound
from certify._layers import UnsupportedLayerError
from certify._lipnet import _ACTIVATIONS
from certify.base import Certifier
from certify.lipschitz import LipschitzCertifier, certified_radius, lipschitz_constant, pairwise_radius
from robustkit.app.certify import Points, certify_points
from robustkit.errors import InputError
from robustkit.nets import WideResNet
from robustkit.registry import CERTIFIERS
from robustkit.zoo import RobustModel, create, save


def _exact(f, shape: tuple[int, ...]) -> float:
    """The exact L2 operator norm of a linear(-ised) map ``f`` at 0 on inputs ``shape``: SVD of its Jacobian."""
    x = torch.zeros(1, *shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: f(t).flatten(), x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(jac, 2))


def _jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """max over the rows of ``x`` of the spectral norm of the model's Jacobian there (float64)."""
    best = 0.0
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda t: model(t.unsqueeze(0)).flatten(), xi)
        best = max(best, float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2)))
    return best


def _randomize_bn(net: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g))             # negative scales too
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


# -- Gram iteration --------------------------------------------------------------------------------
def test_gram_bound_is_an_upper_bound_that_tightens():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 7, 5, generator=g, dtype=torch.float64) + 1j * torch.randn(20, 7, 5, generator=g,
                                                                                     dtype=torch.float64)
    exact = torch.linalg.matrix_norm(a, 2)                                      # (20,)
    prev = None
    for t in range(8):
        b = gram_bound(a, t)
        assert bool((b >= exact * (1 - 1e-12)).all())
        assert prev is None or bool((b <= prev * (1 + 1e-12)).all())           # more iterations: tighter
        prev = b
    assert torch.allclose(prev, exact, rtol=1e-3)
    assert torch.isclose(gram_bound(a, 6, reduce_max=True), gram_bound(a, 6).max())   # pruning keeps the max
    assert float(gram_bound(torch.zeros(3, 4), 5)) == 0.0                      # 0 stays 0 (no NaN)


def test_matrix_bound_linear():
    w = torch.randn(30, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(w, 2))
    assert exact <= matrix_bound(w, 10) <= exact * (1 + 1e-6)
    eye = 3 * torch.eye(50, dtype=torch.float64)                                # the worst case: equal singular values
    assert 3 <= matrix_bound(eye, 0) <= 3 * (1 + 1e-5)
    assert float(gram_bound(w, 0)) >= float(gram_bound(w, 3)) >= exact          # Frobenius first


# -- per-layer bounds >= the exact norm of the dense operator ----------------------------------------------
CONVS = [  # (c_in, c_out, kernel, stride, padding, dilation, groups, padding_mode)
    (3, 5, 3, 1, 1, 1, 1, "zeros"), (3, 5, 4, 2, 0, 1, 1, "zeros"), (4, 6, 3, 2, 1, 1, 2, "zeros"),
    (2, 4, 3, 1, 2, 2, 1, "zeros"), (4, 4, 3, 1, 1, 1, 4, "zeros"), (3, 2, 5, 3, 2, 1, 1, "zeros"),
    (2, 3, 2, 1, "same", 1, 1, "zeros"), (2, 4, 3, 2, 3, 2, 2, "zeros"), (3, 3, 1, 1, 0, 1, 1, "zeros"),
    (2, 3, (3, 2), (2, 1), (1, 0), (1, 2), 1, "zeros"), (3, 4, 3, 1, 1, 1, 1, "circular"),
    (3, 4, 3, 1, 1, 1, 1, "reflect"), (2, 2, 3, 2, 1, 1, 2, "replicate"),
]


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "-".join(map(str, s)))
def test_conv_bound_is_sound(spec):
    cin, cout, k, s, p, d, g, mode = spec
    torch.manual_seed(sum(map(ord, str(spec))))                                 # deterministic per spec
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode).double()
    for hw in ((7, 9), (8, 8)):
        exact = _exact(lambda t: conv(t) - conv(torch.zeros_like(t)), (cin, *hw))
        bound = conv2d_bound(conv, hw, 10)
        assert bound >= exact, (hw, bound, exact)
        if mode == "zeros":
            assert bound <= 1.6 * exact           # tight-ish: the circular operator of the padded size
        # through the public API too (the module alone, its bias ignored)
        assert lipschitz_constant(conv, (cin, *hw)).value == pytest.approx(bound, rel=1e-12)


def test_conv_bound_exact_where_the_layer_is_circular():
    """1x1 convs and circular padding by k - 1 are circular operators: the bound meets the exact norm."""
    for conv, hw in ((nn.Conv2d(4, 3, 1).double(), (5, 6)),
                     (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular").double(), (6, 6)),
                     (nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular").double(), (6, 8))):
        exact = _exact(lambda t, c=conv: c(t) - c(torch.zeros_like(t)), (conv.in_channels, *hw))
        assert exact <= conv2d_bound(conv, hw, 12) <= exact * (1 + 1e-6)


def test_circular_padding_with_a_kernel_larger_than_the_image():
    """Circular padding by k - 1 of an image smaller than the kernel wraps more than once: not the
    circular convolution on the image's grid, so the general (padding-gain) bound, not a ValueError."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 5, padding=2, padding_mode="circular").double()
    for hw in ((2, 2), (3, 3)):
        exact = _exact(lambda t: conv(t) - conv(torch.zeros_like(t)), (1, *hw))
        assert conv2d_bound(conv, hw, 10) >= exact


POOLS = [nn.MaxPool2d(2), nn.MaxPool2d(3, 1, 1), nn.MaxPool2d(3, 2), nn.MaxPool2d(2, 1, 0, 2), nn.AvgPool2d(2),
         nn.AvgPool2d(3, 1, 1), nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.AvgPool2d(3, 2, ceil_mode=True),
         nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(3)]


@pytest.mark.parametrize("pool", POOLS, ids=repr)
def test_pool_bound_is_sound(pool):
    shape = (2, 7, 7)
    bound = lipschitz_constant(pool, shape).value
    g = torch.Generator().manual_seed(0)
    if isinstance(pool, nn.MaxPool2d):          # piecewise linear: the Jacobian norm at random points, and pairs
        x = torch.randn(64, *shape, generator=g, dtype=torch.float64)
        emp = _jacobian_norm(pool, x[:16])
        x2 = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        ratio = (pool(x) - pool(x2)).flatten(1).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
        emp = max(emp, float(ratio.max()))
        if pool.stride == pool.kernel_size and pool.dilation == 1:
            assert bound == 1.0
    else:                                       # linear: exact
        emp = _exact(pool, shape)
        disjoint = pool.kernel_size == 2 if isinstance(pool, nn.AvgPool2d) else pool.output_size == 1
        if disjoint:                                            # non-overlapping / global average: exact
            assert bound == pytest.approx(emp, rel=1e-6)
    assert bound >= emp * (1 - 1e-9)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(1.5), nn.Tanh(), nn.Sigmoid(), nn.ELU(),
                                 nn.ELU(2.0), nn.ELU(-3.0), nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Softplus(),
                                 nn.Softplus(3.0), nn.ReLU6(), nn.Hardtanh(), nn.Softsign()], ids=repr)
def test_activation_constants_bound_the_derivative(act):
    t = torch.linspace(-8, 8, 200001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(act(t).sum(), t)
    lip, _ = _ACTIVATIONS[type(act)](act)
    assert float(d.abs().max()) <= lip
    assert lipschitz_constant(act, (3,)).value == lip


# -- BatchNorm / Normalize folding ----------------------------------------------------------------
def test_batchnorm_folds_into_the_adjacent_layers():
    torch.manual_seed(0)
    conv_bn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)).double().eval()
    _randomize_bn(conv_bn)
    exact = _exact(lambda t: conv_bn(t) - conv_bn(torch.zeros_like(t)), (2, 8, 8))
    b = lipschitz_constant(conv_bn, (2, 8, 8))
    assert exact <= b.value <= 1.5 * exact and len(b.layers) == 1 and "BatchNorm2d" in b.layers[0].kind
    # BN -> ReLU -> Linear with very unequal channel scales: folded into the Linear's columns, far below
    # max|scale| * ||W||, and still >= the empirical constant
    bn_lin = nn.Sequential(nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    bn_lin[0].weight.data.copy_(torch.tensor([50.0, -0.01, 0.01, 0.01, 0.01, 0.01]))
    bound = lipschitz_constant(bn_lin, (6,)).value
    scale = (bn_lin[0].weight.detach() / (bn_lin[0].running_var + bn_lin[0].eps).sqrt()).abs()
    naive = float(scale.max()) * float(torch.linalg.matrix_norm(bn_lin[2].weight.detach(), 2))
    x = torch.randn(64, 6, dtype=torch.float64)
    assert _jacobian_norm(bn_lin, x) <= bound < 0.5 * naive
    # a BatchNorm nothing can absorb (before a Tanh) is bounded alone by max |gamma / sqrt(var + eps)|
    alone = nn.Sequential(nn.BatchNorm1d(6), nn.Tanh()).double().eval()
    alone[0].weight.data.copy_(torch.tensor([-3.0, 1, 1, 1, 1, 1]))
    assert lipschitz_constant(alone, (6,)).value == pytest.approx(3.0 / math.sqrt(1 + 1e-5))


def test_normalize_folds_its_per_channel_scale():
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Flatten(), nn.Linear(4 * 16, 2))
    m = RobustModel(net, "user", 2, (3, 4, 4), (0.5, 0.4, 0.3), (0.5, 0.25, 4.0)).double().eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:, 2] = 1.0                      # only the std-4 channel is used: L is 4x below max(1/std)
    bound = lipschitz_constant(m).value
    assert bound >= _exact(lambda t: m(t) - m(torch.zeros_like(t)), (3, 4, 4))
    # 1/std = 1/4 of the one channel used is folded into the conv: 16x below max(1/std) * L(net)
    plain = RobustModel(net, "user", 2, (3, 4, 4), (0.0,) * 3, (1.0,) * 3).double().eval()
    assert bound == pytest.approx(lipschitz_constant(plain).value / 4, rel=1e-9)


# -- networks: bound >= empirical constant ------------------------------------------------------------
def _toy_net() -> RobustModel:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=2), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Sigmoid(), nn.Dropout(0.3), nn.Linear(16, 4))
    m = RobustModel(net, "toy", 4, (2, 8, 8), (0.1, 0.2), (0.3, 0.7)).double().eval()
    _randomize_bn(m)
    return m


def _empirical(model: nn.Module, shape: tuple[int, ...], n: int = 200, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    x2 = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ratio = (model(x) - model(x2)).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
    return max(float(ratio.max()), _jacobian_norm(model, x[:12]))


def test_network_bound_is_sound_on_a_mixed_net():
    m = _toy_net()
    b = lipschitz_constant(m)
    assert b.value >= _empirical(m, (2, 8, 8))
    assert b.value == pytest.approx(math.prod(lb.bound for lb in b.layers))
    assert b.value > 0 and m.training is False


def test_residual_nets_bound_is_sound():
    """WideResNet (PreActBlocks, identity and 1x1-conv shortcuts), BN randomized, small input."""
    net = WideResNet(depth=10, widen_factor=1, num_classes=3, in_channels=2)
    m = RobustModel(net, "wrn", 3, (2, 8, 8), (0.0, 0.0), (1.0, 1.0)).double().eval()
    _randomize_bn(m, seed=1)
    b = lipschitz_constant(m)
    assert b.value >= _empirical(m, (2, 8, 8), n=100)
    kinds = [lb.kind for lb in b.layers]
    assert sum("residual" in k for k in kinds) == 3 and any(lb.path.endswith("shortcut") for lb in b.layers)


@pytest.mark.slow
def test_preact_resnet18_bound_is_sound():
    m = create("preact-resnet18", num_classes=3, input_shape=(3, 8, 8)).double().eval()
    _randomize_bn(m, seed=2)
    assert lipschitz_constant(m, gram_iters=6).value >= _empirical(m, (3, 8, 8), n=20)


# -- trusted modules and unsupported ones ------------------------------------------------------------------
class _Trusted(nn.Module):
    """A module with its own bound; its insides (a GRU!) are never looked at."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.GRU(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x

    def lipschitz_bound(self) -> float:
        return 0.5


class _Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class _LoudConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100 * super().forward(x)


def test_trusted_module_is_used_as_is():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4, bias=False), _Trusted())
    with torch.no_grad():
        net[1].weight.copy_(3 * torch.eye(4))
    b = lipschitz_constant(net, (1, 2, 2))
    assert b.value == pytest.approx(1.5, rel=1e-5) and b.layers[-1].kind == "_Trusted"


@pytest.mark.parametrize("net, name", [
    (nn.Sequential(nn.Flatten(), nn.GRU(4, 4)), "GRU"),
    (nn.Sequential(nn.Flatten(), _Doubler()), "_Doubler"),                     # no parameters: still unknown
    (nn.Sequential(_LoudConv(1, 2, 3), nn.Flatten()), "_LoudConv"),             # a subclass with its own forward
])
def test_unsupported_module_raises_naming_it(net, name):
    with pytest.raises(UnsupportedLayerError, match=name) as e:
        lipschitz_constant(net, (1, 4, 4))
    assert isinstance(e.value, InputError) and "\n" not in str(e.value)


def test_train_mode_batchnorm_and_resize_are_refused():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2), nn.Flatten())
    m = RobustModel(net, "x", 2, (1, 5, 5), (0.0,), (1.0,))
    net[2].track_running_stats, net[2].running_var, net[2].running_mean = False, None, None
    with pytest.raises(UnsupportedLayerError, match="BatchNorm2d in train mode"):
        lipschitz_constant(m)
    with pytest.raises(UnsupportedLayerError, match="resize"):
        lipschitz_constant(create("ibp-small", 10, (1, 20, 20), resize=28))


# -- the certificate --------------------------------------------------------------------------------------
def test_certified_radius_formula():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 0.0, -1.0], [0.0, 10.0, 2.0]])
    pred, r = certified_radius(logits, 2.0)
    assert pred.tolist() == [0, 0, 1]
    assert torch.allclose(r, torch.tensor([2.0, 0.0, 8.0], dtype=torch.float64) / (2 * math.sqrt(2)))
    _, rinf = certified_radius(logits, 2.0, "linf", dim=16)
    assert torch.allclose(rinf, r / 4)
    _, capped = certified_radius(logits, 1e-6, "l2", dim=16)
    assert float(capped.max()) == 4.0                                            # the [0, 1] box's diameter
    with pytest.raises(InputError):
        certified_radius(logits[:, :1], 1.0)
    for bad in (float("nan"), -1.0, "2"):                   # NaN > 0 is False: it gave an infinite radius
        with pytest.raises(InputError, match="lipschitz must be"):
            certified_radius(logits, bad)
    assert certified_radius(logits, math.inf)[1].tolist() == [0.0, 0.0, 0.0]


def test_input_shape_mismatch_is_an_input_error(tiny_mnist_model):
    with pytest.raises(InputError, match="takes inputs"):
        lipschitz_constant(tiny_mnist_model, (1, 20, 20))
    with pytest.raises(InputError, match="takes inputs"):
        LipschitzCertifier()(tiny_mnist_model, torch.rand(2, 1, 20, 20))
    with pytest.raises(InputError, match="input_shape must be"):
        lipschitz_constant(nn.Flatten(), "abc")


def test_pairwise_radius_is_exact_for_a_linear_model():
    """For logits W x + b the distance to the decision boundary with class j is (z_top - z_j) / ||W_top - W_j||:
    the pairwise radius is exactly the distance to the nearest boundary (the global one is below it)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    m = RobustModel(net, "lin", 4, (3, 2, 2), (0.0,) * 3, (1.0,) * 3).double().eval()
    x = torch.rand(32, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        z = m(x)
    w = net[1].weight.detach()
    top = z.argmax(1)
    dist = torch.stack([min((z[b, top[b]] - z[b, j]) / (w[top[b]] - w[j]).norm() for j in range(4) if j != top[b])
                        for b in range(32)])
    bound = lipschitz_constant(m)
    assert bound.body == pytest.approx(1.0) and bound.pair_norms.shape == (4, 4)
    assert torch.allclose(pairwise_radius(z, bound), dist, rtol=1e-8)
    pair = LipschitzCertifier(pairwise=True)(m, x).radius
    assert torch.allclose(pair, dist.clamp(max=math.sqrt(12)), rtol=1e-8)
    assert bool((LipschitzCertifier()(m, x).radius <= pair * (1 + 1e-12)).all())


@pytest.mark.parametrize("arch", ["sll-small", "liresnet-small"])
def test_pairwise_constants_of_the_lipschitz_nets(arch):
    """An EMMA net (``LipschitzNet``: body + LLN head) gets the per-class-pair constants it is trained for:
    every pair margin's gradient is below ``body * ||W_i - W_j||``, the global constant is the net's own
    bound, and the pairwise radii are never smaller than the global ones (larger on these points)."""
    from robustkit._lipschitz_nets import model_lipschitz

    torch.manual_seed(0)
    m = create(arch, 10, (1, 28, 28), width=8, dense=32).double().eval()
    b = lipschitz_constant(m)
    assert b.value == pytest.approx(model_lipschitz(m), rel=1e-6)
    assert b.body is not None and b.pair_norms.shape == (10, 10)
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda t: m(t[None])[0], xi).flatten(1)     # (10, 784)
        pair = (jac[:, None] - jac[None]).norm(dim=2)                                        # (10, 10)
        assert bool((pair <= b.body * b.pair_norms).all())
    glob, pw = LipschitzCertifier()(m, x).radius, LipschitzCertifier(pairwise=True)(m, x).radius
    assert bool((pw >= glob).all()) and bool((pw > glob * 1.01).any())


def test_pairwise_folds_a_batchnorm_before_the_head_and_falls_back_without_one():
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
                        nn.Dropout(0.5))
    m = RobustModel(net, "x", 3, (2, 2, 2), (0.0, 0.0), (1.0, 1.0)).double().eval()
    _randomize_bn(m)
    b = lipschitz_constant(m)
    scale = (net[3].weight / (net[3].running_var + net[3].eps).sqrt()).detach().abs()
    assert b.pair_norms is not None and b.body is not None
    w = net[5].weight.detach() * scale                                           # the pending BN scale, folded
    assert float(b.pair_norms[0, 1]) == pytest.approx(float((w[0] - w[1]).norm()), rel=1e-8)
    x = torch.rand(64, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for i, j in ((0, 1), (0, 2), (1, 2)):                                       # each pair margin's gradient
        grad = max(float(torch.autograd.functional.jacobian(lambda t, i=i, j=j: (m(t[None])[0, i] - m(t[None])[0, j]),
                                                            xi).norm()) for xi in x)
        assert grad <= b.body * float(b.pair_norms[i, j])
    no_head = nn.Sequential(nn.Flatten(), nn.Linear(8, 3), nn.Tanh())           # logits are not a Linear's output
    nb = lipschitz_constant(no_head, (2, 2, 2))
    assert nb.pair_norms is None and nb.body is None
    xs = torch.rand(5, 2, 2, 2)
    assert torch.equal(LipschitzCertifier(pairwise=True)(no_head, xs).radius, LipschitzCertifier()(no_head, xs).radius)
    with pytest.raises(InputError, match="final nn.Linear"):
        pairwise_radius(torch.zeros(2, 3), nb)


def test_certifier_contract_and_cache(tiny_mnist_model, mnist_test_batch):
    cert = CERTIFIERS.get("lipschitz")()
    assert isinstance(cert, Certifier) and cert.deterministic and cert.norm == "l2"
    x = mnist_test_batch[0][:16]
    x0 = x.clone()
    model = tiny_mnist_model
    c1 = cert(model, x)
    assert torch.equal(x, x0) and model.training is False
    L = c1.info["lipschitz"]["value"]
    with torch.no_grad():
        logits = model(x).double()
    top = logits.topk(2, dim=1).values
    assert torch.allclose(c1.radius, (top[:, 0] - top[:, 1]) / (math.sqrt(2) * L))
    assert torch.equal(c1.prediction, logits.argmax(1)) and not c1.abstained.any()
    assert torch.equal(c1.info["lipschitz_constant"], torch.full((16,), L, dtype=torch.float64))
    c2 = cert(model, x)                                                          # cached: the same object, same radii
    assert torch.equal(c1.radius, c2.radius)
    assert lipschitz_constant(model) is lipschitz_constant(model)
    linf = LipschitzCertifier(norm="linf", batch_size=5)(model, x)
    assert torch.allclose(linf.radius, c1.radius / 28) and linf.prediction.equal(c1.prediction)


def test_cache_follows_the_weights():
    m = create("ibp-small", 10, (1, 28, 28)).eval()
    a = lipschitz_constant(m).value
    with torch.no_grad():
        m.net[0].weight.mul_(2)
    assert lipschitz_constant(m).value == pytest.approx(2 * a, rel=1e-9)


@pytest.mark.parametrize("kw", [{"norm": "l1"}, {"gram_iters": -1}, {"eps": -0.5}, {"batch_size": 0},
                                {"pairwise": "yes"}])
def test_certifier_bad_settings(kw):
    with pytest.raises(InputError):
        LipschitzCertifier(**kw)


# -- no attack beats a certified radius -------------------------------------------------------------------
def _attack_net() -> RobustModel:
    """A small BN conv net (random BN statistics) whose labels vary over the box, for the attacks."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                        nn.Flatten(), nn.Linear(32, 4))
    m = RobustModel(net, "toy", 4, (2, 8, 8), (0.5, 0.5), (0.25, 0.5)).eval()
    _randomize_bn(m, seed=4)
    return m


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_no_attack_inside_the_certified_radius(which, tiny_mnist_model, mnist_test_batch):
    if which == "tiny":
        model, (x, y) = tiny_mnist_model, (mnist_test_batch[0][:48], mnist_test_batch[1][:48])
    else:
        model = _attack_net()
        x = torch.rand(48, 2, 8, 8, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            y = model(x).argmax(1)
    glob = LipschitzCertifier()(model, x)
    cert = LipschitzCertifier(pairwise=True)(model, x)                          # the larger (pairwise) radii
    assert bool((cert.radius >= glob.radius).all()) and bool((cert.radius > glob.radius).any())
    pred, radius = cert.prediction, cert.radius.float()
    keep = pred == y
    x, y, radius = x[keep], y[keep], radius[keep]
    # DeepFool (L2, minimal perturbations): every example it finds lies outside the certified ball
    df = DeepFool(norm="l2", max_iter=100, overshoot=0.02)(model, x, y)
    dist = (df.x_adv - x).flatten(1).norm(dim=1)
    assert df.success.any()
    assert not bool((df.success & (dist < radius)).any())
    # ... and the check has teeth: with L too small by 50x, DeepFool beats the (wrong) radii
    assert bool((df.success & (dist < 50 * radius)).any())
    # PGD-L2 with restarts at eps = the certified radius of the weaker half: nothing inside
    eps = float(radius.median())
    strong = radius >= eps
    if strong.any():
        res = PGD(norm="l2", eps=eps, steps=40, restarts=3, seed=0)(model, x[strong], y[strong])
        assert not res.success.any()
    res = PGD(norm="l2", eps=20 * eps, steps=40, restarts=1, seed=0)(model, x, y)
    assert res.success.any()                                                     # the attack itself works


# -- the pipeline, the benchmark, the CLI ---------------------------------------------------------------------
def test_pipeline_reports_the_constant(tiny_mnist_model, mnist_test_batch):
    x, y = mnist_test_batch
    res = certify_points(tiny_mnist_model, Points.first(x[:20], y[:20], "mnist5k"), LipschitzCertifier(eps=0.25),
                         chunk=7, progress=False)
    L = lipschitz_constant(tiny_mnist_model).value
    assert res["certifier"] == "lipschitz" and res["deterministic"] and res["lipschitz_constant"] == L
    assert all(r["lipschitz_constant"] == L and r["margin"] >= 0 for r in res["per_sample"])
    again = certify_points(tiny_mnist_model, Points.first(x[:20], y[:20], "mnist5k"), LipschitzCertifier(eps=0.25),
                           chunk=20, progress=False)
    # chunking only changes the float32 rounding of the forward pass
    assert [r["radius"] for r in again["per_sample"]] == pytest.approx([r["radius"] for r in res["per_sample"]],
                                                                       rel=1e-5)


def test_benchmark_runs_lipschitz_on_l2_and_linf(tiny_mnist_model, mnist_test_batch):
    from robustkit.app._bench_certify import certify_deterministic

    x, y = mnist_test_batch[0][:10], mnist_test_batch[1][:10]
    for norm, eps in (("l2", 0.1), ("linf", 0.005)):
        s = {"eps": eps, "norm": norm, "certify": ["lipschitz"], "batch_size": 10, "dataset": "mnist5k", "seed": 0}
        records, flags = certify_deterministic(tiny_mnist_model, x, y, torch.ones(10, dtype=torch.bool), s, {}, {})
        assert records["lipschitz"]["status"] == "ok" and records["lipschitz"]["norm"] == norm
        assert flags["lipschitz"].shape == (10,)


@pytest.fixture()
def _cli_certify(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["certify"])


def test_cli_writes_results(_cli_certify, tiny_mnist_model, tmp_path, capsys):
    model_dir = str(save(tiny_mnist_model, tmp_path / "m"))
    out = tmp_path / "o"
    rc = cli.main(["certify", "--config", "configs/certify_lipschitz_mnist5k.yaml", "--model", model_dir,
                   "--n-images", "12", "--eps", "0.2", "--out", str(out), "--device", "cpu"])
    assert rc == 0 and "lipschitz certified accuracy" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["certifier"] == "lipschitz" and res["norm"] == "l2" and res["n"] == 12
    assert res["params"] == {"norm": "l2", "eps": 0.2, "gram_iters": 10, "pairwise": False, "batch_size": 500}
    assert res["lipschitz_constant"] > 0 and (out / "report.md").is_file()
    assert "Lipschitz bound L" in (out / "report.md").read_text()
    rc = cli.main(["certify", "--method", "lipschitz", "--model", model_dir, "--n-images", "4", "--set",
                   "lipschitz.norm=linf", "--set", "lipschitz.pairwise=true", "--out", str(tmp_path / "inf"),
                   "--device", "cpu"])
    inf = json.loads((tmp_path / "inf" / "results.json").read_text())
    assert rc == 0 and inf["norm"] == "linf" and inf["params"]["pairwise"] is True


@pytest.mark.parametrize("argv, message", [
    (("--set", "lipschitz.norm=l1"), "lipschitz.norm"),
    (("--set", "lipschitz.gram_iters=-2"), "gram_iters"),
    ((), "resize"),
])
def test_cli_bad_input_exits_2(_cli_certify, tmp_path, capsys, argv, message):
    model = create("ibp-small", 10, (1, 28, 28), resize=28) if not argv else create("ibp-small", 10, (1, 28, 28))
    model_dir = str(save(model.eval(), tmp_path / "m"))
    out = tmp_path / "o"
    rc = cli.main(["certify", "--method", "lipschitz", "--model", model_dir, "--n-images", "4", *argv,
                   "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("robustkit: error:") and err.count("\n") == 1
    assert not (out / "results.json").exists()
