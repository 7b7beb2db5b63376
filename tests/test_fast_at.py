"""Fast adversarial training (Wong et al. 2020), its catastrophic-overfitting detector, the cyclic LR.

Tiny models on mnist5k; the whole file runs in ~15 s on CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses  # noqa: F401  (registers the objectives)
from defenses._lap import layer_scales, step_direction
from defenses._overfit import OverfitDetector
from defenses.fast_at import FastAT
from defenses.schedules import make_schedule
from defenses.trainer import Trainer, make_optimizer
from robustkit.data import TensorLoader, make_loader
from robustkit.errors import InputError
from robustkit.registry import DEFENSES
from robustkit.runs import RunDir
from robustkit.zoo import RobustModel


def tiny_model(seed: int = 0) -> RobustModel:
    """conv(1->4, 3x3, stride 2) + ReLU + linear: (B, 1, 28, 28) -> (B, 10)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
    return RobustModel(net, "tiny", 10, (1, 28, 28), (0.5,), (0.5,)).train()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader("mnist5k", "train", batch_size=32, shuffle=False)))


# -- the detector on synthetic accuracy sequences ---------------------------------------------
def _run(seq, **kw) -> OverfitDetector:
    d = OverfitDetector(**kw)
    for pgd, fgsm in seq:
        d.update(pgd, fgsm)
    return d


def test_detector_flags_the_pgd_collapse_while_fgsm_rises():
    seq = [(0.20, 0.30), (0.35, 0.42), (0.40, 0.45), (0.38, 0.47), (0.05, 0.80), (0.00, 0.90)]
    d = _run(seq)
    assert d.detected and d.detected_at == 4 and d.best_check == 2 and d.best_pgd == 0.40
    assert "0.400" in d.message() and "0.050" in d.message()
    # healthy training (noise below the threshold, a plateau) is never flagged
    assert not _run([(0.2, 0.3), (0.4, 0.5), (0.25, 0.55), (0.42, 0.5), (0.41, 0.52)]).detected
    # a slow collapse spread over several checks is caught once it exceeds the drop from the best
    slow = _run([(0.5, 0.55), (0.42, 0.6), (0.34, 0.7), (0.26, 0.8)])
    assert slow.detected_at == 3
    # a plain divergence (FGSM accuracy falls as well) is not catastrophic overfitting ...
    div = [(0.4, 0.5), (0.1, 0.15)]
    assert not _run(div).detected
    # ... unless the FGSM condition is switched off; a larger drop threshold needs a larger fall
    assert _run(div, require_fgsm_rise=False).detected
    assert not _run(seq, drop=0.5).detected and _run(seq, drop=0.35).detected_at == 4


def test_detector_state_round_trip_and_bad_input():
    seq = [(0.2, 0.3), (0.4, 0.5), (0.1, 0.9)]
    a = _run(seq[:2])
    b = OverfitDetector()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.update(*seq[2]) and b.update(*seq[2]) and a.state_dict() == b.state_dict()
    for bad in (0.0, 1.5, "0.2", True):
        with pytest.raises(InputError, match="co_drop"):
            OverfitDetector(drop=bad)


# -- the objective ---------------------------------------------------------------------------
def test_fgsm_step_matches_the_hand_computed_formula(batch):
    """delta0 = U(-eps, eps) (then x + delta0 clipped to [0, 1]); delta = clip_eps(delta0 + alpha sign(g));
    x_adv = clip_[0,1](x + delta); loss = CE(f(x_adv), y)."""
    x, y = batch
    model = tiny_model()
    eps, alpha = 0.3, 0.375
    d = FastAT(preset="mnist")
    assert (d.eps, d.step_size) == (eps, alpha) and FastAT().eps == 8 / 255 and FastAT().step_size == 10 / 255
    g = torch.Generator().manual_seed(7)
    x_adv = d.fgsm(model, x, y, torch.Generator().manual_seed(7))
    u = torch.rand(x.shape, generator=g)
    x0 = (x + (2 * u - 1) * eps).clamp(0, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model.eval()(x0), y, reduction="sum"), [x0])
    model.train()
    want = (torch.min(torch.max(x0.detach() + alpha * grad.sign(), x - eps), x + eps)).clamp(0, 1)
    assert torch.allclose(x_adv, want, atol=1e-6)
    assert ((x_adv - x).abs() <= eps + 1e-6).all() and model.training and model.net[0].weight.grad is None
    # alpha = 1.25 eps > eps: the step lands on the ball's face wherever the start was not more than
    # alpha - eps behind it (against the gradient's sign) and [0, 1] does not clip
    behind = grad.sign() * (x0.detach() - x)
    inside = (grad != 0) & (behind > -(alpha - eps) + 1e-6) & (want > 0) & (want < 1)
    assert inside.float().mean() > 0.1
    assert torch.allclose((x_adv - x)[inside].abs(), torch.full_like(x_adv[inside], eps), atol=1e-6)
    loss, logs = d.objective(model, x, x_adv, y)
    assert torch.allclose(loss, F.cross_entropy(model(x_adv), y))
    assert 0.0 <= float(logs["adv_acc"]) <= 1.0
    zero = FastAT(preset="mnist", init="zero").fgsm(model, x, y)                 # plain FGSM from x
    assert torch.allclose(zero, (x + eps * grad_at(model, x, y).sign()).clamp(0, 1), atol=1e-6)


