"""SAM / ASAM and AMP: the weight-perturbation rules beside AWP / RWP (one mechanism, several rules).

Hand-computed updates on a tiny linear softmax model (the cross-entropy gradient written out:
``dL/dW = (softmax(z) - onehot)^T x / B``), the rules through the real CLI on mnist5k, and, run
as a ``torchrun`` worker (``python -m torch.distributed.run ... tests/test_flatness.py OUT``),
identical perturbations on every DDP replica.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses  # noqa: F401  (registers every objective)
from defenses.base import StepContext
from robustkit.config import TrainConfig
from robustkit.errors import InputError
from robustkit.registry import DEFENSES
from robustkit.zoo import RobustModel

ROOT = Path(__file__).resolve().parents[1]
B, D, K = 5, 4, 3


def linear_model(seed: int = 0) -> RobustModel:
    """``Flatten + Linear(4, 3)`` behind an identity Normalize: (B, 1, 2, 2) -> (B, 3)."""
    torch.manual_seed(seed)
    return RobustModel(nn.Sequential(nn.Flatten(), nn.Linear(D, K)), "lin", K, (1, 2, 2), (0.0,), (1.0,))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(B, 1, 2, 2, generator=g), torch.tensor([0, 1, 2, 1, 0])


def ce_grad(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean cross-entropy's gradient of ``softmax(x W^T + b)``, by hand: ((K, D), (K,))."""
    xf = x.flatten(1).double()                                                  # (B, D)
    r = torch.softmax(xf @ w.double().T + b.double(), 1) - F.one_hot(y, K).double()   # (B, K)
    return r.T @ xf / len(y), r.mean(0)


