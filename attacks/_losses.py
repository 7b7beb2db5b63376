"""The loss table of the white-box attacks (PGD, APGD, the fast ensemble): logits ``(N, K)`` ->
per-sample loss ``(N,)`` to *ascend*.

Names: ``ce`` (cross-entropy), ``margin`` (C&W-style, Carlini & Wagner 2017), ``dlr`` and
``dlr-targeted`` (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML, arXiv:2003.01690, eqs. 4 and 5).

For a targeted goal (``label`` holds the target class) ``ce`` and ``margin`` are negated towards
the target; ``dlr-targeted`` pulls the target above the strongest *other* class, whichever it is
at this iterate (eq. 5 with the true label replaced by the current runner-up: that is the class
the target must beat). Untargeted ``dlr-targeted`` is APGD-T's loss: away from the true label,
towards a given ``target`` class.

The rule for few classes, one for every attack: DLR's denominator uses the third (eq. 5: the
fourth) largest logit, so ``dlr`` needs ``K >= 3`` classes and ``dlr-targeted`` ``K >= 4``, as in
the paper; AutoAttack's ``check_n_classes`` says the same ("not possible to use the DLR loss").
With fewer classes the attacks raise ``InputError`` instead of silently optimizing another loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustkit.errors import InputError

LOSSES = ("ce", "dlr", "dlr-targeted", "margin")
MIN_CLASSES = {"ce": 2, "margin": 2, "dlr": 3, "dlr-targeted": 4}

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample: ``(N,)``."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C&W-style margin ``max_{j != y} z_j - z_y``: ``(N,)``; > 0 means misclassified."""
    z = logits.float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - z_y


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-Logits-Ratio loss (Croce & Hein 2020, eq. 4), untargeted:

    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` with ``pi`` sorting logits
    in decreasing order. Shift- and scale-invariant. Needs ``K >= 3``. ``(N,)``.
    """
    z = logits.float()
    zs, _ = z.sort(dim=1, descending=True)                 # (N, K)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return -(z_y - other) / (zs[:, 0] - zs[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, eq. 5): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12)``.
    Needs ``K >= 4``. ``(N,)``; maximize it to move from ``y`` towards ``target``."""
    z = logits.float()
    zs, _ = z.sort(dim=1, descending=True)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def check_classes(name: str, k: int | None) -> None:
    """``InputError`` if the loss ``name`` is not defined for ``k`` classes (``None``: unknown, no check)."""
    need = MIN_CLASSES[name]
    if k is not None and k < need:
        raise InputError(f"loss {name!r} needs at least {need} classes (Croce & Hein 2020), the model has {k}; "
                         "use loss 'ce' or 'margin'")


def loss_fn(name: str, targeted: bool) -> LossFn:
    """The loss ``(logits (N, K), label (N,), target (N,) | None) -> (N,)`` to ascend.

    ``label``: the true class (untargeted) or the target class (``targeted``); ``target`` is only
    read by untargeted ``dlr-targeted`` (APGD-T). Raises ``InputError`` for an unknown name, for
    ``dlr`` with a targeted goal (use ``dlr-targeted``) and for too few classes (at the first call).
    """
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    if targeted and name == "dlr":
        raise InputError("a targeted goal uses loss 'ce', 'margin' or 'dlr-targeted', not the untargeted 'dlr'")

    def fn(logits: torch.Tensor, label: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        check_classes(name, logits.shape[1])
        if name == "ce":
            return -ce_loss(logits, label) if targeted else ce_loss(logits, label)
        if name == "margin":
            return -margin_loss(logits, label) if targeted else margin_loss(logits, label)  # targeted: z_t - max
        if name == "dlr":
            return dlr_loss(logits, label)
        if targeted:   # pull the target above the strongest other class, whichever it is now
            runner_up = logits.detach().scatter(1, label[:, None], float("-inf")).argmax(1)
            return dlr_targeted_loss(logits, runner_up, label)
        assert target is not None, "untargeted 'dlr-targeted' (APGD-T) needs target classes"
        return dlr_targeted_loss(logits, label, target)

    return fn
