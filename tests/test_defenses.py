"""The adversarial objectives (pgd-at, trades, mart), AWP / RWP and the slow-start-fast-decay schedule.

Tiny models on 32 mnist5k images; the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses  # noqa: F401  (registers the objectives)
from defenses.base import StepContext
from defenses.schedules import lr_lambda, make_schedule
from robustkit.data import make_loader
from robustkit.errors import InputError
from robustkit.registry import DEFENSES
from robustkit.zoo import RobustModel

OBJECTIVES = ["pgd-at", "trades", "mart"]
WRAPPERS = ["awp", "rwp"]
SMALL = {"preset": "mnist", "steps": 3, "step_size": 0.1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on the shared cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader("mnist5k", "train", batch_size=32, shuffle=False)))


def tiny_model(seed: int = 0, bn: bool = True) -> RobustModel:
    """conv(1->4, 3x3, stride 2) [+ BN] + ReLU + linear: (B, 1, 28, 28) -> (B, 10)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
    return RobustModel(net, "tiny", 10, (1, 28, 28), (0.5,), (0.5,)).train()


def make(name: str, **kw):
    if name in WRAPPERS:
        if name == "rwp":  # a fresh model's losses (~2.3) all exceed the default c_min = 1.7
            kw.setdefault("c_min", 100.0)
        return DEFENSES.get(name)(DEFENSES.get("trades")(**SMALL), gamma=0.01, warmup_epochs=0, **kw)
    return DEFENSES.get(name)(**SMALL, **kw)


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n]


def step(defense, model, opt, x, y, epoch: int = 0) -> float:
    ctx = StepContext(epoch=epoch, epochs=1, step=0, steps_per_epoch=1, optimizer=opt)
    defense.before_loss(model, x, y, ctx)
    loss, logs = defense.loss(model, x, y)
    assert all(not (isinstance(v, torch.Tensor) and v.requires_grad) for v in logs.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    defense.after_step(model, ctx)
    return float(loss.detach())


@pytest.mark.parametrize("name", OBJECTIVES + WRAPPERS)
def test_objective_lowers_its_loss(name, batch):
    x, y = batch
    model, defense = tiny_model(), make(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = [step(defense, model, opt, x, y) for _ in range(12)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


@pytest.mark.parametrize("name", OBJECTIVES)
def test_inner_max_in_eval_mode_keeps_bn_stats_and_ball(name, batch):
    x, y = batch
    model, defense = tiny_model(), make(name)
    before = bn_state(model)
    x_adv = defense.perturb(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, bn_state(model)))
    assert defense.tm.contains(x_adv, x).all()
    assert (x_adv - x).abs().amax() > 0 and model.net[0].weight.grad is None  # input gradients only


def test_trades_beta0_is_cross_entropy_training(batch):
    x, y = batch
    grads = []
    for defense in (DEFENSES.get("trades")(preset="mnist", beta=0.0), DEFENSES.get("standard")()):
        model = tiny_model(seed=3)
        loss, _ = defense.loss(model, x, y)
        grads.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_trades_and_mart_match_the_official_formulas(batch):
    """TRADES: CE + beta * KLDivLoss(size_average=False) / B; MART: mart.py's loss, on the same x_adv."""
    x, y = batch
    model = tiny_model(bn=False)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    logits, logits_adv = model(x), model(x_adv)
    kl_sum = nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, 1), F.softmax(logits, 1))
    ref = F.cross_entropy(logits, y) + 6.0 * kl_sum / len(x)
    torch.testing.assert_close(DEFENSES.get("trades")(preset="cifar10").objective(model, x, x_adv, y)[0], ref)
    adv_probs, nat_probs = F.softmax(logits_adv, 1), F.softmax(logits, 1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1)).squeeze()
    kl = nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs)
    ref = loss_adv + 6.0 * (1.0 / len(x)) * torch.sum(torch.sum(kl, dim=1) * (1.0000001 - true_probs))
    torch.testing.assert_close(DEFENSES.get("mart")(preset="cifar10").objective(model, x, x_adv, y)[0], ref)


@pytest.mark.parametrize("name", WRAPPERS)
def test_weight_perturbation_restores_bit_exactly_and_keeps_bn(name, batch):
    x, y = batch
    model, defense = tiny_model(), make(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)  # a zero step
    w0 = [p.detach().clone() for p in model.parameters()]
    bn0 = bn_state(model)
    ctx = StepContext(epoch=0, epochs=1, step=0, steps_per_epoch=1, optimizer=opt)
    defense.before_loss(model, x, y, ctx)
    assert all(torch.equal(a, b) for a, b in zip(bn0, bn_state(model)))  # attack and proxy left BN alone
    conv = model.net[0]
    assert not torch.equal(conv.weight, w0[0]) and torch.equal(conv.bias, w0[1])  # weights moved, not biases
    loss, logs = defense.loss(model, x, y)
    assert logs["wp_active"] == 1.0
    opt.zero_grad()
    loss.backward()
    opt.step()
    defense.after_step(model, ctx)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_awp_relative_size_and_warmup(batch):
    x, y = batch
    model = tiny_model()
    awp = DEFENSES.get("awp")(DEFENSES.get("pgd-at")(**SMALL), gamma=0.05, warmup_epochs=1)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp.before_loss(model, x, y, StepContext(0, 2, 0, 1))  # epoch 0 < warmup: no perturbation
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())
    awp.loss(model, x, y)
    awp.before_loss(model, x, y, StepContext(1, 2, 1, 1))
    for n, p in model.named_parameters():
        if p.dim() > 1:  # ||w + gamma v - w|| = gamma ||w|| per layer
            torch.testing.assert_close((p - w0[n]).norm(), 0.05 * w0[n].norm(), rtol=1e-4, atol=0)
    awp.after_step(model, StepContext(1, 2, 1, 1))
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())
    assert DEFENSES.get("awp")("trades").gamma == 5e-3 and DEFENSES.get("awp")("pgd-at").gamma == 1e-2


