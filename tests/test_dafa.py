"""DAFA (defenses/dafa.py): the class weights against a hand-computed 3-class example, the warm-up
statistics, the class-wise eps and loss weights, the state round trip, exact resume, the CLI and
(run as a script under torchrun) identical weights on every DDP replica."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import defenses  # noqa: F401  (registers every objective)
from defenses.base import StepContext
from defenses.dafa import DAFA, class_weights
from robustkit.data import make_loader
from robustkit.errors import CheckpointError, InputError
from robustkit.registry import DEFENSES
from robustkit.runs import RunDir
from robustkit.zoo import create
from tests._interrupt import Interrupt, small_trainer
from tests._torchrun import run_script

SMALL = {"preset": "mnist", "steps": 2, "step_size": 0.15}
S = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.4, 0.5]])


def test_class_weights_by_hand():
    # diag (0.6, 0.7, 0.5). w0 = 1 + 0.3*0.7 (0.6 < 0.7) - 0.1*0.5 (0.6 >= 0.5) = 1.16;
    # w1 = 1 - 0.2*0.6 - 0.1*0.5 = 0.83; w2 = 1 + 0.1*0.6 + 0.4*0.7 = 1.34.
    assert torch.allclose(class_weights(S, 1.0), torch.tensor([1.16, 0.83, 1.34], dtype=torch.float64))
    assert torch.allclose(class_weights(S, 2.0), torch.tensor([1.32, 0.66, 1.68], dtype=torch.float64))
    # a tie counts as "easier" (the code's else branch): both lose weight
    tie = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert torch.allclose(class_weights(tie, 1.0), torch.tensor([0.75, 0.75], dtype=torch.float64))


def _ctx(epoch: int) -> StepContext:
    return StepContext(epoch=epoch, epochs=3, step=0, steps_per_epoch=1)


def test_warmup_statistics_give_the_weights():
    d = DAFA(preset="mnist", warmup=2, lamb=1.0)
    y = torch.tensor([0, 0, 1, 2])
    probs = torch.stack([S[0] + 0.1 * torch.tensor([1.0, -1.0, 0.0]), S[0] - 0.1 * torch.tensor([1.0, -1.0, 0.0]),
                         S[1], S[2]])                                       # class means = rows of S
    logits = probs.log()
    d.before_loss(None, None, y, _ctx(0))                                   # epoch 1: not the warm-up one
    d._record(logits, y)
    assert d.end_epoch(None, _ctx(0)) == {} and d.weights is None
    d.before_loss(None, None, y, _ctx(1))
    d._record(logits[:2], y[:2])
    d._record(logits[2:], y[2:])
    logs = d.end_epoch(None, _ctx(1))
    assert torch.allclose(d.weights.double(), torch.tensor([1.16, 0.83, 1.34], dtype=torch.float64), atol=1e-6)
    assert logs["dafa_weight_max"] == pytest.approx(1.34)
    d.before_loss(None, None, y, _ctx(2))                                   # fixed afterwards
    d._record(logits, y)
    assert d.end_epoch(None, _ctx(2)) == {} and d.state_dict().keys() == {"weights"}


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(make_loader("mnist5k", "train", batch_size=16, shuffle=False)))


@pytest.mark.parametrize("base", ["trades", "pgd"])
def test_class_wise_eps_and_loss_weights(batch, base):
    x, y = batch
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28)).train()
    d = DAFA(base=base, preset="mnist", eps=0.2, steps=3, step_size=0.1)
    w = torch.linspace(0.5, 1.4, 10)
    d.load_state_dict({"weights": w})
    x_adv = d.perturb(model, x, y)
    dist = (x_adv - x).abs().flatten(1).amax(1)                             # (B,)
    assert bool((dist <= w[y] * 0.2 + 1e-6).all()) and bool((dist > 0.2 + 1e-3).any())
    loss, _ = d.objective(model, x, x_adv, y)
    with torch.no_grad():
        if base == "pgd":
            ref = (w[y] * F.cross_entropy(model(x_adv), y, reduction="none")).mean()
        else:
            logits, la = model(x), model(x_adv)
            kl = F.kl_div(F.log_softmax(la, 1), F.softmax(logits, 1), reduction="sum") / len(x)
            ref = (w[y] * F.cross_entropy(logits, y, reduction="none")).mean() + 1.0 * kl
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    plain = DAFA(base=base, preset="mnist", eps=0.2, steps=3, step_size=0.1)       # before the warm-up: TRADES/PGD
    torch.manual_seed(1)
    a = plain.perturb(model, x, y)
    assert float((a - x).abs().max()) <= 0.2 + 1e-6


def test_state_round_trip_and_bad_input():
    d = DAFA(**SMALL, warmup=1)
    d.before_loss(None, None, None, _ctx(0))
    d._record(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))
    state = d.state_dict()
    assert state.keys() == {"sums", "counts"}
    e = DAFA(**SMALL, warmup=1)
    e.load_state_dict(state)
    assert e.end_epoch(None, _ctx(0)) and d.end_epoch(None, _ctx(0))
    assert torch.equal(e.weights, d.weights)
    f = DAFA(**SMALL)
    f.load_state_dict(e.state_dict())
    assert torch.equal(f.weights, e.weights)
    with pytest.raises(CheckpointError):
        f.load_state_dict({"teacher": torch.zeros(1)})
    for bad in ({"base": "mart"}, {"lamb": -1.0}, {"warmup": 0}):
        with pytest.raises(InputError):
            DAFA(**SMALL, **bad)
    assert DEFENSES.get("dafa") is DAFA and DAFA().warmup == 70 and DAFA().lamb == 1.0 and DAFA().beta == 6.0


def test_resume_is_exact_mid_warmup(tmp_path):
    ref_model, ref = small_trainer(RunDir(tmp_path / "ref").create("{}"), DAFA(**SMALL, warmup=1), 2)
    ref.fit()
    assert ref.defense.weights is not None and not torch.allclose(ref.defense.weights, torch.ones(10))
    run = RunDir(tmp_path / "int").create("{}")
    _, t = small_trainer(run, Interrupt(DAFA(**SMALL, warmup=1), at=3), 2)        # mid warm-up epoch
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert "sums" in torch.load(run.ckpt / "last" / "state.pt", weights_only=True)["defense"]
    torch.manual_seed(123)
    model, t2 = small_trainer(run, DAFA(**SMALL, warmup=1), 2)
    t2.fit(resume=True)
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(ref.defense.weights, t2.defense.weights)


def test_cli_train_dafa(tmp_path):
    from robustkit.cli import main

    rc = main(["train", "--arch", "ibp-small", "--dataset", "mnist5k", "--defense", "dafa", "--epochs", "2",
               "--batch-size", "50", "--set", "data.n_train=300", "--eval-n", "50", "--set", "eval.steps=2",
               "--set", "defense.params.preset=mnist", "--set", "defense.params.steps=2",
               "--set", "defense.params.step_size=0.15", "--set", "defense.params.warmup=1",
               "--device", "cpu", "--out", str(tmp_path / "r")])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(math.isfinite(r["train_loss"]) for r in recs)
    assert "dafa_weight_max" in recs[0] and "dafa_weight_max" not in recs[1]


def test_short_run_is_an_input_error(tmp_path):
    """A run that ends before the warm-up does would silently be plain TRADES: refused up front."""
    for warmup in (2, 70):
        with pytest.raises(InputError, match="warmup"):
            small_trainer(None, DAFA(**SMALL, warmup=warmup), 0)               # 2 epochs
    with pytest.raises(InputError, match="warmup 2"):
        small_trainer(None, DEFENSES.get("awp")(DAFA(**SMALL, warmup=2)), 0)   # a wrapper forwards the check
    small_trainer(None, DAFA(**SMALL, warmup=1), 0)                            # warm-up 1 of 2 epochs: fine
    from robustkit.cli import main

    out = tmp_path / "r"
    rc = main(["train", "--arch", "ibp-small", "--dataset", "mnist5k", "--defense", "dafa", "--epochs", "2",
               "--set", "data.n_train=100", "--set", "defense.params.preset=mnist", "--device", "cpu",
               "--out", str(out)])                                              # the mnist preset: warmup 2
    assert rc == 2 and not out.exists()                                          # nothing written


@pytest.mark.parametrize("wp", ["awp", "rwp", "sam", "amp"])
def test_weight_perturbation_records_the_statistics_once(batch, wp):
    """DAFA under a weight perturbation records what DAFA alone records on the same batches: each
    image once, at the unperturbed weights (AWP used to count each image twice, RWP 3 times here)."""
    x, y = batch
    kw = {"awp": {"gamma": 0.05, "warmup_epochs": 0}, "rwp": {"gamma": 0.05, "warmup_epochs": 0, "c_min": 100.0,
                                                             "iterations": 2},
          "sam": {"rho": 0.5}, "amp": {"epsilon": 0.5, "inner_steps": 2}}[wp]
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28)).train()
    plain, inner = DAFA(**SMALL, warmup=1), DAFA(**SMALL, warmup=1)
    wrapped = DEFENSES.get(wp)(inner, **kw)
    for b in range(2):                                                          # two batches, same weights
        xb, yb = x[8 * b:8 * b + 8], y[8 * b:8 * b + 8]
        for d in (plain, wrapped):
            torch.manual_seed(b)
            d.before_loss(model, xb, yb, _ctx(0))
            loss, logs = d.loss(model, xb, yb)
            d.after_step(model, _ctx(0))
        assert logs["wp_active"] == 1.0                                         # the perturbation was on
    assert float(inner._counts.sum()) == 16.0 and torch.equal(inner._counts, plain._counts)
    assert torch.allclose(inner._sums, plain._sums, rtol=0, atol=1e-12)
    assert wrapped.end_epoch(model, _ctx(0)) == plain.end_epoch(model, _ctx(0))  # forwarded to DAFA
    assert torch.equal(inner.weights, plain.weights)


# -- DDP: run as a script under torchrun (2 CPU processes, gloo) --------------------------------------
def _rank_stats(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-dependent warm-up statistics: logits (8 + 4 rank, 3), labels."""
    g = torch.Generator().manual_seed(rank)
    n = 8 + 4 * rank
    return torch.randn(n, 3, generator=g) * 2, torch.randint(0, 3, (n,), generator=g)


def _ddp_worker(out: str) -> None:
    import torch.distributed as dist

    from defenses.base import gather_objects

    dist.init_process_group("gloo")
    d = DAFA(**SMALL, warmup=1)
    d.before_loss(None, None, None, _ctx(0))
    d._record(*_rank_stats(dist.get_rank()))
    d.end_epoch(None, _ctx(0))
    weights = gather_objects(d.weights.tolist())
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(weights))
    dist.destroy_process_group()


@pytest.mark.slow  # ~20 s: torchrun start-up of 2 processes
def test_ddp_weights_identical_on_every_rank(tmp_path):
    out = tmp_path / "ddp.json"
    run_script(__file__, str(out), timeout=180)
    w0, w1 = json.loads(out.read_text())
    assert w0 == w1
    pooled = DAFA(**SMALL, warmup=1)                        # one process seeing both ranks' batches
    pooled.before_loss(None, None, None, _ctx(0))
    for rank in (0, 1):
        pooled._record(*_rank_stats(rank))
    pooled.end_epoch(None, _ctx(0))
    assert torch.allclose(torch.tensor(w0), pooled.weights, atol=1e-6)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