def one_step(defense: Any, model: RobustModel, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, Any]:
    """The Trainer's per-batch sequence (plain SGD)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ctx = StepContext(0, 1, 0, 1, opt)
    defense.before_loss(model, x, y, ctx)
    loss, logs = defense.loss(model, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    defense.after_step(model, ctx)
    return logs


def wb(model: RobustModel) -> tuple[torch.Tensor, torch.Tensor]:
    lin = model.net[1] if hasattr(model, "net") else [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    return lin.weight.detach().clone(), lin.bias.detach().clone()


def test_sam_step_is_the_hand_computed_two_step_update():
    model, (x, y), rho, lr = linear_model(), batch(), 0.05, 0.5
    w, b = wb(model)
    gw, gb = ce_grad(w, b, x, y)                                         # ascent gradient at w
    norm = torch.cat([gw.flatten(), gb]).norm()
    ew, eb = rho * gw / norm, rho * gb / norm                            # e(w) = rho g / ||g||
    gw2, gb2 = ce_grad(w + ew, b + eb, x, y)                             # the step's gradient at w + e
    logs = one_step(DEFENSES.get("sam")("standard", rho=rho), model, x, y, lr)
    w1, b1 = wb(model)
    assert logs["wp_active"] == 1.0
    torch.testing.assert_close(w1.double(), w - lr * gw2, atol=1e-6, rtol=0)
    torch.testing.assert_close(b1.double(), b - lr * gb2, atol=1e-6, rtol=0)
    plain = linear_model()                                               # the same step without SAM differs
    one_step(DEFENSES.get("standard")(), plain, x, y, lr)
    assert float((wb(plain)[0] - w1).abs().max()) > 1e-4


def test_asam_perturbation_is_the_hand_computed_one():
    model, (x, y) = linear_model(), batch()
    w, b = wb(model)
    sam = DEFENSES.get("sam")("standard", adaptive=True)
    assert sam.rho == 0.5 and sam.eta == 0.01                            # ASAM's code defaults
    gw, gb = ce_grad(w, b, x, y)
    tw = w.double().abs() + 0.01                                         # T_w on the weight; 1 on the bias
    norm = torch.cat([(tw * gw).flatten(), gb]).norm()
    v = sam.direction(model, x, x, y)
    names = dict(model.named_parameters())
    wname = next(n for n, p in names.items() if p.dim() == 2)
    bname = next(n for n, p in names.items() if p.dim() == 1)
    torch.testing.assert_close(0.5 * v[wname].double(), 0.5 * tw * tw * gw / norm, atol=1e-7, rtol=0)
    torch.testing.assert_close(0.5 * v[bname].double(), 0.5 * gb / norm, atol=1e-7, rtol=0)


def test_amp_inner_steps_are_projected_ascent_per_tensor():
    model, (x, y), lr = linear_model(), batch(), 0.3
    w, b = wb(model)
    eps, inner_lr = 0.05, 2.0
    gw0, gb0 = ce_grad(w, b, x, y)
    assert (inner_lr * gw0).norm() > eps > (inner_lr * gb0).norm() / 10   # the weight's ball binds

    def clip(d: torch.Tensor) -> torch.Tensor:
        return d * min(1.0, eps / (float(d.norm()) + 1e-12))

    dw, db = torch.zeros_like(gw0), torch.zeros_like(gb0)
    for _ in range(3):                                                   # D_{k+1} = clip(D_k + lr g(w + D_k))
        gw, gb = ce_grad(w + dw, b + db, x, y)
        dw, db = clip(dw + inner_lr * gw), clip(db + inner_lr * gb)
    assert abs(float(dw.norm()) - eps) < 1e-9                            # on the sphere: the clip is active
    gw2, gb2 = ce_grad(w + dw, b + db, x, y)
    amp = DEFENSES.get("amp")("standard", epsilon=eps, inner_lr=inner_lr, inner_steps=3)
    one_step(amp, model, x, y, lr)
    w1, b1 = wb(model)
    torch.testing.assert_close(w1.double(), w - lr * gw2, atol=1e-6, rtol=0)
    torch.testing.assert_close(b1.double(), b - lr * gb2, atol=1e-6, rtol=0)
    # one inner step is a different update (the inner steps matter)
    one = linear_model()
    one_step(DEFENSES.get("amp")("standard", epsilon=eps, inner_lr=inner_lr, inner_steps=1), one, x, y, lr)
    assert float((wb(one)[0] - w1).abs().max()) > 1e-6


def test_amp_defaults_are_the_codes():
    amp = DEFENSES.get("amp")("pgd-at")
    assert (amp.epsilon, amp.inner_lr, amp.inner_steps, amp.warmup_epochs) == (0.5, 1.0, 1, 0)
    assert DEFENSES.get("sam")("trades").rho == 0.05


@pytest.mark.parametrize("name,off", [("sam", {"rho": 0.0}), ("amp", {"epsilon": 0.0})])
def test_zero_radius_is_the_plain_objective(name, off):
    (x, y), a, b = batch(), linear_model(), linear_model()
    logs = one_step(DEFENSES.get(name)("standard", **off), a, x, y, 0.5)
    one_step(DEFENSES.get("standard")(), b, x, y, 0.5)
    assert logs["wp_active"] == 0.0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", ["sam", "amp"])
def test_deterministic_and_bn_statistics_untouched(name):
    """Same seed, same weights; the running statistics move by one train-mode forward (the trainer's)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3))
    base = RobustModel(net, "tinybn", K, (1, 7, 7), (0.5,), (0.5,))
    x, y = torch.rand(6, 1, 7, 7, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2])
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base).train()
        torch.manual_seed(5)
        defense = DEFENSES.get(name)(DEFENSES.get("pgd-at")(preset=None, eps=0.1, steps=2, step_size=0.05))
        one_step(defense, model, x, y, 0.1)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    tracked = [v for k, v in runs[0].items() if k.endswith("num_batches_tracked")]
    assert tracked == [torch.tensor(1)]                                  # the trainer's forward only
    moved = [k for k in runs[0] if k.endswith("running_mean")]
    assert not torch.equal(runs[0][moved[0]], base.state_dict()[moved[0]])


@pytest.mark.parametrize("make,match", [
    (lambda: DEFENSES.get("sam")("trades", rho=-1), "rho"),
    (lambda: DEFENSES.get("sam")("trades", adaptive="yes"), "adaptive"),
    (lambda: DEFENSES.get("sam")("trades", adaptive=True, eta=-0.1), "eta"),
    (lambda: DEFENSES.get("amp")("trades", epsilon=-0.5), "epsilon"),
    (lambda: DEFENSES.get("amp")("trades", inner_steps=0), "inner_steps"),
    (lambda: DEFENSES.get("amp")("trades", inner_lr=0), "inner_lr"),
    (lambda: DEFENSES.get("amp")(DEFENSES.get("sam")("trades")), "wraps one objective"),
])
def test_bad_hyperparameters_are_input_errors(make, match):
    with pytest.raises(InputError, match=match):
        make()


# -- CLI ------------------------------------------------------------------------------------------
TINY = ["train", "--arch", "ibp-small", "--dataset", "mnist5k", "--set", "data.n_train=256", "--epochs", "1",
        "--batch-size", "64", "--eval-n", "50", "--set", "eval.attack=null", "--set", "eval.best_by=clean_accuracy",
        "--defense", "pgd-at", "--set", "defense.params.preset=mnist", "--set", "defense.params.steps=1",
        "--set", "defense.params.step_size=0.3", "--device", "cpu", "--seed", "0"]


@pytest.mark.parametrize("name,params", [("sam", "defense.wp_params.rho=0.05"),
                                         ("amp", "defense.wp_params.inner_steps=2")])