def test_rwp_loss_stationary_condition(batch):
    x, y = batch
    model = tiny_model()
    w0 = [p.detach().clone() for p in model.parameters()]
    rwp = DEFENSES.get("rwp")(DEFENSES.get("pgd-at")(**SMALL), gamma=0.01, warmup_epochs=0, c_min=1e-6,
                              iterations=2)  # no sample has a loss below c_min: nothing may drive it
    rwp.before_loss(model, x, y, StepContext(0, 1, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    rwp.after_step(model, StepContext(0, 1, 0, 1))
    rwp = DEFENSES.get("rwp")(DEFENSES.get("pgd-at")(**SMALL), gamma=0.01, warmup_epochs=0, c_min=100.0,
                              iterations=2)
    rwp.before_loss(model, x, y, StepContext(0, 1, 0, 1))
    moved = torch.cat([(p - a).flatten() for p, a in zip(model.parameters(), w0) if p.dim() > 1])
    total = torch.cat([a.flatten() for a in w0 if a.dim() > 1])
    torch.testing.assert_close(moved.norm(), 0.01 * total.norm(), rtol=1e-4, atol=0)  # one global scale
    rwp.after_step(model, StepContext(0, 1, 0, 1))


@pytest.mark.parametrize("bad, match", [
    (lambda: DEFENSES.get("trades")(beta=-1.0), "beta"),
    (lambda: DEFENSES.get("pgd-at")(steps=-2), "steps"),
    (lambda: DEFENSES.get("mart")(step_size=0), "step_size"),
    (lambda: DEFENSES.get("trades")(eps="lots"), "eps"),
    (lambda: DEFENSES.get("trades")(preset="imagenet"), "preset"),
    (lambda: DEFENSES.get("trades")(preset=None, eps=0.1), "preset=None needs"),
    (lambda: DEFENSES.get("pgd-at")(label_smoothing=1.5), "label_smoothing"),
    (lambda: DEFENSES.get("awp")("trades", gamma=-0.1), "gamma"),
    (lambda: DEFENSES.get("rwp")("trades", c_min=0), "c_min"),
    (lambda: DEFENSES.get("rwp")(DEFENSES.get("standard")()), "per-sample"),
    (lambda: DEFENSES.get("awp")(DEFENSES.get("awp")("trades")), "wraps one objective"),
    (lambda: DEFENSES.get("awp")("nope"), "valid defenses"),
])
def test_bad_hyperparameters_are_clear_errors(bad, match):
    with pytest.raises(InputError, match=match):
        bad()


def test_soft_label_hook(batch):
    x, y = batch
    model = tiny_model(bn=False)
    onehot = lambda x_, y_, k: F.one_hot(y_, k).float()  # noqa: E731
    for name in OBJECTIVES:
        torch.manual_seed(0)
        a = DEFENSES.get(name)(**SMALL).loss(model, x, y)[0]
        torch.manual_seed(0)
        b = DEFENSES.get(name)(**SMALL, targets=onehot).loss(model, x, y)[0]
        torch.testing.assert_close(a, b)
        torch.manual_seed(0)
        assert DEFENSES.get(name)(**SMALL, label_smoothing=0.2).loss(model, x, y)[0] != a


def test_slow_start_fast_decay_shape():
    f = make_schedule("slow-start-fast-decay")
    t = [i / 1000 for i in range(1001)]
    v = [f(s) for s in t]
    peak = max(range(len(v)), key=v.__getitem__)
    assert v[0] == 0.0 and v[peak] == 1.0 and v[-1] == 0.0 and t[peak] == 0.5
    assert all(a <= b for a, b in zip(v[:peak], v[1:peak + 1]))          # monotone rise
    assert all(a >= b for a, b in zip(v[peak:], v[peak + 1:]))           # monotone decay
    rise = max(b - a for a, b in zip(v[:peak], v[1:peak + 1]))
    fall = max(a - b for a, b in zip(v[peak:], v[peak + 1:]))
    assert fall > 1.5 * rise                                             # decays faster than it rose
    assert f(0.75) == pytest.approx(0.25)  # half-way down the decay at 1/4 of the peak (a triangle: 1/2)
    g = make_schedule("slow-start-fast-decay", peak_at=0.3, start=0.1, final=0.01, decay_power=3)
    assert g(0) == pytest.approx(0.1) and g(0.3) == 1.0 and g(1.0) == pytest.approx(0.01)
    assert make_schedule("slow-start-fast-decay", warmup=0.2)(0.2) == 1.0  # schedule.warmup_epochs sets the peak
    lam = lr_lambda(f, 10)
    assert [round(lam(s), 3) for s in (0, 5, 10)] == [0.0, 1.0, 0.0]
    for bad in ({"peak_at": 1.0}, {"start": -0.1}, {"decay_power": 0}):
        with pytest.raises(InputError):
            make_schedule("slow-start-fast-decay", **bad)
    for name in ("constant", "cosine", "step", "linear"):  # the other schedules still work
        assert make_schedule(name)(0.0) > 0