def grad_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xr = x.clone().requires_grad_(True)
    model.eval()
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), [xr])
    model.train()
    return g


def test_deterministic_under_a_seed_and_bad_hyperparameters(batch):
    x, y = batch
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        losses.append(float(FastAT(preset="mnist").loss(tiny_model(), x, y)[0].detach()))
    assert losses[0] == losses[1]
    for kw, match in (({"init": "gauss"}, "init"), ({"co_every": 0}, "co_every"), ({"co_drop": 2}, "co_drop"),
                      ({"step_size": -1}, "step_size"), ({"preset": "imagenet"}, "preset")):
        with pytest.raises(InputError, match=match):
            DEFENSES.get("fast-at")(**kw)


# -- the check inside the Trainer ------------------------------------------------------------
_LOADER: list[TensorLoader] = []


def _trainer(defense, model, run=None, epochs: int = 4) -> Trainer:
    """A Trainer on 200 mnist5k images, batches of 50 (the loader is built once: it costs ~3 s)."""
    if not _LOADER:
        _LOADER.append(make_loader("mnist5k", "train", batch_size=50, n=200, shuffle=True, seed=0))
    loader = _LOADER[0]
    return Trainer(model, defense, loader, epochs=epochs, run=run, progress=False,
                   optimizer=make_optimizer(model.parameters(), "adam", lr=5e-3, weight_decay=0.0),
                   schedule=make_schedule("cyclic", peak_at=0.4))


def test_early_stop_keeps_the_weights_before_the_collapse(tmp_path, monkeypatch):
    """Synthetic probe accuracies (a collapse at the 3rd check) through the real Trainer: the 3rd
    epoch's record says so, training stops there with the weights of epoch 2, and a resume of the
    stopped run trains nothing more."""
    d, model = FastAT(preset="mnist", co_batch=16, early_stop=True), tiny_model()
    seq, seen = [(0.3, 0.35), (0.5, 0.55), (0.05, 0.9), (0.0, 0.95)], []

    def fake(m):
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return seq[len(seen) - 1]

    monkeypatch.setattr(d, "probe_accuracies", fake)
    assert d._probe is None
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting.*fell from 0.500"):
        hist = _trainer(d, model, RunDir(tmp_path / "run").create("{}")).fit()
    assert [r["co_detected"] for r in hist] == [0, 0, 1] and hist[-1]["co_restored"] == 1
    assert d.stop_training and d._probe[0].shape == (16, 1, 28, 28)
    assert all(torch.equal(v, seen[1][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, seen[2][k]) for k, v in model.state_dict().items())
    d2 = FastAT(preset="mnist", co_batch=16, early_stop=True)
    monkeypatch.setattr(d2, "probe_accuracies", lambda m: pytest.fail("a stopped run must not train on"))
    again = _trainer(d2, tiny_model(1), RunDir(tmp_path / "run").create("{}", resume=True)).fit(resume=True)
    assert len(again) == 3 and d2.stop_training and d2._detector.detected_at == 2


def test_without_early_stop_training_goes_on_and_logs(monkeypatch):
    d = FastAT(preset="mnist", co_batch=16, co_every=2)
    seq = iter([(0.5, 0.55), (0.05, 0.9)])
    monkeypatch.setattr(d, "probe_accuracies", lambda m: next(seq))
    with pytest.warns(RuntimeWarning, match="early_stop=True"):
        hist = _trainer(d, tiny_model()).fit()
    assert len(hist) == 4 and "co_pgd_acc" not in hist[0] and hist[1]["co_detected"] == 0
    assert hist[3]["co_detected"] == 1 and "co_restored" not in hist[3] and not d.stop_training


def test_fast_at_trains_end_to_end_and_resumes_exactly(tmp_path):
    """The real probe (PGD-5 vs FGSM on the first batch), 2 epochs; interrupted after epoch 1 and
    resumed, the weights and the detector's history equal the uninterrupted run's."""
    ref_d, ref = FastAT(preset="mnist", co_batch=32), tiny_model()
    torch.manual_seed(0)
    hist = _trainer(ref_d, ref, RunDir(tmp_path / "ref").create("{}"), epochs=2).fit()
    assert all(0.0 <= r["co_pgd_acc"] <= r["co_fgsm_acc"] + 0.5 and math.isfinite(r["train_loss"]) for r in hist)
    assert hist[1]["train_loss"] < hist[0]["train_loss"]       # it learns
    d, m = FastAT(preset="mnist", co_batch=32), tiny_model()
    torch.manual_seed(0)
    part = _trainer(d, m, RunDir(tmp_path / "run").create("{}"), epochs=2)
    part.epochs = 1                                            # stop after epoch 1 (same schedule)
    part.fit()
    d2, m2 = FastAT(preset="mnist", co_batch=32), tiny_model(5)
    _trainer(d2, m2, RunDir(tmp_path / "run").create("{}", resume=True), epochs=2).fit(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m2.state_dict().values()))
    assert d2._detector.history == ref_d._detector.history


