"""fast-at's catastrophic-overfitting check under DDP (``torchrun``, 2 CPU processes, gloo).

The detector must take the same decision on every rank, or the ranks diverge (one stops, the other
waits in its next all-reduce forever). This file is also the worker: run under torchrun it calls
``robustkit train`` (the CLI's ``main``, as ``python -m robustkit`` does) with fast-at, the check on
and ``early_stop``, and records per rank what the check returned each epoch, whether the objective
asked to stop, the last epoch trained, SHA-256s of the probe batch and of the final weights. Jobs:

- ``full``: 3 epochs, the real probe; ``crash``: the same run interrupted on every rank before step
  ``CRASH_AT`` (mid epoch 2, after the probe was taken; the last checkpoint is from step 20), then
  (second launch) ``resume``: that run resumed;
- ``skewed``: each rank's *local* probe accuracies are replaced by rank-dependent values (as if the
  ranks had probed different images or run non-deterministic kernels) such that rank 0 alone
  would detect a collapse at the 3rd check and rank 1 alone would not; with LAP on (its weight
  moves use the rank-averaged gradient, so the replicas stay identical).

Checked: both ranks record the same accuracies, detections, stop, probe and weights; in ``skewed``
both detect at the 3rd check (the averaged accuracies), restore and stop there; the resumed run
(its probe from the checkpoint, written by rank 0) ends with the uninterrupted run's metrics and
weights, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from tests._torchrun import run_script

ROOT = Path(__file__).parent.parent
CRASH_AT = 24  # 16 steps per epoch per rank: mid epoch 2; a checkpoint every 10 steps
TRAIN = ["train", "--arch", "ibp-small", "--dataset", "mnist5k", "--defense", "fast-at", "--eps", "0.2",
         "--epochs", "3", "--schedule", "cyclic", "--optimizer", "adam", "--lr", "0.005", "--batch-size", "32",
         "--set", "data.n_train=1024", "--eval-n", "32", "--set", "eval.attack=null",
         "--set", "eval.best_by=clean_accuracy", "--checkpoint-every", "10", "--device", "cpu", "--seed", "0",
         "--set", "defense.params.preset=mnist", "--set", "defense.params.co_batch=64",
         "--set", "defense.params.co_drop=0.05", "--set", "defense.params.early_stop=true"]
SKEWED = ["--epochs", "5", "--set", "data.n_train=256", "--set", "defense.params.lap_beta=0.01"]   # with LAP
# (PGD, FGSM) accuracies per check seen by rank 0 / rank 1. Averaged: 0.5 -> 0.28 (FGSM 0.55 -> 0.75) at
# the 3rd check, a collapse; rank 0 alone: 0.5 -> 0.1, a collapse; rank 1 alone: 0.5 -> 0.46, none.
LOCAL = [[(0.3, 0.35), (0.5, 0.55), (0.1, 0.9), (0.1, 0.9), (0.1, 0.9)],
         [(0.3, 0.35), (0.5, 0.55), (0.46, 0.6), (0.46, 0.6), (0.46, 0.6)]]

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.slow]   # ~60 s on 2 cores: two torchrun launches of 2 processes, four runs


# -- the worker (under torchrun) ------------------------------------------------------------------
def _sha(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _recorded_train(out: Path, extra: list[str], crash_at: int | None = None, resume: bool = False,
                    skewed: bool = False) -> dict[str, Any]:
    """``robustkit train TRAIN EXTRA --out OUT`` on this rank, recording the check and the end state."""
    import torch.distributed as dist

    from defenses.fast_at import FastAT
    from defenses.trainer import Trainer
    from robustkit.cli import main as cli
    from robustkit.zoo import unwrap

    seen: dict[str, Any] = {"checks": []}
    real_end, real_fit, real_step = FastAT.end_epoch, Trainer.fit, Trainer._train_step

    def end_epoch(self: FastAT, model: Any, ctx: Any) -> dict[str, Any]:
        rec = real_end(self, model, ctx)
        seen["checks"].append({"epoch": ctx.epoch, **rec, "stop": self.stop_training})
        return rec

    def fit(self: Trainer, resume: bool = False) -> Any:
        hist = real_fit(self, resume=resume)
        seen.update(last_epoch=self.epoch, stop=bool(self.defense.stop_training),
                    probe=_sha(list(self.defense._probe)), final=_sha(list(unwrap(self.model).state_dict().values())))
        return hist

    def step(self: Trainer, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> Any:
        if crash_at is not None and self.step == crash_at:
            raise KeyboardInterrupt  # as Ctrl-C would, on every rank at the same step
        return real_step(self, x, y, ctx)

    def local(self: FastAT, net: Any) -> torch.Tensor:  # this rank's own (skewed) view of the probe
        seq = LOCAL[dist.get_rank()]
        return torch.tensor(seq[self._detector.checks])

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(FastAT, "end_epoch", end_epoch))
        stack.enter_context(mock.patch.object(Trainer, "fit", fit))
        stack.enter_context(mock.patch.object(Trainer, "_train_step", step))
        if skewed:
            stack.enter_context(mock.patch.object(FastAT, "_local_accuracies", local))
        seen["rc"] = cli([*TRAIN, *extra, "--out", str(out), *(["--resume"] if resume else [])])
    return seen


def _worker(out: Path, mode: str) -> None:
    from robustkit.app import shard

    w, _ = shard.setup("cpu")
    if mode == "first":
        report = {"full": _recorded_train(out / "full", []),
                  "crash": _recorded_train(out / "crashed", [], crash_at=CRASH_AT),
                  "skewed": _recorded_train(out / "skewed", SKEWED, skewed=True)}
    else:
        report = {"resumed": _recorded_train(out / "crashed", [], resume=True)}
    (out / f"{mode}-rank{w.rank}.json").write_text(json.dumps(report, indent=1))
    shard.barrier()


# -- the test -----------------------------------------------------------------------------------
def _launch(out: Path, mode: str) -> None:
    run_script(__file__, str(out), mode)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["rc"] == b["rc"] == 0
    assert a["checks"] == b["checks"]                              # accuracies, detection, stop: per epoch
    assert [a[k] for k in ("last_epoch", "stop", "probe", "final")] == [b[k] for k in ("last_epoch", "stop",
                                                                                      "probe", "final")]


def _co(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k.startswith("co_")} for r in _metrics(run)]


def test_every_rank_takes_the_same_decision_and_resume_is_exact(tmp_path):
    _launch(tmp_path, "first")
    _launch(tmp_path, "resume")
    first = [json.loads((tmp_path / f"first-rank{r}.json").read_text()) for r in (0, 1)]
    again = [json.loads((tmp_path / f"resume-rank{r}.json").read_text()) for r in (0, 1)]

    full = first[0]["full"]
    _same(full, first[1]["full"])
    assert full["last_epoch"] == 3 and len(full["checks"]) == 3 and not full["stop"]
    assert [c["co_pgd_acc"] for c in full["checks"]] == [r["co_pgd_acc"] for r in _metrics(tmp_path / "full")]

    skewed = first[0]["skewed"]
    _same(skewed, first[1]["skewed"])
    assert [c["co_detected"] for c in skewed["checks"]] == [0, 0, 1] and skewed["checks"][2]["co_restored"] == 1
    assert skewed["checks"][2]["co_pgd_acc"] == pytest.approx(0.28) and skewed["stop"]
    assert skewed["last_epoch"] == 3 and len(_metrics(tmp_path / "skewed")) == 3    # stopped at epoch 3 of 5

    assert first[0]["crash"]["rc"] == first[1]["crash"]["rc"] != 0  # interrupted mid epoch 2
    resumed = again[0]["resumed"]
    _same(resumed, again[1]["resumed"])
    assert resumed["checks"] == full["checks"][1:]                   # epoch 1's check ran before the crash
    assert resumed["probe"] == full["probe"] and resumed["final"] == full["final"]
    assert _co(tmp_path / "crashed") == _co(tmp_path / "full")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]), sys.argv[2])
