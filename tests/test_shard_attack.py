"""Sharded attack evaluation (``robustkit.app.sharded_eval``): per image identical to the one-process
engine for any batch size, record round trip, resume per batch; under ``torchrun`` (2 gloo
processes) ``robustkit attack`` and ``robustkit benchmark`` equal a one-process run, and a rank
killed mid-run is resumed computing only the missing batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _fake_attacks import WrongTarget
from safetensors.torch import load_file

from attacks.pgd import PGD
from robustkit._evaluation import Evaluation
from robustkit.app.shard import UnitStore
from robustkit.app.sharded_eval import evaluate_sharded
from robustkit.cli import main
from robustkit.errors import InputError
from robustkit.evaluate import evaluate_attacks, targets
from robustkit.zoo import save
from tests._torchrun import kill_then_resume, robustkit

PER_IMAGE = ("clean_correct", "pred_clean", "y", "attacked", "broken", "unverified", "broken_by", "l2", "linf",
             "queries", "queries_to_success")


def assert_same(a: Evaluation, b: Evaluation) -> None:
    """Identical per image and in every total (not in seconds)."""
    for k in PER_IMAGE:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.sub_attacks == b.sub_attacks and a.attacks == b.attacks and a.mode == b.mode
    assert (a.clean_forward, a.verify_forward) == (b.clean_forward, b.verify_forward)
    for sa, sb in zip(a.stats, b.stats):
        assert {**sa.row(), "seconds": 0} == {**sb.row(), "seconds": 0} and sa.params == sb.params
    ra, rb = a.summary(), b.summary()
    for k in ("clean_accuracy", "robust_accuracy", "forward_passes", "backward_passes", "unverified", "mean_l2"):
        assert ra[k] == rb[k], k


@pytest.fixture(scope="module")
def data(mnist_test_batch) -> tuple[torch.Tensor, torch.Tensor]:
    return mnist_test_batch                                                     # (64, 1, 28, 28), (64,)


@pytest.mark.parametrize("mode", ["chained", "independent"])
@pytest.mark.parametrize("bs", [7, 32, 64, 100])
def test_sharded_equals_engine_per_image(tiny_mnist_model, data, mode: str, bs: int) -> None:
    """Fixed batches of positions through the engine == the engine over a loader of those batches."""
    x, y = data
    chain = [PGD(eps=0.1, steps=3, seed=0), WrongTarget(eps=0.2)]
    ev = evaluate_sharded(tiny_mnist_model, x, y, chain, batch_size=bs, mode=mode, seed=5, keep_adversarials=True)
    loader = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
    ref = evaluate_attacks(tiny_mnist_model, loader, chain, mode=mode, seed=5, batch_size=bs, keep_adversarials=True)
    assert_same(ev, ref)
    assert torch.equal(ev.x_adv, ref.x_adv) and torch.equal(ev.x, x)
    assert 0 < ev.robust_accuracy < ev.clean_accuracy and ev.n == 64


def test_start_gives_the_global_targets(tiny_mnist_model, data) -> None:
    """A batch evaluated on its own with its offset gets the targets of the whole run."""
    x, y = data
    atk = WrongTarget(eps=0.2)
    ev = evaluate_attacks(tiny_mnist_model, (x[40:], y[40:]), atk, seed=3, start=40)
    assert torch.equal(atk.seen[0], targets(y, torch.arange(64), 10, 3, 0)[40:][ev.clean_correct])
    with pytest.raises(InputError, match="start must be >= 0"):
        evaluate_attacks(tiny_mnist_model, (x, y), atk, start=-1)


def test_record_round_trip_and_concat(tiny_mnist_model, data, tmp_path: Path) -> None:
    x, y = data
    chain = [PGD(eps=0.1, steps=3, seed=0), WrongTarget(eps=0.2)]
    parts = [evaluate_attacks(tiny_mnist_model, (x[s:s + 24], y[s:s + 24]), chain, seed=1, start=s,
                              keep_adversarials=True) for s in (0, 24, 48)]
    store = UnitStore(tmp_path, {"k": 1})
    for i, p in enumerate(parts):
        store.save(i, p.to_record())
    back = [Evaluation.from_record(store.done()[i]) for i in range(3)]
    for p, b in zip(parts, back):
        assert_same(p, b)
        assert b.seconds == p.seconds and b.stats[0].meta == p.stats[0].meta and torch.equal(b.x_adv, p.x_adv)
    whole = Evaluation.concat(back)
    ref = evaluate_attacks(tiny_mnist_model, [(x[s:s + 24], y[s:s + 24]) for s in (0, 24, 48)], chain, seed=1,
                           keep_adversarials=True)
    assert_same(whole, ref)
    assert whole.seconds == pytest.approx(sum(p.seconds for p in parts))
    assert whole.stats[1].attacked == sum(p.stats[1].attacked for p in parts)
    with pytest.raises(ValueError, match="different evaluations"):
        Evaluation.concat([parts[0], evaluate_attacks(tiny_mnist_model, (x, y), chain[0])])


def test_resume_computes_only_missing_batches(tiny_mnist_model, data, tmp_path: Path, monkeypatch) -> None:
    x, y = data
    atk = PGD(eps=0.1, steps=3, seed=0)
    full = evaluate_sharded(tiny_mnist_model, x, y, atk, batch_size=16, store_dir=tmp_path, seed=2)
    assert len(list(tmp_path.glob("unit-*.json"))) == 4
    for k in (1, 3):
        (tmp_path / f"unit-{k:08d}.json").unlink()
    import robustkit.app.sharded_eval as se

    starts: list[int] = []
    real = se.evaluate_attacks
    monkeypatch.setattr(se, "evaluate_attacks", lambda *a, **kw: starts.append(kw["start"]) or real(*a, **kw))
    again = evaluate_sharded(tiny_mnist_model, x, y, atk, batch_size=16, store_dir=tmp_path, resume=True, seed=2)
    assert starts == [16, 48]
    assert_same(again, full)
    with pytest.raises(InputError, match="different settings"):
        evaluate_sharded(tiny_mnist_model, x, y, atk, batch_size=16, store_dir=tmp_path, resume=True, seed=3)
    evaluate_sharded(tiny_mnist_model, x, y, atk, batch_size=16, store_dir=tmp_path, seed=3)   # no resume: clears
    assert starts[2:] == [0, 16, 32, 48]


# -- robustkit attack under torchrun (2 gloo processes) ------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_mnist_model) -> str:
    return str(save(tiny_mnist_model, tmp_path_factory.mktemp("model") / "m"))


def _results(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``results.json`` without timings / paths, and ``per_image.json``."""
    res = json.loads((out / "results.json").read_text())
    for k in ("seconds", "processes", "config", "curve"):
        res.pop(k, None)
    res["per_attack"] = [{k: v for k, v in r.items() if k != "seconds"} for r in res["per_attack"]]
    return res, json.loads((out / "per_image.json").read_text())


