"""Our attacks against peer libraries on the same model and data (torchattacks, foolbox).

The peers are references only; none of our code calls them."""

from __future__ import annotations

import pytest
import torch

from attacks.deepfool import DeepFool
from attacks.pgd import PGD


def _clean_correct(model, x, y):
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok], y[ok]


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 2.0)])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_at_least_as_strong_as_torchattacks(tiny_mnist_model, mnist_test_batch, norm: str, eps: float,
                                                random_start: bool) -> None:
    """Same algorithm, same settings: from the clean point both runs are deterministic, so ours (which keeps
    the first successful iterate) must break every point theirs breaks, up to one borderline sample; with
    random starts the two use different noise, so allow three samples of 64 of Monte-Carlo slack."""
    torchattacks = pytest.importorskip("torchattacks")
    model, (x, y) = tiny_mnist_model, mnist_test_batch
    steps, alpha = 10, 2.5 * eps / 10
    ours = PGD(norm=norm, eps=eps, steps=steps, step_size=alpha, random_start=random_start, seed=0)(model, x, y)
    torch.manual_seed(0)
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    theirs = cls(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)(x, y)
    ours_acc, theirs_acc = _acc(model, ours.x_adv, y), _acc(model, theirs, y)
    slack = (3 if random_start else 1) / len(y) + 1e-9
    assert ours_acc <= theirs_acc + slack, (ours_acc, theirs_acc)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_matches_foolbox(tiny_mnist_model, mnist_test_batch, norm: str) -> None:
    fb = pytest.importorskip("foolbox")
    model = tiny_mnist_model
    x, y = _clean_correct(model, *mnist_test_batch)
    x, y = x[:32], y[:32]
    ours = DeepFool(norm=norm, candidates=10, overshoot=0.02, max_iter=50)(model, x, y)
    cls = fb.attacks.L2DeepFoolAttack if norm == "l2" else fb.attacks.LinfDeepFoolAttack
    theirs, _, ok = cls(steps=50, candidates=10, overshoot=0.02)(fb.PyTorchModel(model, bounds=(0, 1)), x, y,
                                                                   epsilons=None)
    ours_l2 = ours.info["l2"].mean().item()
    theirs_l2 = (theirs - x).flatten(1).norm(dim=1).mean().item()
    assert abs(ours_l2 - theirs_l2) <= 0.05 * theirs_l2, (ours_l2, theirs_l2)
    assert ours.success.float().mean() >= ok.float().mean() - 0.05
