"""The BO attack's graded label-only objective: rays (attacks/_ray.py), the incumbent-relative ray
distance and its query accounting, TuRBO trust regions, the GP training window, and a toy model
on which only the graded objective can win."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks._bo_gp import window
from attacks._ray import direction, point, ray_distance
from attacks._subspace import to_image
from attacks._trust_region import TrustRegions
from attacks.bo_hard_label import BOHardLabel
from robustkit.threat import ThreatModel


class Linear(nn.Module):
    """2 classes: class 1 iff ``<w, x - x0> > c``. Only a perturbation aligned with ``w`` flips it."""

    def __init__(self, w: torch.Tensor, x0: torch.Tensor, c: float) -> None:
        super().__init__()
        self.w, self.x0, self.c = w, x0, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2)
        s = ((x - self.x0) * self.w).flatten(1).sum(1) - self.c
        return torch.stack([-s, s], 1)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_linf_ray_at_one_is_the_official_projection() -> None:
    x, p = rand(4, 1, 6, 6), 0.5 * torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    u = direction(p, "linf", 0.1)
    assert float(u.abs().max()) <= 1.0
    assert torch.allclose(point(x, u, 1.0, "linf", 0.1), (x + p.clamp(-0.1, 0.1)).clamp(0, 1))
    assert torch.allclose(point(x, u, torch.full((4,), 2.0), "linf", 0.1), (x + 2 * p.clamp(-0.1, 0.1)).clamp(0, 1))


def test_l2_ray_uses_the_whole_budget_after_clipping() -> None:
    x = (rand(5, 1, 8, 8) > 0.7).float()                             # mostly 0: the box clips a lot
    u = direction(torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2)), "l2", 1.0)
    norms = []
    for t in (0.5, 1.0, 2.0):
        xt = point(x, u, t, "l2", 1.0)
        assert bool(ThreatModel("l2", t).contains(xt, x).all())
        norms.append((xt - x).flatten(1).norm(dim=1))
        assert torch.allclose(norms[-1], torch.full((5,), t), atol=1e-4)  # reachable here: exactly t * eps
    naive = (x + u).clamp(0, 1) - x                                 # official: rescale, then clip
    assert bool((naive.flatten(1).norm(dim=1) < norms[1] - 0.05).all())


def test_ray_distance_brackets_the_boundary_and_counts_queries() -> None:
    x = torch.full((2, 1, 4, 4), 0.6)
    u = -torch.ones(2, 1, 4, 4)                                      # lowers the mean: t* = 0.1 / eps = 2
    calls: list[int] = []

    def fooled(xq: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        calls.append(len(rows))
        return xq.flatten(1).mean(1) < 0.5

    ok, hi, reached = ray_distance(fooled, x, u, torch.arange(2), torch.tensor([4.0, 1.5]), torch.tensor([50, 50]),
                                   "linf", 0.05, steps=10)
    assert ok.tolist() == [False, False] and reached.tolist() == [True, False]
    assert 2.0 <= float(hi[0]) <= 2.0 * 4 ** (1 / 2**10) + 1e-4     # log-scale bisection over [1, 4]
    assert float(hi[1]) == 1.5                                       # worse than the incumbent: one query
    assert calls == [2, 1] + [1] * 10                                # t_best, success check, bisection
    calls.clear()
    ray_distance(fooled, x[:1], u[:1], torch.arange(1), torch.tensor([4.0]), torch.tensor([3]), "linf", 0.05, 10)
    assert sum(calls) == 3                                           # the budget caps the bisection
    calls.clear()
    ok, _, reached = ray_distance(fooled, x, u, torch.arange(2), torch.tensor([4.0, 1.5]), torch.tensor([50, 50]),
                                  "linf", 0.05, 0, check_first=torch.tensor([True, True]))
    assert calls == [2, 2] and reached.tolist() == [True, False] and not bool(ok.any())  # x(1) first, then t_best


def test_ray_distance_success_inside_the_ball() -> None:
    x = torch.full((1, 1, 4, 4), 0.52)
    ok, hi, _ = ray_distance(lambda xq, r: xq.flatten(1).mean(1) < 0.5, x, -torch.ones_like(x), torch.arange(1),
                             torch.tensor([4.0]), torch.tensor([9]), "linf", 0.05, 3)
    assert ok.tolist() == [True] and hi.tolist() == [1.0]


def test_trust_region_grows_shrinks_and_restarts() -> None:
    tr = TrustRegions(2, d=4, succ_tol=2, fail_tol=2, length_init=0.5, length_min=0.2, length_max=1.0)
    rows = torch.arange(2)
    for _ in range(2):
        tr.update(rows, torch.tensor([True, False]))
    assert tr.length.tolist() == [1.0, 0.25]                        # doubled / halved
    for _ in range(2):
        tr.update(rows, torch.tensor([True, False]))
    assert tr.length.tolist() == [1.0, 0.5]                         # capped / below the minimum: restarted
    lo, hi = tr.bounds(torch.tensor([[1.9, 0.0, 0.0, 0.0], [0.0] * 4], dtype=torch.float64), rows, 2.0)
    assert lo[0, 0] == pytest.approx(-0.1) and hi[0, 0] == 2.0 and hi[1, 1] == pytest.approx(1.0)


def test_window_keeps_recent_and_best() -> None:
    tx = torch.arange(10.0, dtype=torch.float64).view(1, 10, 1)
    ty = torch.tensor([5.0, 9, 1, 2, 8, 0, 0, 0, 0, 0], dtype=torch.float64).view(1, 10, 1)
    wx, wy = window(tx, ty, 4)
    assert sorted(wx.flatten().tolist()) == [1.0, 4.0, 8.0, 9.0]    # best two of the old, the two newest
    assert window(tx, ty, None)[0] is tx


@pytest.mark.parametrize("frac", [0.8, 0.9])
def test_graded_objective_finds_what_random_search_cannot(frac: float) -> None:
    g = torch.Generator().manual_seed(0)
    w = to_image(torch.randn(1, 16, generator=g, dtype=torch.float64), "upsample", 4, (1, 8, 8)).float()[0]
    x, y, eps = torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, dtype=torch.long), 0.1
    model = Linear(w, x[0], frac * float((w.abs() * eps).sum()))   # only near-sign(w) patterns flip it
    kw = {"eps": eps, "dim": 4, "max_queries": 200, "seed": 0, "raw_samples": 50}
    rnd = BOHardLabel(acquisition="random", objective="indicator", **kw)(model, x, y)
    ours = BOHardLabel(**kw)(model, x, y)
    assert not bool(rnd.success.any())
    assert bool(ours.success.all()) and int(ours.queries.max()) <= 120
    assert bool(ThreatModel("linf", eps).contains(ours.x_adv, x).all())
    assert bool((model(ours.x_adv).argmax(1) == 1).all())
