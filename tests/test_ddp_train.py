"""DDP training under ``torchrun`` with 2 CPU processes (gloo), against one process.

One module-scoped set of runs (about 60 s on 2 cores): a 1-process run with batch 64 (``one``),
a 2-process run with batch 32 per rank (``two``, the same global batch), and one
``tests/_ddp_worker.py`` launch (an input error seen by rank 0 only; a run interrupted mid-epoch
2, then resumed here with the real CLI; AWP and RWP replicas), each under
``python -m torch.distributed.run --standalone`` (a free rendezvous port, so parallel test runs
never collide).

Tolerances: ``one`` vs ``two`` differ only by float round-off (the DDP gradient is the mean of
two 32-sample means = the 64-sample mean; ``ibp-small`` has no batch norm), so the per-epoch
``train_loss`` agrees to 1e-5 relative and the final weights to 1e-5 absolute. Resume under DDP
and the AWP/RWP replicas are compared bit for bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustkit.data import Data, TensorLoader

sys.path.insert(0, str(Path(__file__).parent))
from _torchrun import _env, robustkit  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

TRAIN = ["train", "--arch", "ibp-small", "--dataset", "mnist5k", "--set", "data.n_train=256", "--epochs", "2",
         "--lr", "0.3", "--eval-n", "64", "--set", "eval.attack=null", "--set", "eval.best_by=clean_accuracy",
         "--checkpoint-every", "3", "--device", "cpu", "--seed", "0"]
EXPECTED_FILES = {"config.yaml", "metrics.jsonl", "results.json", "report.md", "plots/training_curves.png",
                  "checkpoints/last/model.json", "checkpoints/last/model.safetensors", "checkpoints/last/state.pt",
                  "checkpoints/best/model.json", "checkpoints/best/model.safetensors"}


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _ok(robustkit([*TRAIN, "--batch-size", "64", "--out", str(root / "one")], nproc=1))
    _ok(robustkit([*TRAIN, "--batch-size", "32", "--out", str(root / "two")], nproc=2))
    worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(Path(__file__).parent / "_ddp_worker.py"), str(root), json.dumps([*TRAIN, "--batch-size", "32"])]
    _ok(subprocess.run(worker, capture_output=True, text=True, timeout=300, env=_env()))
    resumed = robustkit([*TRAIN, "--batch-size", "32", "--out", str(root / "crashed"), "--resume"], nproc=2)
    _ok(resumed)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root, ranks, resumed


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def test_strided_shards_make_the_global_batch_of_one_process():
    """Rank r takes positions r, r + W, ... of the epoch's permutation: the b-th batches of the W
    ranks together are the b-th batch of one process with W times the batch size."""
    data = Data(None, torch.arange(96).view(96, 1, 1, 1).to(torch.uint8), torch.arange(96))
    for epoch in (0, 3):
        one = TensorLoader(data, 8, shuffle=True, seed=5)
        one.set_epoch(epoch)
        ranks = [TensorLoader(data, 4, shuffle=True, seed=5, rank=r, world_size=2) for r in (0, 1)]
        for rk in ranks:
            rk.set_epoch(epoch)
        for (_, y1), (_, y_r0), (_, y_r1) in zip(one, *ranks, strict=True):
            assert y1.tolist() == torch.stack([y_r0, y_r1], 1).flatten().tolist()


def test_uneven_training_sets_give_every_rank_the_same_steps():
    """257 samples on 2 ranks: 129 + 128 would be 5 + 4 batches of 32 (DDP hangs on the fifth); the
    pipeline drops the last sample, so each rank takes 4 equal batches."""
    from robustkit.app.shard import World
    from robustkit.app.train import _even_shards

    data = Data(None, torch.zeros(257, 1, 1, 1, dtype=torch.uint8), torch.arange(257))
    raw = [TensorLoader(data, 32, shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    assert [len(x) for x in raw] == [5, 4]
    even = [_even_shards(x, World(r, 2, r)) for r, x in enumerate(raw)]
    assert [len(x) for x in even] == [4, 4] and [len(x.data) for x in even] == [256, 256]
    sizes = [[len(y) for _, y in x] for x in even]
    assert sizes[0] == sizes[1] == [32, 32, 32, 32]


def test_one_run_directory_written_by_rank_0_only(runs):
    root, ranks, _ = runs
    assert _files(root / "two") == EXPECTED_FILES          # no temp/old/rank-suffixed files or dirs
    assert len(_metrics(root / "two")) == 2                # one line per epoch, not one per rank
    writes0, writes1 = ranks[0]["crash"]["writes"], ranks[1]["crash"]["writes"]
    assert writes1 == []                                   # rank 1 never wrote anything
    assert writes0[0] == "create" and "log" in writes0 and writes0.count("save_checkpoint last") == 3


def test_same_global_batch_same_trajectory_as_one_process(runs):
    root, _, _ = runs
    one, two = _metrics(root / "one"), _metrics(root / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [4, 8]
    assert [r["lr"] for r in one] == [r["lr"] for r in two]
    assert one[0]["train_loss"] - one[1]["train_loss"] > 0.05  # it learns: the comparison means something
    for a, b in zip(one, two):
        # the logged loss is the all-reduced global mean, not rank 0's half
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=1e-6)
    wa, wb = _weights(root / "one"), _weights(root / "two")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_resume_under_ddp_continues_exactly(runs):
    root, ranks, resumed = runs
    assert [r["crash"]["rc"] for r in ranks] == [130, 130]   # interrupted mid-epoch 2 on both ranks
    state = torch.load(root / "crashed" / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["world_size"], len(state["ranks"])) == (2, 8, 2, 2)
    a, b = _weights(root / "two"), _weights(root / "crashed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = _metrics(root / "two"), _metrics(root / "crashed")
    keys = ("epoch", "step", "lr", "train_loss", "train_acc", "clean_accuracy")
    assert [{k: r[k] for k in keys} for r in ma] == [{k: r[k] for k in keys} for r in mb]
    assert _files(root / "crashed") == EXPECTED_FILES


def test_resume_with_another_number_of_processes_is_an_input_error(runs, tmp_path):
    root, _, _ = runs
    run = tmp_path / "copy"
    shutil.copytree(root / "two", run)
    before = {f: (run / f).read_bytes() for f in _files(run)}
    proc = robustkit([*TRAIN, "--batch-size", "32", "--epochs", "3", "--out", str(run), "--resume"], nproc=1)
    assert proc.returncode == 2, proc.stderr
    assert "written by 2 process(es), this run has 1" in proc.stderr
    assert {f: (run / f).read_bytes() for f in _files(run)} == before     # nothing written


def test_input_error_on_rank_0_only_stops_every_rank_before_writing(runs):
    root, ranks, _ = runs
    for r in ranks:
        assert r["bad"] == {"rc": 2, "written": False}
    assert not (root / "bad").exists()


@pytest.mark.parametrize("name", ["awp", "rwp"])
def test_weight_perturbation_is_identical_on_every_replica(runs, name):
    _, ranks, _ = runs
    r0, r1 = ranks[0][name], ranks[1][name]
    assert len(r0["averaged"]["steps"]) == 4
    assert r0["averaged"] == r1["averaged"]                  # every step's perturbed weights, bit for bit
    # without the cross-rank average the replicas perturb differently: the check above can fail
    assert all(a != b for a, b in zip(r0["not_averaged"]["steps"], r1["not_averaged"]["steps"]))
    assert r0["not_averaged"]["final"] != r1["not_averaged"]["final"]
    # the averaged perturbation on two half-batches is the one-process perturbation on the whole batch
    assert r0["direction_rel_err"] < 1e-5 and r1["direction_rel_err"] < 1e-5
