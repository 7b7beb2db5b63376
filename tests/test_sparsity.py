"""Adversarial sparsity (``attacks.sparsity``, Olivier & Raj 2023): exact against the closed form of
a linear two-class model, the extremes (never broken -> 1, broken by any perturbation -> the search
floor), monotone in eps, deterministic and batch-independent, bad input, and the benchmark / CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import robustkit.app.benchmark as bm
from attacks._cones import directions
from attacks.sparsity import ANGLE_RANGE, AdversarialSparsity, adversarial_sparsity
from robustkit.cli import main
from robustkit.errors import ConfigError, InputError
from robustkit.zoo import save

SHAPE = (1, 8, 8)
D = math.prod(SHAPE)
TOL = (ANGLE_RANGE[1] - ANGLE_RANGE[0]) / 2**10 / (math.pi / 2) + 2e-3   # bisection resolution + PGD slack


@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear two-class model on 8x8 images and 6 interior points (x in [0.4, 0.6]: the box
    never binds at the eps used here, so the cone constraint is exact) with their predicted labels."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 2))
    x = 0.4 + 0.2 * torch.rand(6, *SHAPE)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def closed_form_l2(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_dirs: int) -> torch.Tensor:
    """Critical cone angle per (point, direction), normalized by pi/2, of a linear two-class model:
    the best perturbation in the cone of half-angle theta around u on the eps-sphere gains
    ``eps ||w|| cos(max(0, phi - theta))`` (phi: angle between u and w), so the point breaks iff
    theta > phi - arccos(m / (eps ||w||)), m the logit margin."""
    lin = net[1].requires_grad_(False)
    out = []
    for i in range(x.shape[0]):
        c = int(y[i])
        w = (lin.weight[1 - c] - lin.weight[c]).detach()                       # (D,) direction that breaks
        m = float(-(w @ x[i].flatten() + lin.bias[1 - c] - lin.bias[c]))
        u, _ = directions("l2", SHAPE, n_dirs, 0, i)
        phi = torch.arccos((u.flatten(1) @ w) / w.norm())
        theta = phi - math.acos(m / (eps * float(w.norm())))
        out.append(theta.clamp(*ANGLE_RANGE) / (math.pi / 2))
    return torch.stack(out)


def test_l2_matches_the_closed_form(linear: Any) -> None:
    net, x, y = linear
    res = adversarial_sparsity(net, x, y, norm="l2", eps=0.5, directions=8)
    assert bool(res.vulnerable.all()) and bool(res.correct.all())
    expected = closed_form_l2(net, x, y, 0.5, 8)
    assert float((res.critical - expected).abs().max()) < TOL
    assert torch.allclose(res.sparsity, res.critical.mean(1))
    s = res.summary()
    assert s["mean"] == pytest.approx(float(res.sparsity.mean())) and s["n_vulnerable"] == 6
    assert s["directions"] == 8 and s["search_steps"] == 10 and s["steps"] == 10 and s["step_size"] == 0.25


def test_linf_free_coordinates_match_the_closed_form(linear: Any) -> None:
    """L-inf: fixed coordinates at eps*s, free ones at eps*sign(w); the smallest k that breaks."""
    net, x, y = linear
    eps = 0.05
    res = adversarial_sparsity(net, x, y, norm="linf", eps=eps, directions=4, pixel_range=(4, 64))
    lin = net[1].requires_grad_(False)
    for i in range(x.shape[0]):
        c = int(y[i])
        w = (lin.weight[1 - c] - lin.weight[c]).detach()
        m = float(-(w @ x[i].flatten() + lin.bias[1 - c] - lin.bias[c]))
        if not bool(res.vulnerable[i]):
            assert m > eps * float(w.abs().sum()) - 1e-4 and float(res.sparsity[i]) == 1.0
            continue
        s, perm = directions("linf", SHAPE, 4, 0, i)
        for j in range(4):
            gains = [eps * float((w * s[j].flatten()).sum() + ((w.abs() - w * s[j].flatten())[perm[j, :k]]).sum())
                     for k in range(D + 1)]
            k_star = next(k for k, g in enumerate(gains) if g > m)
            lo, hi = 4, 64                                                     # the bisection on true answers
            for _ in range(10):
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if mid >= k_star else (mid, hi)
            assert float(res.critical[i, j]) * D == mid


class Constant(nn.Module):
    """Always class 0: no perturbation can break a point of label 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0], device=x.device).expand(x.shape[0], 2) + 0 * x.flatten(1)[:, :1]