def test_cli_train_fast_at_on_mnist5k(tmp_path):
    from robustkit.cli import main

    out = tmp_path / "r"
    rc = main(["train", "--model", "ibp-small", "--dataset", "mnist5k", "--defense", "fast-at", "--eps", "0.3",
               "--epochs", "2", "--schedule", "cyclic", "--optimizer", "adam", "--lr", "0.005", "--eval-n", "50",
               "--set", "data.n_train=300", "--set", "defense.params.preset=mnist", "--set", "eval.steps=3",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all({"co_pgd_acc", "co_fgsm_acc", "co_detected"} <= set(r) for r in recs)


def test_cyclic_schedule_shape():
    f = make_schedule("cyclic")
    assert [f(t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    g = make_schedule("cyclic", peak_at=0.4)
    assert g(0.4) == 1.0 and math.isclose(g(0.2), 0.5) and math.isclose(g(0.7), 0.5)
    assert make_schedule("cyclic", warmup=0.2)(0.2) == 1.0         # schedule.warmup_epochs sets the peak
    with pytest.raises(InputError, match="peak_at"):
        make_schedule("cyclic", peak_at=1.0)


def test_the_check_runs_inside_a_weight_perturbation_wrapper(monkeypatch):
    """AWP(fast-at): the Trainer finds the inner objective's end_epoch hook and its stop request."""
    inner = FastAT(preset="mnist", co_batch=16, early_stop=True)
    seq = iter([(0.5, 0.55), (0.05, 0.9)])
    monkeypatch.setattr(inner, "probe_accuracies", lambda m: next(seq))
    awp = DEFENSES.get("awp")(inner, gamma=0.01, warmup_epochs=0)
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting"):
        hist = _trainer(awp, tiny_model()).fit()
    assert [r["co_detected"] for r in hist] == [0, 1] and hist[1]["co_restored"] == 1


# -- LAP (Lin et al. 2024): layer-aware weight perturbation --------------------------------------
def test_lap_layer_scales_by_hand():
    assert layer_scales(3, 3, 1.0) == pytest.approx([1.0, 1.0 - math.log(2) / math.log(3), 0.0])
    s = layer_scales(21, 21, 0.3)                    # the code's PreAct ResNet-18 with the README's gamma
    assert s[0] == 1.0 and s[-1] == pytest.approx(0.0, abs=1e-12) and all(a > b for a, b in zip(s, s[1:]))
    assert s[1] == pytest.approx(1.0 - (math.log(2) / math.log(21)) ** 0.3)
    assert layer_scales(1, 1, 0.3) == [1.0]


@pytest.mark.parametrize("kw", [{"momentum": 0.9, "weight_decay": 5e-4}, {"momentum": 0.9, "nesterov": True},
                                {"momentum": 0.5, "dampening": 0.3, "weight_decay": 1e-2}, {}])
def test_lap_direction_is_the_optimizers_own_step(kw):
    """``step_direction`` = (the step SGD takes) / lr, also with a momentum buffer from an earlier step."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.SGD([w], lr=0.1, **kw)
    for _ in range(2):
        g = torch.randn(3, 4)
        (d,) = step_direction(opt, [w], [g])
        before = w.detach().clone()
        w.grad = g
        opt.step()
        assert torch.allclose(w.detach() - before, 0.1 * d, atol=1e-7)
    assert torch.equal(step_direction(torch.optim.Adam([w]), [w], [g])[0], -g)      # other optimizers: -g


def test_lap_moves_each_layer_by_its_share_and_keeps_the_move(batch):
    import copy

    from defenses.base import StepContext
    from robustkit.zoo import create

    x, y = batch
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28)).train()
    names = [n for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]
    assert len(names) >= 3
    start = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    d = FastAT(preset="mnist", lap_beta=0.05, lap_layers=len(names) + 1, co_check=False)
    ctx = StepContext(0, 1, 0, 1, opt)
    torch.manual_seed(3)
    d.before_loss(model, x, y, ctx)
    lam = layer_scales(len(names), len(names) + 1, 0.3)
    for n, p in model.named_parameters():                     # |move| = lambda_l * beta * ||w_l||; biases stay
        moved = float((p.detach() - before[n]).norm())
        want = lam[names.index(n)] * 0.05 * float(before[n].norm()) if n in names else 0.0
        assert moved == pytest.approx(want, rel=1e-4, abs=1e-12), n
    torch.manual_seed(3)
    fgsm = FastAT(preset="mnist", co_check=False).fgsm(start, x, y)   # the same start, the unmoved weights
    assert torch.equal(d.perturb(model, x, y), fgsm)                  # the cached FGSM point of this step
    loss, _ = d.loss(model, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    d.after_step(model, ctx)
    assert all(torch.equal(p.detach(), after[n]) for n, p in model.named_parameters())   # the move is kept
    with pytest.raises(InputError, match="lap_layers"):
        FastAT(preset="mnist", lap_beta=0.05, lap_layers=len(names) - 1).before_loss(model, x, y, ctx)
    for bad in ({"lap_beta": -1.0}, {"lap_gamma": 0.0}, {"lap_layers": 0}):
        with pytest.raises(InputError):
            FastAT(preset="mnist", **bad)


def test_lap_trains_and_resumes_exactly(tmp_path):
    from tests._interrupt import Interrupt, small_trainer

    def lap() -> FastAT:
        return FastAT(preset="mnist", lap_beta=0.01, co_batch=16)

    ref_model, ref = small_trainer(RunDir(tmp_path / "ref").create("{}"), lap(), 3)
    hist = ref.fit()
    assert all(math.isfinite(r["train_loss"]) for r in hist) and "co_pgd_acc" in hist[-1]
    run = RunDir(tmp_path / "int").create("{}")
    _, t = small_trainer(run, Interrupt(lap(), at=7), 3)         # epoch 2 of 2, mid-epoch; last checkpoint at step 6
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    torch.manual_seed(123)
    model, t2 = small_trainer(run, lap(), 3)
    t2.fit(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()))
    plain_model, plain = small_trainer(None, FastAT(preset="mnist", co_batch=16), 0)
    plain.fit()
    assert not all(torch.equal(a, b) for a, b in zip(ref_model.state_dict().values(),
                                                     plain_model.state_dict().values()))   # LAP did something


def test_lap_recipe_builds():
    from pathlib import Path

    from robustkit.app.train import build_defense
    from robustkit.config import TrainConfig, load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / "train_fast-at-lap_cifar10.yaml", cls=TrainConfig)
    d = build_defense(cfg)
    assert isinstance(d, FastAT) and (d.lap_beta, d.lap_gamma, d.lap_layers, d.init) == (0.002, 0.3, None, "uniform")
    assert d.step_size == pytest.approx(1.25 * d.eps) and cfg.epochs == 30 and cfg.optim.lr == 0.2


@pytest.mark.parametrize("preset", ["cifar10", "mnist"])
def test_eps_without_step_size_keeps_the_papers_alpha_of_1_25_eps(preset: str) -> None:
    d = DEFENSES.get("fast-at")(preset=preset, eps=0.1)
    assert d.eps == pytest.approx(0.1) and d.step_size == pytest.approx(0.125)
    assert DEFENSES.get("fast-at")(preset=preset, eps=0.1, step_size=0.05).step_size == pytest.approx(0.05)
    assert DEFENSES.get("fast-at")(preset="cifar10", eps="4/255").step_size == pytest.approx(5 / 255)


def test_cli_bad_lap_layers_fails_before_the_run_directory(tmp_path, capsys):
    """lap_layers below the model's number of conv / linear weights is refused by check_model, before the train
    pipeline writes config.yaml (it used to fail at the first batch and leave a half-made run behind)."""
    from robustkit.cli import main

    out = tmp_path / "r"
    rc = main(["train", "--model", "ibp-small", "--dataset", "mnist5k", "--defense", "fast-at", "--eps", "0.3",
               "--epochs", "1", "--eval-n", "10", "--set", "data.n_train=64", "--set", "defense.params.preset=mnist",
               "--set", "defense.params.lap_beta=0.01", "--set", "defense.params.lap_layers=1", "--device", "cpu",
               "--out", str(out)])
    assert rc == 2 and "lap_layers (1)" in capsys.readouterr().err and not out.exists()
    FastAT(preset="mnist", lap_layers=1).check_model(RobustModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 8),
                                                                               nn.Linear(8, 2)),
                                                                 "test", 2, (1, 2, 2), (0.0,), (1.0,)))  # LAP off
