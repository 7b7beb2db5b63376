"""The per-layer table of bound propagation (certify/_layers.py): every layer type has an
interval rule and a backward rule, and both are sound on sampled points of random boxes
(and exact on a degenerate box). auto_LiRPA cannot serve as a reference: it does not import
on torch 2.x, so the rules are checked against the layers themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certify._layers import RULES, layers_of, rule_of
from robustkit.zoo import Normalize

TOL = 1e-9


def _bn(cls: type[nn.Module], c: int) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    bn = cls(c)
    bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.randn(c, generator=g))       # negative scales too
    bn.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return bn.eval()


# layer type -> (an instance, the input shape without batch); one example per table entry
EXAMPLES: dict[type[nn.Module], list[tuple[nn.Module, tuple[int, ...]]]] = {
    Normalize: [(Normalize((0.2, 0.6), (0.5, 0.25)), (2, 4, 4))],
    nn.Linear: [(nn.Linear(6, 4), (6,))],
    nn.Conv2d: [(nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)), (nn.Conv2d(2, 4, 3, stride=2, groups=2), (2, 6, 6))],
    nn.ReLU: [(nn.ReLU(), (2, 3, 3)), (nn.ReLU(), (7,))],
    nn.MaxPool2d: [(nn.MaxPool2d(2), (2, 4, 4)), (nn.MaxPool2d(3, stride=2, padding=1), (2, 5, 5)),
                   (nn.MaxPool2d(2, ceil_mode=True), (1, 5, 5))],
    nn.BatchNorm1d: [(_bn(nn.BatchNorm1d, 6), (6,))],
    nn.BatchNorm2d: [(_bn(nn.BatchNorm2d, 2), (2, 4, 4))],
    nn.AvgPool2d: [(nn.AvgPool2d(2), (2, 4, 4)), (nn.AvgPool2d(3, stride=1, padding=1), (1, 4, 4))],
    nn.AdaptiveAvgPool2d: [(nn.AdaptiveAvgPool2d(2), (2, 5, 5))],
    nn.Flatten: [(nn.Flatten(), (2, 3, 3))],
    nn.Identity: [(nn.Identity(), (2, 3, 3))],
    nn.Dropout: [(nn.Dropout(0.5).eval(), (6,))],
}
CASES = [(t.__name__, m.double(), shape) for t, items in EXAMPLES.items() for m, shape in items]


def test_every_layer_type_has_both_rules_and_an_example() -> None:
    assert set(EXAMPLES) == set(RULES), "add an example here for every layer type of the table"
    for t, rule in RULES.items():
        assert callable(rule.interval) and callable(rule.backward), t.__name__
    for _, m, _ in CASES:
        assert rule_of(m) is RULES[next(t for t in type(m).__mro__ if t in RULES)]


def _box(shape: tuple[int, ...], b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn((b, *shape), generator=g, dtype=torch.float64)
    radius = torch.rand((b, *shape), generator=g, dtype=torch.float64) * 0.8
    return centre - radius, centre + radius


def _points(lo: torch.Tensor, hi: torch.Tensor, n: int = 400) -> torch.Tensor:
    """``(n, B, *shape)`` points of the box: half uniform, half vertices."""
    g = torch.Generator().manual_seed(1)
    u = torch.rand((n // 2, *lo.shape), generator=g, dtype=lo.dtype)
    v = torch.randint(0, 2, (n - n // 2, *lo.shape), generator=g).to(lo.dtype)
    return lo + torch.cat([u, v]) * (hi - lo)


def _apply(m: nn.Module, pts: torch.Tensor) -> torch.Tensor:
    n, b = pts.shape[:2]
    with torch.no_grad():
        out = m(pts.flatten(0, 1))
    return out.view(n, b, *out.shape[1:])


@pytest.mark.parametrize("name, layer, shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_interval_rule_contains_every_sampled_output(name: str, layer: nn.Module, shape: tuple[int, ...]) -> None:
    lo, hi = _box(shape)
    out_lo, out_hi = RULES[type(layer)].interval(layer, lo, hi)
    z = _apply(layer, _points(lo, hi))                                       # (n, B, *out)
    assert out_lo.shape == z.shape[1:] and (out_lo <= out_hi).all()
    assert (z >= out_lo - TOL).all() and (z <= out_hi + TOL).all()
    exact = RULES[type(layer)].interval(layer, lo, lo)                       # a point: the layer itself
    torch.testing.assert_close(exact[0], _apply(layer, lo[None])[0])
    torch.testing.assert_close(exact[1], _apply(layer, lo[None])[0])


@pytest.mark.parametrize("name, layer, shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_backward_rule_is_a_linear_lower_bound(name: str, layer: nn.Module, shape: tuple[int, ...]) -> None:
    """For every sampled ``z`` of the box: ``A f(z) + c >= A' z + c'``, and equal on a degenerate box."""
    lo, hi = _box(shape)
    rule = RULES[type(layer)]
    pts = _points(lo, hi)
    fz = _apply(layer, pts)                                                   # (n, B, *out)
    b, s = lo.shape[0], 5
    a = torch.randn((b, s, *fz.shape[2:]), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c = torch.randn((b, s), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a_in, c_in = rule.backward(layer, a, c, lo.shape[1:], (lo, hi))
    assert a_in.shape == (b, s, *shape) and c_in.shape == (b, s)
    value = torch.einsum("bsk,nbk->nbs", a.flatten(2), fz.flatten(2)) + c                 # (n, B, S)
    linear = torch.einsum("bsk,nbk->nbs", a_in.flatten(2), pts.flatten(2)) + c_in
    assert (value >= linear - 1e-9).all()
    a_pt, c_pt = rule.backward(layer, a, c, lo.shape[1:], (lo, lo))          # degenerate box: exact at lo
    at_lo = torch.einsum("bsk,bk->bs", a_pt.flatten(2), lo.flatten(1)) + c_pt
    torch.testing.assert_close(at_lo, torch.einsum("bsk,bk->bs", a.flatten(2), _apply(layer, lo[None])[0].flatten(1))
                               + c)


def test_table_drives_flattening_and_state_checks() -> None:
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Flatten(), nn.Linear(2 * 16, 3))
    assert [p for p, _, _ in layers_of(net)] == ["model.0.0", "model.0.1", "model.1", "model.2"]
    assert [r for _, _, r in layers_of(net)] == [RULES[nn.Conv2d], RULES[nn.ReLU], RULES[nn.Flatten],
                                                 RULES[nn.Linear]]

    class MyReLU(nn.ReLU):                                                   # subclasses inherit the rule
        pass

    assert rule_of(MyReLU()) is RULES[nn.ReLU] and rule_of(nn.Tanh()) is None
    from certify._layers import UnsupportedLayerError

    with pytest.raises(UnsupportedLayerError, match="train mode"):
        layers_of(nn.Sequential(nn.Dropout(0.3).train()))
    with pytest.raises(UnsupportedLayerError, match="padding_mode"):
        layers_of(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")))