class Fragile(nn.Module):
    """Class 0 only at the reference points themselves: any perturbation larger than 1e-3 breaks them."""

    def __init__(self, refs: torch.Tensor) -> None:
        super().__init__()
        self.refs = refs.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x.flatten(1), self.refs).min(1).values                  # (B,)
        return torch.stack([1e-3 - d, torch.zeros_like(d)], 1)


def test_never_broken_is_one_and_always_broken_is_the_floor(linear: Any) -> None:
    _, x, _ = linear
    y0 = torch.zeros(x.shape[0], dtype=torch.long)
    never = adversarial_sparsity(Constant(), x, y0, norm="l2", eps=0.5, directions=4)
    assert bool(never.correct.all()) and not bool(never.vulnerable.any())
    assert torch.equal(never.sparsity, torch.ones(x.shape[0]))
    assert never.summary()["mean"] is None and never.summary()["mean_all"] == 1.0
    ones = torch.ones(x.shape[0], dtype=torch.bool)    # PGD from x sees no gradient at distance 0: pass the mask
    always = adversarial_sparsity(Fragile(x), x, y0, norm="l2", eps=0.3, directions=4, vulnerable=ones)
    lo, hi = ANGLE_RANGE
    floor = (lo + (hi - lo) / 2**10) / (math.pi / 2)                           # every test broke: the last midpoint
    assert bool(always.vulnerable.all())
    assert torch.allclose(always.sparsity, torch.full((x.shape[0],), floor), atol=1e-6)
    linf = adversarial_sparsity(Fragile(x), x, y0, norm="linf", eps=0.05, directions=4, pixel_range=(2, 60),
                                vulnerable=ones)
    lo_i, hi_i = 2, 60
    for _ in range(10):
        mid = (lo_i + hi_i) // 2
        hi_i = mid
    assert torch.equal(linf.sparsity, torch.full((x.shape[0],), mid / D))
    wrong = adversarial_sparsity(Constant(), x, torch.ones_like(y0), norm="l2", eps=0.5, directions=4)
    assert bool(torch.isnan(wrong.sparsity).all()) and wrong.summary()["mean_all"] is None


def test_monotone_in_eps(linear: Any) -> None:
    """A larger ball breaks in narrower cones: per point and direction, the critical angle does not grow."""
    net, x, y = linear
    runs = [adversarial_sparsity(net, x, y, norm="l2", eps=e, directions=8) for e in (0.3, 0.5, 0.8)]
    for small, big in zip(runs, runs[1:]):
        both = small.vulnerable & big.vulnerable
        assert bool((big.critical[both] <= small.critical[both] + TOL).all())
        assert bool((big.sparsity <= small.sparsity + TOL).all())              # non-vulnerable: 1, the top
        assert bool((small.vulnerable <= big.vulnerable).all())
    assert runs[2].summary()["mean_all"] < runs[0].summary()["mean_all"]
    li = [adversarial_sparsity(net, x, y, norm="linf", eps=e, directions=4).sparsity for e in (0.03, 0.05, 0.08)]
    assert bool((li[1] <= li[0]).all()) and bool((li[2] <= li[1]).all())


