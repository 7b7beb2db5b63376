"""Run by ``tests/test_ddp_train.py`` under ``torchrun --nproc_per_node=2`` (CPU, gloo): one
launch does three jobs, each rank writing what it saw to ``OUT/rank<R>.json``:

1. ``bad``: ``robustkit train`` with an input error that only rank 0 can see (the per-epoch
   attack is built by rank 0 only): the exit code on this rank, and whether anything was written.
2. ``crash``: ``robustkit train`` interrupted (``KeyboardInterrupt`` on every rank before step
   ``CRASH_AT``, i.e. mid-epoch 2); every call that writes the run directory is recorded, per rank.
   The test then resumes it with the real CLI and compares with an uninterrupted run.
3. ``wp``: AWP and RWP (inner PGD-AT) through the Trainer on a DDP ``ibp-small``: a SHA-256 of the
   perturbed weights at every step and of the final weights (must be equal across ranks), the
   same with the cross-rank averaging switched off (must differ: the check can fail), and the
   distance between the DDP perturbation on two half-batches and the one-process perturbation
   on the whole batch (must be float round-off).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT TRAIN_ARGS_JSON
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import defenses  # noqa: F401  (registers the objectives)
import defenses.weight_perturbation as wp
from defenses.schedules import make_schedule
from defenses.trainer import Trainer, make_optimizer
from robustkit import create
from robustkit.app import shard
from robustkit.cli import main as cli
from robustkit.data import make_loader
from robustkit.registry import DEFENSES
from robustkit.runs import RunDir

CRASH_AT = 7  # 4 steps per epoch, a checkpoint every 3 steps: the run stops with the one of step 6 on disk


def _sha(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def bad(out: Path, train_args: list[str]) -> dict[str, Any]:
    target = out / "bad"
    rc = cli([*train_args, "--set", "eval.attack=no-such-attack", "--out", str(target)])
    return {"rc": rc, "written": target.exists()}


def crash(out: Path, train_args: list[str]) -> dict[str, Any]:
    writes: list[str] = []

    def spy(name: str) -> Any:
        real = getattr(RunDir, name)

        def call(self: RunDir, *a: Any, **k: Any) -> Any:
            writes.append(name if name != "save_checkpoint" else f"{name} {a[0]}")
            return real(self, *a, **k)
        return call

    real_step = Trainer._train_step

    def step(self: Trainer, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> Any:
        if self.step == CRASH_AT:
            raise KeyboardInterrupt  # as Ctrl-C would, on every rank at the same step
        return real_step(self, x, y, ctx)

    with mock.patch.object(Trainer, "_train_step", step), \
            mock.patch.object(RunDir, "create", spy("create")), mock.patch.object(RunDir, "log", spy("log")), \
            mock.patch.object(RunDir, "save_checkpoint", spy("save_checkpoint")):
        rc = cli([*train_args, "--out", str(out / "crashed")])
    return {"rc": rc, "writes": writes}


def _awp_run(name: str, rank: int, world: int, average: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28), (0.5,), (0.5,))
    net = torch.nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(1 + rank)  # per-rank random starts, as robustkit.app.train does
    inner = DEFENSES.get("pgd-at")(preset=None, eps=0.1, steps=2, step_size=0.05)
    extra = {"c_min": 3.0, "iterations": 3} if name == "rwp" else {}
    defense = DEFENSES.get(name)(inner, gamma=1e-2, warmup_epochs=0, **extra)
    loader = make_loader("mnist5k", "train", batch_size=16, n=128, seed=0, rank=rank, world_size=world)
    seen: list[str] = []
    real = defense.before_loss

    def before_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> None:
        real(model, x, y, ctx)
        seen.append(_sha([w1 for _, _, w1 in defense._saved]))  # the perturbed weights of this step

    defense.before_loss = before_loss  # type: ignore[method-assign]
    optimizer = make_optimizer(net.parameters(), "sgd", 0.05, 0.9, 5e-4)
    patch = mock.patch.object(wp, "average_across_replicas", lambda tensors: None) if not average \
        else mock.patch.object(wp, "average_across_replicas", wp.average_across_replicas)
    with patch:
        Trainer(net, defense, loader, epochs=1, optimizer=optimizer, schedule=make_schedule("constant"),
                progress=False).fit()
    return {"steps": seen, "final": _sha(list(model.state_dict().values()))}


def _direction_vs_one_process(name: str, rank: int, world: int) -> float:
    """max |v_ddp - v_one| / max |v_one| over the perturbed tensors, for one fixed batch."""
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28), (0.5,), (0.5,))
    net = torch.nn.parallel.DistributedDataParallel(model)
    x, y = next(iter(make_loader("mnist5k", "train", batch_size=32, n=32)))      # (32, 1, 28, 28), (32,)
    x_adv = (x + 0.1 * torch.sign(torch.sin(torch.arange(x.numel()).view_as(x)))).clamp(0, 1)
    extra = {"c_min": 3.0, "iterations": 3} if name == "rwp" else {}
    defense = DEFENSES.get(name)("pgd-at", gamma=1e-2, warmup_epochs=0, **extra)
    v_ddp = defense.direction(net, x[rank::world], x_adv[rank::world], y[rank::world])   # this rank's half
    v_one = defense.direction(model, x, x_adv, y)                                      # the whole batch
    scale = max(float(v.abs().max()) for v in v_one.values())
    return max(float((v_ddp[n] - v_one[n]).abs().max()) for n in v_one) / scale


def main() -> None:
    out, train_args = Path(sys.argv[1]), json.loads(sys.argv[2])
    w, _ = shard.setup("cpu")
    report: dict[str, Any] = {"rank": w.rank, "bad": bad(out, train_args)}
    report["crash"] = crash(out, train_args)
    for name in ("awp", "rwp"):
        report[name] = {"averaged": _awp_run(name, w.rank, w.size, True),
                        "not_averaged": _awp_run(name, w.rank, w.size, False),
                        "direction_rel_err": _direction_vs_one_process(name, w.rank, w.size)}
    (out / f"rank{w.rank}.json").write_text(json.dumps(report, indent=1))
    shard.barrier()


if __name__ == "__main__":
    main()
