"""Certification sharded over torchrun processes (CPU, gloo): identical per-image results for any
number of processes, chunk size and interruption; the per-unit progress store; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustkit.app import shard
from robustkit.errors import CheckpointError, InputError
from robustkit.zoo import save
from tests._torchrun import kill_then_resume, robustkit

SMOOTH = ("--n0", "10", "--n", "200", "--batch-size", "400", "--sigma", "0.25", "--alpha", "0.01")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_mnist_model) -> str:
    return str(save(tiny_mnist_model, tmp_path_factory.mktemp("model") / "m"))


def _per_image(out: Path) -> list[dict]:
    res = json.loads((out / "results.json").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in res["per_sample"]]


# -- in-process: the store and the single-process path ------------------------------------------
def test_unit_store_round_trip_and_key(tmp_path):
    s = shard.UnitStore(tmp_path / "p", {"a": 1, "b": [1, 2]})
    s.save(3, {"n": 2, "x": torch.arange(6.0).reshape(2, 3), "tag": "ok"})
    s.save(7, {"n": 1})
    done = s.done()
    assert sorted(done) == [3, 7] and done[3]["tag"] == "ok" and torch.equal(done[3]["x"], torch.arange(6.0).view(2, 3))
    assert not list((tmp_path / "p").glob("*.tmp"))                     # nothing half-written
    with pytest.raises(InputError, match=r"different settings \(a: 1 -> 2\)"):
        shard.UnitStore(tmp_path / "p", {"a": 2, "b": [1, 2]}).done()
    (tmp_path / "p" / "unit-00000009.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a robustkit progress file"):
        s.done()
    s.clear()
    assert s.done() == {}


def test_map_units_single_process_resume(tmp_path):
    calls: list[int] = []

    def compute(u: int) -> dict:
        calls.append(u)
        return {"u": u, "sq": u * u}

    store = shard.UnitStore(tmp_path, {"k": 0})
    assert [r["sq"] for r in shard.map_units([5, 2, 9], compute, store=store)] == [25, 4, 81]
    calls.clear()
    assert [r["u"] for r in shard.map_units([5, 2, 9, 4], compute, store=store, resume=True)] == [5, 2, 9, 4]
    assert calls == [4]                                                  # only the missing unit
    calls.clear()
    shard.map_units([5], compute, store=store, resume=False)            # not resuming: start afresh
    assert calls == [5] and sorted(store.done()) == [5]


def test_world_from_env_and_too_many_processes(monkeypatch):
    assert shard.world() == shard.World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert shard.world() == shard.World(3, 4, 1) and not shard.world().is_main
    with pytest.raises(InputError, match="torchrun started 4 processes for 3 images"):
        shard.check_enough(3, "images")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="need 0 <= RANK < WORLD_SIZE"):
        shard.world()


# -- torchrun, 2 processes ---------------------------------------------------------------------
@pytest.mark.parametrize("method, args", [
    ("ibp", ("--method", "ibp", "--eps", "0.05", "--n-images", "24", "--batch-size", "5")),
    ("smoothing", (*SMOOTH, "--n-images", "6")),
])
def test_two_processes_equal_one(model_dir, tmp_path, method, args):
    """Per image the same prediction, radius, abstention (and sample counts) with 1 or 2 processes
    and different chunk sizes: randomness is per image, not per process or chunk."""
    one, two = tmp_path / "one", tmp_path / "two"
    base = ("certify", "--model", model_dir, "--device", "cpu", *args)
    r1 = robustkit([*base, "--chunk", "3", "--out", str(one)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = robustkit([*base, "--chunk", "2", "--out", str(two)], nproc=2)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    assert _per_image(one) == _per_image(two)
    res = json.loads((two / "results.json").read_text())
    assert res["processes"] == 2 and res["certifier"] == method
    assert r2.stdout.count("results:") == 1                             # rank 0 alone reports
    assert len(list((two / "parts").glob("unit-*.json"))) == len(_per_image(two)) // 2


def test_kill_one_rank_then_resume_computes_only_the_rest(model_dir, tmp_path):
    out, ref = tmp_path / "killed", tmp_path / "ref"
    args = ("certify", "--model", model_dir, "--device", "cpu", "--n0", "10", "--n", "3000", "--batch-size", "1000",
            "--sigma", "0.25", "--n-images", "16", "--chunk", "1")
    parts = out / "parts"
    kill_then_resume(args, out, parts, units=16)
    assert robustkit([*args, "--out", str(ref)]).returncode == 0
    assert _per_image(out) == _per_image(ref)


def test_more_processes_than_images_is_bad_input(model_dir, tmp_path):
    r = robustkit(["certify", "--model", model_dir, "--device", "cpu", "--method", "ibp", "--n-images", "1",
                   "--out", str(tmp_path / "o")], nproc=2)
    assert r.returncode != 0
    assert "robustkit: error: torchrun started 2 processes for 1 images" in r.stderr
    assert not (tmp_path / "o" / "results.json").exists()
