"""Per-sample attack losses on logits ``(B, K)``; each returns ``(B,)`` (higher = more adversarial
for untargeted use). Shared by PGD, APGD and the fast ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "dlr", "margin")


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample: ``(B,)``."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C&W-style margin ``max_{j != y} z_j - z_y``: ``(B,)``; > 0 means misclassified."""
    z = logits.float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - z_y


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-Logits-Ratio loss (Croce & Hein 2020, eq. 4), untargeted:

    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` with ``pi`` sorting logits
    in decreasing order. Shift- and scale-invariant. Needs ``K >= 3``. ``(B,)``.
    """
    z = logits.float()
    zs, _ = z.sort(dim=1, descending=True)                 # (B, K)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return -(z_y - other) / (zs[:, 0] - zs[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, eq. 5): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12)``.
    Needs ``K >= 4``. ``(B,)``; maximize it to move towards ``target``."""
    z = logits.float()
    zs, _ = z.sort(dim=1, descending=True)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def get_loss(name: str):  # -> Callable[[Tensor, Tensor], Tensor]
    table = {"ce": ce_loss, "dlr": dlr_loss, "margin": margin_loss}
    if name not in table:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    return table[name]
