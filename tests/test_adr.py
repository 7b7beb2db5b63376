"""ADR (defenses/adr.py): the rectified labels against hand-computed values, the schedules, the EMA
teacher (BN buffers EMA'd, AWP's perturbation never reaching it), exact resume, the CLI end to end,
and (run as a script under torchrun) an identical teacher on every DDP replica."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses  # noqa: F401  (registers every objective)
from defenses.adr import ADR, cosine, rectified_labels
from defenses.base import Defense, StepContext
from defenses.schedules import make_schedule
from defenses.standard import Standard
from defenses.trainer import Trainer, make_optimizer
from defenses.weight_perturbation import AWP
from robustkit.data import make_loader
from robustkit.errors import CheckpointError, InputError
from robustkit.runs import RunDir
from robustkit.zoo import create, load
from tests._interrupt import Interrupt, small_trainer
from tests._tiny import tiny_classifier as tiny
from tests._torchrun import run_script

SMALL = {"preset": "mnist", "steps": 2, "step_size": 0.15}


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader("mnist5k", "train", batch_size=16, shuffle=False)))


def _step(defense: Defense, model: nn.Module, x, y, lr: float, step: int = 0, total: int = 1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ctx = StepContext(epoch=0, epochs=1, step=step, steps_per_epoch=total, optimizer=opt)
    defense.before_loss(model, x, y, ctx)
    loss, logs = defense.loss(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    defense.after_step(model, ctx)
    return loss, logs


def test_rectified_labels_by_hand():
    # teacher logits (2, 0, 0) at tau 2: p = (e, 1, 1) / (e + 2)
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]                      # 0.5761, 0.2119, 0.2119
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    out = rectified_labels(logits, y, temperature=2.0, interpolation=0.7)
    # y = 0: the teacher is right, lam = 0.7: 0.7 p + 0.3 onehot(0)
    want0 = [0.7 * p[0] + 0.3, 0.7 * p[1], 0.7 * p[2]]
    # y = 1: lam = 0.7 - (p0 - p1) = 0.3358: lam p + (1 - lam) onehot(1)
    lam = 0.7 - (p[0] - p[1])
    want1 = [lam * p[0], lam * p[1] + 1 - lam, lam * p[2]]
    assert out[0].tolist() == pytest.approx(want0, abs=1e-6)
    assert out[1].tolist() == pytest.approx(want1, abs=1e-6)
    assert out[1].tolist() == pytest.approx([0.19347, 0.73536, 0.07117], abs=1e-4)
    assert out[2].tolist() == pytest.approx([lam * p[0], lam * p[1], lam * p[2] + 1 - lam], abs=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(3))
    # the teacher's gap exceeds lam_t: lam clips to 0, the one-hot label
    assert rectified_labels(torch.tensor([[9.0, 0.0]]), torch.tensor([1]), 1.0, 0.7).tolist() == [[0.0, 1.0]]


def test_schedules_anneal_as_the_code():
    d = ADR()
    assert (d.temperature(0.0), d.interpolation(0.0)) == (2.5, 0.7)
    assert d.temperature(0.5) == pytest.approx(2.25) and d.interpolation(0.5) == pytest.approx(0.825)
    assert d.temperature(1.0) == pytest.approx(2.0) and d.interpolation(1.0) == pytest.approx(0.95)
    # the code's cosine_scheduler(base, final, epochs, iters) at step i of N
    n = 8
    for i in range(n):
        assert cosine(2.5, 2.0, i / n) == pytest.approx(2.0 + 0.5 * 0.5 * (1 + math.cos(math.pi * i / n)))


def test_presets_and_bad_input():
    d = ADR()
    assert (d.base_objective.eps, d.base_objective.steps, d.base_objective.step_size) == (8 / 255, 10, 2 / 255)
    t = ADR(base="trades")
    assert t.base_objective.beta == 6.0 and t.base_objective.eps == 8 / 255
    assert ADR(base="trades", **SMALL).base_objective.eps == 0.3
    p = json.loads(json.dumps(t.params()))
    assert p["defense"] == "adr" and p["base"] == "trades" and p["beta"] == 6.0 and p["ema_decay"] == 0.995
    for kw, msg in [({"base": "mart"}, "base must be one of"), ({"beta": 3.0}, "needs base='trades'"),
                    ({"ema_decay": 1.0}, "ema_decay"), ({"interpolation_high": 1.5}, "interpolation_high"),
                    ({"temperature_low": 0}, "temperature_low"), ({"preset": "svhn"}, "unknown preset")]:
        with pytest.raises(InputError, match=msg):
            ADR(**kw)
    with pytest.raises(CheckpointError, match="EMA teacher"):
        ADR().load_state_dict({"nope": 1})
    with pytest.raises(CheckpointError, match="does not take"):
        Standard().load_state_dict({"teacher": {}})


@pytest.mark.parametrize("base", ["pgd-at", "trades"])
def test_soft_labels_replace_the_hard_ones(batch, base):
    x, y = batch
    model, d = tiny(bn=False).train(), ADR(base=base, **SMALL)
    d.before_loss(model, x, y, StepContext(0, 1, 0, 1))
    x_adv = d.perturb(model, x, y)
    loss, logs = d.objective(model, x, x_adv, y)
    with torch.no_grad():
        rect = rectified_labels(d.teacher(x), y, 2.5, 0.7)                      # (B, K)
        if base == "pgd-at":
            want = F.cross_entropy(model(x_adv), rect)
        else:
            kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean")
            want = F.cross_entropy(model(x), rect) + 1.0 * kl
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert not torch.allclose(rect, F.one_hot(y, 10).float())                      # really soft
    assert logs["adr_temperature"] == 2.5


def test_ema_teacher_params_and_bn_buffers(batch):
    x, y = batch
    model, d = tiny(bn=True).train(), ADR(**SMALL, ema_decay=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(d, model, x, y, lr=0.5)
    after, teach = model.state_dict(), d.teacher.state_dict()
    assert not d.teacher.training and not any(p.requires_grad for p in d.teacher.parameters())
    assert all(p.device == q.device and p.dtype == q.dtype for p, q in zip(d.teacher.parameters(),
                                                                           model.parameters()))
    for k in after:
        if after[k].is_floating_point():
            assert torch.allclose(teach[k], 0.9 * before[k] + 0.1 * after[k], atol=1e-6), k
        else:
            assert torch.equal(teach[k], after[k]), k                       # num_batches_tracked: copied
    key = "net.1.running_mean"
    assert not torch.equal(after[key], before[key]) and not torch.equal(teach[key], after[key])


@pytest.mark.parametrize("lr", [0.0, 0.5])
def test_awp_perturbation_never_reaches_the_teacher(batch, lr):
    """ADR + AWP: the teacher is copied before AWP perturbs and updated after it restored."""
    x, y = batch
    model = tiny(bn=False).train()
    w0 = [p.detach().clone() for p in model.parameters()]
    wp = AWP(ADR(**SMALL, ema_decay=0.9), gamma=0.05, warmup_epochs=0)
    _, logs = _step(wp, model, x, y, lr=lr)
    assert logs["wp_active"] == 1.0
    for t, a, b in zip(wp.inner.teacher.parameters(), w0, model.parameters()):
        want = a.lerp(b.detach(), 0.1)
        assert torch.equal(t, want) if lr == 0 else torch.allclose(t, want, atol=1e-7)
    assert set(wp.state_dict()) == {"inner"} and set(wp.state_dict()["inner"]) == {"teacher"}


def test_resume_is_exact_teacher_included(tmp_path):
    def adr() -> Defense:
        return AWP(ADR(**SMALL, ema_decay=0.8), gamma=0.01, warmup_epochs=0)

    ref_model, ref = small_trainer(RunDir(tmp_path / "ref").create("{}"), adr(), 3)
    ref.fit()
    run = RunDir(tmp_path / "int").create("{}")
    _, t = small_trainer(run, Interrupt(adr(), at=7), 3)   # epoch 2 of 2, mid-epoch; last checkpoint at step 6
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert "teacher" in torch.load(run.ckpt / "last" / "state.pt", weights_only=True)["defense"]["inner"]
    torch.manual_seed(123)
    model, t2 = small_trainer(run, adr(), 3)
    t2.fit(resume=True)
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    ta, tb = ref.defense.inner.teacher.state_dict(), t2.defense.inner.teacher.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], v) for k, v in ref_model.state_dict().items())   # a real EMA
    ea, eb = (load(r.ckpt / "last-ema").state_dict() for r in (ref.run, run))          # the exported WA model
    assert all(torch.equal(ea[k], eb[k]) and torch.equal(ea[k], ta[k]) for k in ta)


def test_ema_checkpoint_is_the_teacher_and_evaluates(tmp_path, capsys):
    """The WA model: ``checkpoints/last-ema`` (and ``best-ema``) hold the teacher's weights, load with
    ``zoo.load`` and evaluate with ``robustkit eval --model``; an objective without extra models
    writes none."""
    from robustkit.cli import main

    run = RunDir(tmp_path / "r").create("{}")
    model, t = small_trainer(run, AWP(ADR(**SMALL, ema_decay=0.8), gamma=0.01, warmup_epochs=0), 0)
    t.fit()
    teacher = t.defense.inner.teacher.state_dict()
    ema = load(run.ckpt / "last-ema")
    assert set(ema.state_dict()) == set(teacher)
    assert all(torch.equal(v, teacher[k]) for k, v in ema.state_dict().items())
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in ema.state_dict().items())   # not the student
    assert (run.ckpt / "best-ema" / "model.safetensors").is_file()
    assert not (run.ckpt / "last-ema" / "state.pt").exists()                   # weights only: resume uses last
    with torch.no_grad():
        x = torch.rand(4, 1, 28, 28)
        assert torch.equal(ema(x), t.defense.inner.teacher(x))
    capsys.readouterr()
    assert main(["eval", "--model", str(run.ckpt / "last-ema"), "--dataset", "mnist5k", "--n", "50",
                 "--device", "cpu"]) == 0
    assert "clean accuracy" in capsys.readouterr().out
    plain = RunDir(tmp_path / "p").create("{}")
    small_trainer(plain, Standard(), 0)[1].fit()
    assert sorted(p.name for p in plain.ckpt.iterdir()) == ["best", "last"]


def test_deterministic_under_a_seed(batch):
    x, y = batch
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        model, d = tiny(bn=True).train(), ADR(base="trades", **SMALL)
        for s in range(2):
            _step(d, model, x, y, lr=0.1, step=s, total=2)
        outs.append([v.clone() for v in (*model.state_dict().values(), *d.teacher.state_dict().values())])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_cli_train_adr_with_awp(tmp_path):
    from robustkit.cli import main

    rc = main(["train", "--arch", "ibp-small", "--dataset", "mnist5k", "--defense", "adr", "--epochs", "2",
               "--batch-size", "50", "--set", "data.n_train=300", "--eval-n", "50", "--set", "eval.steps=2",
               "--set", "defense.params.preset=mnist", "--set", "defense.params.steps=2",
               "--set", "defense.params.step_size=0.15", "--set", "defense.weight_perturbation=awp",
               "--set", "defense.wp_params.warmup_epochs=0", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(math.isfinite(r["train_loss"]) for r in recs)
    assert recs[0]["train_adr_temperature"] > recs[1]["train_adr_temperature"] > 2.0
    assert recs[1]["train_wp_active"] == 1.0
    state = torch.load(tmp_path / "r" / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert set(state["defense"]["inner"]["teacher"]) == set(create("ibp-small", 10, (1, 28, 28)).state_dict())


@pytest.mark.parametrize("name", ["train_adr_cifar10", "train_adr_awp_cifar10", "train_adr_mnist5k"])
def test_recipes_load_and_build(name):
    from robustkit.app.train import build_defense
    from robustkit.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml", [])
    d = build_defense(cfg)
    adr = d.inner if isinstance(d, AWP) else d
    assert isinstance(adr, ADR) and adr.ema_decay == 0.995
    assert (adr.temperature_low, adr.interpolation_high) == ((1.5, 0.85) if "awp" in name else (2.0, 0.95))


# -- DDP: run as a script under torchrun (2 CPU processes, gloo) --------------------------------------
def _ddp_worker(out: str) -> None:
    import torch.distributed as dist

    from defenses.base import gather_objects

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny(bn=True)                                   # the same init on every rank (seed 0)
    net = nn.parallel.DistributedDataParallel(model)
    loader = make_loader("mnist5k", "train", batch_size=16, n=64, seed=0, rank=rank, world_size=2)
    torch.manual_seed(rank)
    d = ADR(**SMALL, ema_decay=0.5)
    opt = make_optimizer(net.parameters(), "sgd", 0.1, 0.9, 0.0)
    Trainer(net, d, loader, epochs=1, optimizer=opt, schedule=make_schedule("constant"), progress=False).fit()
    sd = d.teacher.state_dict()
    got = gather_objects({k: v.tolist() for k, v in sd.items()})
    own = gather_objects(model.state_dict()["net.1.running_mean"].tolist())
    if rank == 0:
        Path(out).write_text(json.dumps({"teacher_equal": got[0] == got[1], "bn_stats_differ": own[0] != own[1]}))
    dist.destroy_process_group()


@pytest.mark.slow  # ~20 s: torchrun start-up of 2 processes
def test_ddp_teacher_identical_on_every_rank(tmp_path):
    out = tmp_path / "ddp.json"
    run_script(__file__, str(out), timeout=180)
    res = json.loads(out.read_text())
    assert res["bn_stats_differ"], "the replicas' own BN statistics differ (DDP does not sync them)"
    assert res["teacher_equal"], "the EMA teacher must be identical on every replica"


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
