"""The one evaluation engine (``robustkit.evaluate.evaluate_attacks``): both modes verify every
claimed success; chained and independent agree when each attack is deterministic per point."""

from __future__ import annotations

import pytest
import torch
from _fake_attacks import Liar, PerSample, WrongTarget

from attacks.pgd import PGD
from robustkit.evaluate import evaluate_attacks, predict, robust_accuracy, targets
from robustkit.threat import ThreatModel

MODES = ("chained", "independent")


@pytest.fixture(scope="module")
def data(mnist_test_batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = mnist_test_batch
    return x[:40], y[:40]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["outside", "clean", "box"])
def test_false_claims_are_not_counted(tiny_mnist_model, data, mode: str, how: str) -> None:
    x, y = data
    ev = evaluate_attacks(tiny_mnist_model, (x, y), Liar(eps=0.1, how=how), mode=mode)
    correct = int(ev.clean_correct.sum())
    assert correct > 0 and ev.robust_accuracy == ev.clean_accuracy and not bool(ev.broken.any())
    assert int(ev.unverified.sum()) == ev.stats[0].unverified == ev.stats[0].attacked == correct
    assert ev.summary()["unverified"] == correct and ev.summary()["attack_success_rate"] == 0.0
    assert bool((ev.broken_by == -1).all()) and bool((ev.queries_to_success == -1).all())


@pytest.mark.parametrize("mode", MODES)
def test_liar_then_pgd_equals_pgd_alone(tiny_mnist_model, data, mode: str) -> None:
    """The liar's rejected claims leave every point standing for the next attack, in both modes."""
    x, y = data
    pgd = PGD(eps=0.15, steps=5, seed=0)
    alone = evaluate_attacks(tiny_mnist_model, (x, y), pgd, mode=mode)
    both = evaluate_attacks(tiny_mnist_model, (x, y), [Liar(eps=0.15), pgd], mode=mode)
    assert both.stats[1].attacked == int(both.clean_correct.sum())
    assert torch.equal(both.robust, alone.robust) and 0 < alone.robust_accuracy < alone.clean_accuracy
    assert bool((both.broken_by[both.success] == 1).all())


def test_checked_against_the_given_threat_model(tiny_mnist_model, data) -> None:
    """With ``threat``, claims are checked against that ball, not the attack's own: a PGD run at
    eps 0.3 checked at eps 0.05 keeps only the breaks that fit the smaller ball."""
    x, y = data
    ev = evaluate_attacks(tiny_mnist_model, (x, y), PGD(eps=0.3, steps=5, seed=0), threat=ThreatModel("linf", 0.05))
    own = evaluate_attacks(tiny_mnist_model, (x, y), PGD(eps=0.3, steps=5, seed=0))
    assert int(ev.unverified.sum()) > 0 and ev.robust_accuracy > own.robust_accuracy
    assert ev.stats[0].broken + ev.stats[0].unverified == own.stats[0].broken and own.stats[0].unverified == 0
    assert bool((ev.linf[ev.success] <= 0.05 + 1e-5).all())


@pytest.mark.parametrize("mode", MODES)
def test_targeted_success_means_target_reached(tiny_mnist_model, data, mode: str) -> None:
    """A targeted attack's claim counts only where the label on x_adv is the seeded target."""
    x, y = data
    atk = WrongTarget(eps=0.3)
    ev = evaluate_attacks(tiny_mnist_model, [(x[:20], y[:20]), (x[20:], y[20:])], atk, mode=mode, seed=3,
                          keep_adversarials=True)
    goal = targets(y, torch.arange(len(y)), 10, 3, 0)                          # (N,) per image
    assert torch.equal(torch.cat(atk.seen), goal[ev.clean_correct])
    expect = ev.clean_correct & (predict(tiny_mnist_model, ev.x_adv) == goal)
    flipped = ev.clean_correct & (predict(tiny_mnist_model, ev.x_adv) != y)
    assert torch.equal(ev.success, expect) and int((flipped & ~expect).sum()) > 0       # flipped, wrong class
    assert int(ev.unverified.sum()) == int(ev.clean_correct.sum()) - int(expect.sum())


def test_targets_are_seeded_per_image() -> None:
    y = torch.arange(1000) % 10
    t = targets(y, torch.arange(1000), 10, seed=0)
    assert bool((t != y).all()) and set(t.tolist()) == set(range(10))
    assert torch.equal(targets(y[500:], torch.arange(500, 1000), 10, seed=0), t[500:])   # batching-independent
    assert not torch.equal(targets(y, torch.arange(1000), 10, seed=1), t)


def test_chained_equals_independent_for_deterministic_attacks(tiny_mnist_model, data) -> None:
    """Per point, a deterministic attack gives the same answer whichever points share its batch, so
    a point survives the chain iff it survives every attack alone: equal robust accuracy (and mask)."""
    x, y = data
    chain = [PerSample(PGD(eps=0.1, steps=5, random_start=False), "pgd-ce"),
             PerSample(PGD(eps=0.1, steps=5, random_start=False, loss="margin"), "pgd-margin")]
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    chained = evaluate_attacks(tiny_mnist_model, loader, chain, mode="chained")
    indep = evaluate_attacks(tiny_mnist_model, (x, y), chain, mode="independent", batch_size=7)
    assert torch.equal(chained.robust, indep.robust) and chained.robust_accuracy == indep.robust_accuracy
    assert 0 < indep.robust_accuracy < indep.clean_accuracy
    correct = int(indep.clean_correct.sum())
    assert [s.attacked for s in indep.stats] == [correct, correct]                 # every attack, every point
    assert chained.stats[1].attacked == correct - chained.stats[0].broken          # only the points standing
    assert bool(indep.broken[1].any() & indep.broken[0].any())


def test_robust_accuracy_front_keeps_its_keys(tiny_mnist_model, data) -> None:
    x, y = data
    r = robust_accuracy(tiny_mnist_model, [(x, y)], PGD(eps=0.2, steps=5, seed=0))
    for key in ("clean_accuracy", "robust_accuracy", "attack_success_rate", "n", "attacks", "per_attack", "seconds",
                "mean_l2", "forward_passes", "clean_correct", "success", "robust", "broken_by", "queries",
                "queries_to_success", "unverified", "mode"):
        assert key in r, key
    assert r["mode"] == "chained" and r["per_attack"][0]["robust_accuracy"] == r["robust_accuracy"]
    assert r["forward_passes"] >= r["n"] + r["per_attack"][0]["forward_passes"]


def test_bad_input() -> None:
    from robustkit.errors import InputError

    with pytest.raises(InputError, match="mode must be one of chained, independent"):
        evaluate_attacks(torch.nn.Linear(1, 1), [], Liar(), mode="parallel")
    with pytest.raises(InputError, match="need at least one attack"):
        evaluate_attacks(torch.nn.Linear(1, 1), [], [])
