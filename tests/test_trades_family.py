"""ARoW, SCORE and doubly-robust reweighting (issue 13 items 1, 2, 5): each formula against a
hand-computed value, determinism under a seed, input errors, DDP-global DRO weights and
``robustkit train --defense NAME`` end to end on mnist5k. Tiny models; seconds on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses.arow  # noqa: F401  (registers arow)
import defenses.dr_reweight  # noqa: F401  (registers doubly-robust)
import defenses.score  # noqa: F401  (registers score)
from defenses.dr_reweight import dro_weights
from defenses.score import clip_bound
from robustkit.cli import main
from robustkit.data import make_loader
from robustkit.errors import InputError
from robustkit.registry import DEFENSES
from robustkit.zoo import RobustModel

NAMES = ["arow", "score", "doubly-robust"]
SMALL = {"preset": "mnist", "steps": 2, "step_size": 0.15}


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader("mnist5k", "train", batch_size=16, shuffle=False)))


def tiny(seed: int = 0) -> RobustModel:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    return RobustModel(net, "tiny", 10, (1, 28, 28), (0.0,), (1.0,)).train()


class Fixed(nn.Module):
    """Logits read off the input: ``x (B, 1, 1, 3) -> 10 * x (B, 3)`` (hand-computable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * x.flatten(1)


# -- the formulas against hand-computed values --------------------------------------------------
X = torch.tensor([[[[0.2, 0.1, 0.0]]], [[[0.0, 0.0, 0.3]]]])          # (2, 1, 1, 3)
XA = torch.tensor([[[[0.1, 0.2, 0.0]]], [[[0.0, 0.1, 0.3]]]])
Y = torch.tensor([0, 2])


def _p(v: list[float]) -> list[float]:
    e = [math.exp(10 * t) for t in v]
    return [t / sum(e) for t in e]


def test_arow_formula_by_hand():
    s, beta = 0.2, 7.0
    total = 0.0
    for i in range(2):
        p, q = _p(X[i].flatten().tolist()), _p(XA[i].flatten().tolist())
        y = int(Y[i])
        ce_ls = (1 - s) * -math.log(p[y]) + s * sum(-math.log(t) for t in p) / 3   # the code's LS-CE
        kl = sum(a * math.log(a / b) for a, b in zip(p, q))
        total += ce_ls + beta * kl * (1 - q[y])
    d = DEFENSES.get("arow")(preset="cifar10")
    loss, logs = d.objective(Fixed(), X, XA, Y)
    assert d.label_smoothing == 0.2 and d.beta == 7.0
    assert float(loss) == pytest.approx(total / 2, rel=1e-5)
    assert 0 < float(logs["weight"]) < 1


def test_arow_weight_is_not_detached():
    """The code keeps gradients through ``1 - p_y(x')``: the x_adv-side gradient differs from a
    detached weight's."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3) * 10)
    d = DEFENSES.get("arow")(preset="cifar10")
    loss, _ = d.objective(model, X, XA, Y)
    (g,) = torch.autograd.grad(loss, [model[1].weight])
    la, lc = model(XA), model(X)
    kl = F.kl_div(F.log_softmax(la, 1), F.softmax(lc, 1), reduction="none").sum(1)
    wt = (1 - F.softmax(la, 1).gather(1, Y[:, None]).squeeze(1)).detach()
    ref = (F.cross_entropy(lc, Y, label_smoothing=0.2, reduction="none") + 7 * kl * wt).mean()
    (g_det,) = torch.autograd.grad(ref, [model[1].weight])
    assert not torch.allclose(g, g_det)


def test_score_formula_by_hand():
    beta = 6.0
    for clip in (0.0, 0.3):
        b = clip * clip * 10 / 9 if clip else 0.0
        total = 0.0
        for i in range(2):
            p, q = _p(X[i].flatten().tolist()), _p(XA[i].flatten().tolist())
            onehot = [1.0 if k == int(Y[i]) else 0.0 for k in range(3)]
            nat = sum((a - t) ** 2 for a, t in zip(p, onehot))
            rob = sum((a - t) ** 2 for a, t in zip(q, p))
            total += max(0.0, nat + beta * rob - (clip * clip * 3 / 2 if clip else 0.0))
        d = DEFENSES.get("score")(preset="cifar10", clip=clip)
        loss, _ = d.objective(Fixed(), X, XA, Y)
        assert float(loss) == pytest.approx(total / 2, rel=1e-5)
        assert clip_bound(clip, 10) == pytest.approx(b)
    assert clip_bound(0.3, 10) == pytest.approx(0.1)             # the code's printed bound for c = 0.3
    # clipping floors a fitted sample at 0: identical clean / adversarial and a near-one-hot prediction
    xs = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    loss, _ = DEFENSES.get("score")(preset="cifar10", clip=0.3).objective(Fixed(), xs, xs, torch.tensor([0]))
    assert float(loss) == 0.0


def test_dro_weights_and_gradient_of_the_compositional_objective():
    d = DEFENSES.get("doubly-robust")(preset="mnist", r=0.5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    loss, logs = d.objective(model, X, XA, Y)
    ce = F.cross_entropy(model(XA), Y, reduction="none")
    w = torch.softmax(ce.detach() / 0.5, 0)
    assert float(loss.detach()) == pytest.approx(float((w * ce).sum().detach()), rel=1e-6)
    # the gradient is that of r * log(mean exp(l / r)) (Eq. 6 of the paper), the weights held fixed
    (g,) = torch.autograd.grad(loss, [model[1].weight])
    comp = 0.5 * torch.log(torch.exp(F.cross_entropy(model(XA), Y, reduction="none") / 0.5).mean())
    (g_ref,) = torch.autograd.grad(comp, [model[1].weight])
    assert torch.allclose(g, g_ref, atol=1e-6)
    per, _ = d.objective(model, X, XA, Y, reduction="none")
    assert per.shape == (2,) and float(per.detach().mean()) == pytest.approx(float(loss.detach()), rel=1e-6)
    # r -> inf is PGD-AT (uniform weights), small r puts the weight on the worst sample
    big = dro_weights(torch.tensor([0.1, 2.0, 5.0]), 1e6)
    assert torch.allclose(big, torch.full((3,), 1 / 3), atol=1e-5)
    assert float(dro_weights(torch.tensor([0.1, 2.0, 5.0]), 0.01)[2]) == pytest.approx(1.0)


@pytest.mark.slow  # spawning 2 interpreters: ~30 s on 2 shared cores
def test_dro_weights_are_global_under_ddp(tmp_path):
    """2 gloo processes, each with half of a batch: weights x world size = the 1-process global softmax."""
    import torch.multiprocessing as mp

    losses = torch.tensor([0.3, 1.7, 0.9, 2.5, 0.1, 1.2])
    mp.spawn(_ddp_worker, args=(str(tmp_path), losses), nprocs=2, join=True)
    got = torch.cat([torch.load(tmp_path / f"w{r}.pt", weights_only=True) for r in range(2)])
    assert torch.allclose(got / 2, torch.softmax(losses / 0.7, 0), atol=1e-6)


def _ddp_worker(rank: int, root: str, losses: torch.Tensor) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rdzv", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Linear(1, 1))
        w = dro_weights(losses[rank * 3:(rank + 1) * 3], 0.7, model)
        torch.save(w, f"{root}/w{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- behaviour ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed_and_leaves_x(batch, name):
    x, y = batch
    x_in = x.clone()
    out = []
    for _ in range(2):
        model = tiny()
        torch.manual_seed(5)
        loss, logs = DEFENSES.get(name)(**SMALL).loss(model, x, y)
        loss.backward()
        out.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
        assert math.isfinite(float(loss.detach())) and "adv_acc" in logs
    assert out[0][0] == out[1][0] and all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    assert torch.equal(x, x_in)


@pytest.mark.parametrize("name", NAMES)
def test_inner_max_stays_in_the_ball_and_raises_its_loss(batch, name):
    x, y = batch
    d = DEFENSES.get(name)(preset="mnist", steps=5, step_size=0.1)
    model = tiny()
    torch.manual_seed(0)
    x_adv = d.perturb(model, x, y)
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert model.training                                               # the mode is restored
    with torch.no_grad():
        clean, adv = d.objective(model, x, x, y)[0], d.objective(model, x, x_adv, y)[0]
    assert float(adv) > float(clean)


@pytest.mark.parametrize("name, kw, msg", [
    ("arow", {"beta": -1.0}, "beta"), ("arow", {"preset": "imagenet"}, "unknown preset"),
    ("score", {"clip": 1.0}, "clip"), ("score", {"start": "zeros"}, "start"), ("score", {"beta": "x"}, "beta"),
    ("doubly-robust", {"r": 0.0}, "r"), ("doubly-robust", {"eps": -0.1}, "eps"),
])
def test_bad_hyperparameters_are_input_errors(name, kw, msg):
    with pytest.raises(InputError, match=msg):
        DEFENSES.get(name)(**kw)


def test_presets_are_the_papers():
    a, s, s2 = DEFENSES.get("arow")(), DEFENSES.get("score")(), DEFENSES.get("score")(preset="cifar10-ddpm")
    dr = DEFENSES.get("doubly-robust")()
    for d in (a, s, dr):
        assert (d.eps, d.steps, d.step_size) == pytest.approx((8 / 255, 10, 2 / 255))
    assert (a.beta, a.label_smoothing) == (7.0, 0.2)
    assert (s.beta, s.clip, s.start_at) == (6.0, 0.3, "normal") and (s2.beta, s2.clip, s2.start_at) == (4.0, 0.0,
                                                                                                       "uniform")
    assert DEFENSES.get("arow")(targets=lambda x, y, k: F.one_hot(y, k).float()).label_smoothing == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_cli_train_end_to_end(tmp_path, name, capsys):
    out = tmp_path / name
    rc = main(["train", "--defense", name, "--arch", "ibp-small", "--dataset", "mnist5k", "--epochs", "1",
               "--batch-size", "64", "--eval-n", "50", "--set", "data.n_train=256", "--set", "eval.steps=2",
               "--set", "defense.params.preset=mnist", "--set", "defense.params.steps=2",
               "--set", "defense.params.step_size=0.15", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "checkpoints" / "last" / "model.safetensors").exists()
    assert f"name: {name}" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_resume_mid_training_matches_an_uninterrupted_run(tmp_path, monkeypatch, name):
    """The objectives are stateless (the random starts come from the checkpointed RNG): a run killed in
    step 3 and resumed ends with the uninterrupted run's weights, bit for bit."""
    from safetensors.torch import load_file

    from defenses.trainer import Trainer

    common = ["train", "--defense", name, "--arch", "ibp-small", "--dataset", "mnist5k", "--epochs", "2",
              "--batch-size", "64", "--checkpoint-every", "1", "--set", "data.n_train=128", "--set",
              "eval.attack=null", "--eval-n", "20", "--set", "defense.params.preset=mnist", "--set",
              "defense.params.steps=2", "--set", "defense.params.step_size=0.15", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    calls = {"n": 0}
    real = Trainer._train_step

    def crash_at_step_3(self, x, y, ctx):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, x, y, ctx)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_3)
    assert main([*common, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(Trainer, "_train_step", real)
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--device", "cpu"]) == 0
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / "model.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
