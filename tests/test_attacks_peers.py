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
def test_pgd_at_least_as_strong_as_torchattacks(tiny_mnist_model, mnist_test_batch, norm: str, eps: float) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    model, (x, y) = tiny_mnist_model, mnist_test_batch
    steps, alpha = 10, 2.5 * eps / 10
    ours = PGD(norm=norm, eps=eps, steps=steps, step_size=alpha, seed=0)(model, x, y)
    torch.manual_seed(0)
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    theirs = cls(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    ours_acc, theirs_acc = _acc(model, ours.x_adv, y), _acc(model, theirs, y)
    assert ours_acc <= theirs_acc + 0.03, (ours_acc, theirs_acc)


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