ATTACK = ("attack", "--device", "cpu", "--attack", "pgd,deepfool", "--eps", "0.1", "--steps", "3", "--n", "64",
          "--batch-size", "12", "--targeted")


def test_attack_two_processes_equal_one(model_dir: str, tmp_path: Path) -> None:
    """Per image (label, prediction, robust, broken_by, l2, linf, queries) and in every total the
    same with 1 and 2 processes; rank 0 alone writes and reports."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*ATTACK, "--model", model_dir, "--out", str(one), "--save-adversarials"]) == 0
    r = robustkit([*ATTACK, "--model", model_dir, "--out", str(two), "--save-adversarials"], nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert _results(one) == _results(two)
    per = _results(two)[1]["runs"][0]["records"]
    assert len(per) == 64 and {p["broken_by"] for p in per} >= {"pgd", None}
    a, b = load_file(str(one / "adversarials.safetensors")), load_file(str(two / "adversarials.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((two / "results.json").read_text())["processes"] == 2
    assert r.stdout.count("results:") == 1 and r.stdout.count("robust ") == 1
    assert len(list((two / "parts" / "eps-0").glob("unit-*.json"))) == 6                  # ceil(64 / 12)


def test_attack_kill_one_rank_then_resume(model_dir: str, tmp_path: Path) -> None:
    """A rank SIGKILLed mid-run: ``--resume`` keeps every batch already saved, computes the rest,
    and gives the results of an uninterrupted run."""
    out, ref = tmp_path / "killed", tmp_path / "ref"
    args = ("attack", "--model", model_dir, "--device", "cpu", "--attack", "pgd", "--eps", "0.1", "--steps", "40",
            "--restarts", "2", "--n", "64", "--batch-size", "4")
    parts = out / "parts" / "eps-0"
    kill_then_resume(args, out, parts, units=16)
    assert main([*args, "--out", str(ref)]) == 0
    assert _results(out) == _results(ref)


def test_attack_bad_input_under_torchrun(model_dir: str, tmp_path: Path, capsys) -> None:
    r = robustkit(["attack", "--model", model_dir, "--device", "cpu", "--eps", "0.1", "--n", "1",
                   "--out", str(tmp_path / "o")], nproc=2)
    assert r.returncode != 0 and "robustkit: error: torchrun started 2 processes for 1 images" in r.stderr
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    assert main(["attack", "--model", model_dir, "--device", "cpu", "--eps", "0.1", "--n", "4",
                 "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot be created" in capsys.readouterr().err


def _no_timing(obj: Any) -> Any:
    """``obj`` without timings (keys ``seconds`` / ``*_seconds`` / ``*per_second*``) and paths."""
    if isinstance(obj, dict):
        return {k: _no_timing(v) for k, v in obj.items()
                if not (k == "seconds" or k.endswith("_seconds") or "per_second" in k or k in ("out", "processes"))}
    if isinstance(obj, list):
        return [_no_timing(v) for v in obj]
    return obj


def test_benchmark_two_processes_equal_one(model_dir: str, tmp_path: Path) -> None:
    """The benchmark's attacks, eps curve and IBP certificates: the same entries with 1 and 2
    processes; rank 0 alone writes results.json and models/<name>.json."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("benchmark", "--device", "cpu", "--models", model_dir, "--n", "48", "--eps", "0.1",
            "--attacks", "pgd,deepfool", "--param", "pgd.steps=5", "--param", "pgd.restarts=1", "--certify", "ibp",
            "--eps-grid", "0,0.05,0.1", "--batch-size", "16")
    assert main([*args, "--out", str(one)]) == 0
    r = robustkit([*args, "--out", str(two)], nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert _no_timing(a) == _no_timing(b)
    units = sorted((two / "parts" / "m" / "attacks").glob("unit-*.safetensors"))
    assert len(units) == 3
    for f in units:                                                     # per image: every batch's tensors
        t1, t2 = load_file(str(one / "parts" / "m" / "attacks" / f.name)), load_file(str(f))
        assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert [p.name for p in (two / "models").iterdir()] == ["m.json"]


def test_benchmark_resumes_matching_batches_only(tiny_mnist_model, tmp_path: Path, monkeypatch) -> None:
    """A benchmark that died keeps its saved batches (same settings and weights); batches made with
    other settings are not an error there: they are recomputed."""
    import robustkit.app.sharded_eval as se
    from robustkit.app import benchmark as bm

    kw = {"n": 40, "eps": 0.1, "attacks": ["pgd"], "eps_grid": [], "batch_size": 16, "progress": False}
    first = bm.run_benchmark({"m": tiny_mnist_model}, tmp_path, attack_params={"pgd": {"steps": 3}}, **kw)
    (tmp_path / "models" / "m.json").unlink()                          # as if it died before the end
    (tmp_path / "parts" / "m" / "attacks" / "unit-00000001.json").unlink()
    starts: list[int] = []
    real = se.evaluate_attacks
    monkeypatch.setattr(se, "evaluate_attacks", lambda *a, **k: starts.append(k["start"]) or real(*a, **k))
    again = bm.run_benchmark({"m": tiny_mnist_model}, tmp_path, attack_params={"pgd": {"steps": 3}}, **kw)
    assert starts == [16] and _no_timing(again["models"]) == _no_timing(first["models"])
    bm.run_benchmark({"m": tiny_mnist_model}, tmp_path, attack_params={"pgd": {"steps": 4}}, **kw)
    assert starts[1:] == [0, 16, 32]
