"""Sharded attack evaluation (``robustkit.app.sharded_eval``): per image identical to the one-process
engine for any batch size, record round trip, resume per batch; under ``torchrun`` (2 gloo
processes) ``robustkit attack`` and ``robustkit benchmark`` equal a one-process run, and a rank
killed mid-run is resumed computing only the missing batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fake_attacks import WrongTarget

from attacks.pgd import PGD
from robustkit._evaluation import Evaluation
from robustkit.app.shard import UnitStore
from robustkit.app.sharded_eval import evaluate_sharded
from robustkit.errors import InputError
from robustkit.evaluate import evaluate_attacks, targets

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