def test_train_cli_end_to_end(tmp_path, name, params):
    from robustkit.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main([*TINY, "--set", f"defense.weight_perturbation={name}", "--set", params, "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and rec[0]["train_wp_active"] == 1.0 and 0.0 <= rec[0]["clean_accuracy"] <= 1.0
    assert f"weight_perturbation: {name}" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("train_*.yaml")
                                          if p.name.split("_")[1] in ("sam", "amp")))
def test_recipes_build(recipe):
    from robustkit.app.train import build_defense
    from robustkit.config import load_config

    cfg = load_config(ROOT / "configs" / recipe, cls=TrainConfig)
    d = build_defense(cfg)
    assert d.name == recipe.split("_")[1] and d.params()["inner"]["defense"] == cfg.defense.name


# -- DDP: run as the torchrun worker --------------------------------------------------------------
def _sha(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _replica_run(name: str, rank: int, world: int, average: bool) -> dict[str, Any]:
    """Two Trainer steps on a DDP ``ibp-small``: the SHA-256 of each step's perturbed weights."""
    import defenses.weight_perturbation as wp
    from defenses.schedules import make_schedule
    from defenses.trainer import Trainer, make_optimizer
    from robustkit.data import make_loader
    from robustkit.zoo import create

    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28), (0.5,), (0.5,))
    net = nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(1 + rank)
    defense = DEFENSES.get(name)(DEFENSES.get("pgd-at")(preset=None, eps=0.1, steps=2, step_size=0.05))
    seen: list[str] = []
    real = defense.before_loss

    def before_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> None:
        real(m, x, y, ctx)
        seen.append(_sha([w1 for _, _, w1 in defense._saved]))

    defense.before_loss = before_loss  # type: ignore[method-assign]
    loader = make_loader("mnist5k", "train", batch_size=16, n=64, seed=0, rank=rank, world_size=world)
    avg = wp.average_across_replicas if average else (lambda tensors: None)
    with mock.patch.object(wp, "average_across_replicas", avg):
        Trainer(net, defense, loader, epochs=1, optimizer=make_optimizer(net.parameters(), "sgd", 0.05),
                schedule=make_schedule("constant"), progress=False).fit()
    return {"steps": seen, "final": _sha(list(model.state_dict().values()))}


def _direction_vs_one_process(name: str, rank: int, world: int) -> float:
    """max |v_ddp - v_one| / max |v_one|: the DDP rule on two half-batches vs one process on the whole."""
    from robustkit.data import make_loader
    from robustkit.zoo import create

    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28), (0.5,), (0.5,))
    net = nn.parallel.DistributedDataParallel(model)
    x, y = next(iter(make_loader("mnist5k", "train", batch_size=32, n=32)))          # (32, 1, 28, 28)
    x_adv = (x + 0.1 * torch.sign(torch.sin(torch.arange(x.numel()).view_as(x)))).clamp(0, 1)
    defense = DEFENSES.get(name)("pgd-at", **({"inner_steps": 3} if name == "amp" else {"adaptive": True}))
    v_ddp = defense.direction(net, x[rank::world], x_adv[rank::world], y[rank::world])
    v_one = defense.direction(model, x, x_adv, y)
    scale = max(float(v.abs().max()) for v in v_one.values())
    return max(float((v_ddp[n] - v_one[n]).abs().max()) for n in v_one) / scale


def _worker(out: Path) -> None:
    from robustkit.app import shard

    w, _ = shard.setup("cpu")
    report = {name: {"averaged": _replica_run(name, w.rank, w.size, True),
                     "not_averaged": _replica_run(name, w.rank, w.size, False),
                     "direction_rel_err": _direction_vs_one_process(name, w.rank, w.size)} for name in ("sam", "amp")}
    (out / f"rank{w.rank}.json").write_text(json.dumps(report))
    shard.barrier()


@pytest.mark.slow  # ~30 s on 2 cores (a torchrun launch); tests/_ddp_worker.py could host it for free
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_perturbation_is_identical_on_every_replica(tmp_path):
    """SAM (adaptive) and AMP (3 inner steps) under 2-process DDP (gloo): the same perturbed weights on
    both replicas at every step, and the half-batch rule = the one-process rule on the whole batch."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _torchrun import run_script

    run_script(__file__, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for name in ("sam", "amp"):
        a, b = r0[name], r1[name]
        assert len(a["averaged"]["steps"]) == 2
        assert a["averaged"] == b["averaged"]                           # bit for bit, every step and the end
        # without the cross-rank average the replicas perturb differently: the check above can fail
        assert all(s != t for s, t in zip(a["not_averaged"]["steps"], b["not_averaged"]["steps"]))
        assert a["direction_rel_err"] < 1e-5 and b["direction_rel_err"] < 1e-5


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
