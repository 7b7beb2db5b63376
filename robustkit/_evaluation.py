"""The record the evaluation engine returns (``robustkit.evaluate.evaluate_attacks``): per point,
per attack, and the summary dict that ``robust_accuracy`` has always returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("chained", "independent")


@dataclass
class AttackStats:
    """One attack's counters over the whole evaluation (sample-weighted passes)."""

    attack: str
    attacked: int = 0              # points handed to the attack
    broken: int = 0                # claimed successes that passed the check
    unverified: int = 0            # claimed successes that failed it (not counted)
    seconds: float = 0.0           # attack + check
    forward_passes: int = 0
    backward_passes: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)   # scalar ``info`` of its last call (package, version)

    def row(self) -> dict[str, Any]:
        """The scalar counters, one table row (``per_attack`` in the summary)."""
        return {"attack": self.attack, "attacked": self.attacked, "broken": self.broken,
                "unverified": self.unverified, "seconds": self.seconds, "forward_passes": self.forward_passes,
                "backward_passes": self.backward_passes}


@dataclass
class Evaluation:
    """``N`` points under ``A`` attacks, every claimed success verified.

    mode:            ``chained`` (each attack only on the points still standing) or ``independent``
                     (every attack on every clean-correct point).
    clean_correct:   (N,) bool.
    attacked:        (A, N) bool, the attack ran on the point.
    broken:          (A, N) bool, the attack broke the point and the claim passed the check.
    unverified:      (A, N) bool, the attack claimed the point but the check failed.
    broken_by:       (N,) int64, position of the first attack (in order) that broke it, -1 if none.
    l2, linf:        (N,) the size of ``x_adv - x`` of that first break (0 where unbroken).
    queries:         (N,) int64, model queries spent on the point by every attack that ran on it.
    queries_to_success: (N,) int64, queries of the breaking attack (-1 if unbroken).
    sub_attacks:     per attack, per point: the sub-attack an ensemble named (``info["broken_by"]``).
    x, x_adv:        (N, C, H, W) on CPU when kept: per point the first verified adversarial, else the
                     output of the last attack that ran on it (the clean image if none did).
    """

    mode: str
    attacks: list[str]
    clean_correct: torch.Tensor
    attacked: torch.Tensor
    broken: torch.Tensor
    unverified: torch.Tensor
    broken_by: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    queries: torch.Tensor
    queries_to_success: torch.Tensor
    y: torch.Tensor
    pred_clean: torch.Tensor
    sub_attacks: list[list[str | None]]
    stats: list[AttackStats]
    seconds: float
    clean_seconds: float
    clean_forward: int
    verify_forward: int
    x: torch.Tensor | None = None
    x_adv: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.clean_correct.numel())

    @property
    def success(self) -> torch.Tensor:
        """(N,) bool: some attack broke the point (verified)."""
        return self.broken_by >= 0

    @property
    def robust(self) -> torch.Tensor:
        """(N,) bool: clean-correct and no attack broke it."""
        return self.clean_correct & ~self.success

    def fraction(self, mask: torch.Tensor) -> float:
        """Share of the ``N`` points where ``mask (N,)`` holds (exact integer ratio)."""
        return int(mask.sum()) / self.n if self.n else 0.0

    @property
    def clean_accuracy(self) -> float:
        return self.fraction(self.clean_correct)

    @property
    def robust_accuracy(self) -> float:
        return self.fraction(self.robust)

    def accuracy_under(self, i: int) -> float:
        """Chained: robust accuracy after attacks ``0..i``; independent: under attack ``i`` alone."""
        upto = self.broken[: i + 1].any(0) if self.mode == "chained" else self.broken[i]
        return self.fraction(self.clean_correct & ~upto)

    def summary(self) -> dict[str, Any]:
        """The dict of ``robust_accuracy`` (see there): scalars, ``per_attack`` rows, per-point tensors."""
        s, l2, linf = self.success, self.l2, self.linf
        any_s = bool(s.any())
        rows = [{**st.row(), "robust_accuracy": self.accuracy_under(i)} for i, st in enumerate(self.stats)]
        out: dict[str, Any] = {
            "mode": self.mode, "attacks": list(self.attacks), "n": self.n,
            "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
            "attack_success_rate": int(s.sum()) / int(self.clean_correct.sum()) if bool(self.clean_correct.any())
            else 0.0,
            "mean_l2": float(l2[s].mean()) if any_s else None,
            "median_l2": float(l2[s].median()) if any_s else None,
            "mean_linf": float(linf[s].mean()) if any_s else None,
            "unverified": int(self.unverified.sum()),
            "seconds": self.seconds,
            "forward_passes": self.clean_forward + self.verify_forward + sum(st.forward_passes for st in self.stats),
            "backward_passes": sum(st.backward_passes for st in self.stats),
            "per_attack": rows,
            # per-point (N,) tensors / lists on CPU
            "clean_correct": self.clean_correct, "success": s, "robust": self.robust,
            "broken_by": [self.attacks[i] if i >= 0 else None for i in self.broken_by.tolist()],
            "l2": l2, "linf": linf, "queries": self.queries, "queries_to_success": self.queries_to_success,
            "y": self.y, "pred_clean": self.pred_clean,
        }
        if self.x is not None:
            out["x"], out["x_adv"] = self.x, self.x_adv
        return out


class Columns:
    """Per-batch tensors gathered on CPU and joined at the end (``(N,)`` or ``(A, N)`` columns)."""

    def __init__(self) -> None:
        self.cols: dict[str, list[torch.Tensor]] = {}

    def add(self, **cols: torch.Tensor) -> None:
        for k, v in cols.items():
            self.cols.setdefault(k, []).append(v.detach().cpu())

    def cat(self, key: str, dim: int = 0, empty: tuple[int, ...] = (0,), dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
        parts = self.cols.get(key)
        return torch.cat(parts, dim) if parts else torch.zeros(empty, dtype=dtype)