def test_deterministic_and_batch_independent(tiny_mnist_model: Any, mnist_test_batch: Any) -> None:
    x, y = mnist_test_batch[0][:6], mnist_test_batch[1][:6]
    kw: dict[str, Any] = {"norm": "l2", "eps": 1.5, "directions": 6, "search_steps": 4, "steps": 5}
    a = adversarial_sparsity(tiny_mnist_model, x, y, **kw)
    b = adversarial_sparsity(tiny_mnist_model, x, y, **kw, batch_size=7)
    assert bool(a.vulnerable.any())
    assert torch.equal(a.vulnerable, b.vulnerable)
    assert torch.allclose(a.critical.nan_to_num(-1), b.critical.nan_to_num(-1), atol=1e-6)
    c = adversarial_sparsity(tiny_mnist_model, x, y, **kw, seed=1)
    assert not torch.allclose(a.critical.nan_to_num(-1), c.critical.nan_to_num(-1))
    # directions follow the image index, not the position: the same image alone gets the same value
    i = int(a.vulnerable.nonzero()[0])
    one = adversarial_sparsity(tiny_mnist_model, x[i:i + 1], y[i:i + 1], index=torch.tensor([i]), **kw)
    assert torch.allclose(one.critical[0], a.critical[i], atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"norm": "l1"}, "unknown norm"), ({"directions": 0}, "directions must be >= 1"),
    ({"eps": 0}, "eps must be > 0"), ({"angle_range": (1.0, 0.5)}, "angle_range"),
    ({"pixel_range": (10, 5)}, "pixel_range"), ({"step_size": -1.0}, "step_size"),
])
def test_bad_settings(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        AdversarialSparsity(**{"eps": 1.0, **kw})


def test_bad_inputs(linear: Any) -> None:
    net, x, y = linear
    with pytest.raises(InputError, match=r"x must be in \[0, 1\]"):
        adversarial_sparsity(net, x + 1, y, eps=1.0)
    with pytest.raises(InputError, match="vulnerable must be a"):
        adversarial_sparsity(net, x, y, eps=1.0, vulnerable=torch.ones(2, dtype=torch.bool))
    empty = adversarial_sparsity(net, x[:0], y[:0], eps=1.0, vulnerable=torch.zeros(0, dtype=torch.bool))
    assert empty.sparsity.shape == (0,) and empty.critical.shape == (0, 64) and empty.summary()["mean"] is None
    with pytest.raises(InputError, match="leaves nothing to search"):
        adversarial_sparsity(net, x, y, norm="linf", eps=0.1, pixel_range=(64, 100))


# -- the benchmark and the CLI ------------------------------------------------------------------
CHEAP = {"pgd": {"steps": 5, "restarts": 1}}


def test_benchmark_reports_sparsity(tiny_mnist_model: Any, tmp_path: Path) -> None:
    d = save(tiny_mnist_model, tmp_path / "tiny")
    out = tmp_path / "bench"
    res = bm.run_benchmark([d], out, n=20, eps=1.5, norm="l2", attacks=["pgd"], eps_grid=[], attack_params=CHEAP,
                           sparsity={"directions": 4, "search_steps": 3, "n_images": 8}, progress=False)
    sp = res["models"][0]["adversarial_sparsity"]
    assert {"mean", "median", "mean_all", "n_vulnerable", "per_point"} <= set(sp)
    assert sp["n"] == 8 and len(sp["per_point"]) == 8 and sp["directions"] == 4
    assert res["settings"]["sparsity"]["n_images"] == 8
    # vulnerable = broken at eps by the benchmark's (verified) attacks, among the first 8 images
    broken = {int(i) for i in res["models"][0]["breakdown"]["broken_by"]}
    assert sp["n_vulnerable"] == len([i for i in broken if i < 8])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["models"][0]["adversarial_sparsity"]["mean"] == sp["mean"]
    report = (out / "report.md").read_text()
    assert "| sparsity |" in report and "- adversarial sparsity: " in report
    assert "adversarial_sparsity" in res["models"][0]["seconds"]


def test_cli_sparsity_and_bad_config(tiny_mnist_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = save(tiny_mnist_model, tmp_path / "tiny")
    base = ["benchmark", "--models", str(d), "--out", str(tmp_path / "b"), "--eps-grid", "none", "--n", "10",
            "--attacks", "pgd", "--param", "pgd.steps=3", "--param", "pgd.restarts=1", "--norm", "l2", "--eps", "1.5"]
    assert main(base + ["--sparsity", "--set", "sparsity.directions=3", "--set", "sparsity.search_steps=2"]) == 0
    assert "adversarial sparsity" in capsys.readouterr().out
    assert main(base + ["--set", "sparsity.directions=0"]) == 2
    assert "sparsity.directions" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="sparsity.bogus"):
        bm.run_benchmark([d], tmp_path / "c", n=5, attacks=["pgd"], sparsity={"bogus": 1})


@pytest.mark.slow
def test_benchmark_sparsity_two_processes_equal_one(tiny_mnist_model: Any, tmp_path: Path) -> None:
    """Under torchrun the sparsity images are shared out over the ranks and gathered: the same entry."""
    from tests._torchrun import robustkit

    d = str(save(tiny_mnist_model, tmp_path / "m"))
    args = ["benchmark", "--device", "cpu", "--models", d, "--n", "12", "--eps", "1.5", "--norm", "l2",
            "--attacks", "pgd", "--param", "pgd.steps=3", "--param", "pgd.restarts=1", "--eps-grid", "none",
            "--batch-size", "6", "--sparsity", "--set", "sparsity.directions=3", "--set", "sparsity.search_steps=3",
            "--set", "sparsity.n_images=5"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    r = robustkit([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = (json.loads((tmp_path / o / "results.json").read_text())["models"][0]["adversarial_sparsity"]
            for o in ("one", "two"))
    assert a["n_vulnerable"] >= 1 and a == b
