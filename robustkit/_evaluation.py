"""The record the evaluation engine returns (``robustkit.evaluate.evaluate_attacks``): per point,
per attack, and the summary dict that ``robust_accuracy`` has always returned; its record form
(JSON values + tensors, for progress files) and the join of consecutive parts (sharding)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

MODES = ("chained", "independent")
POINT_FIELDS = ("clean_correct", "broken_by", "l2", "linf", "queries", "queries_to_success", "y", "pred_clean")
ATTACK_FIELDS = ("attacked", "broken", "unverified")          # (A, N): joined along dim 1
COUNTERS = ("attacked", "broken", "unverified", "seconds", "forward_passes", "backward_passes")


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

    @classmethod
    def total(cls, parts: Sequence[AttackStats]) -> AttackStats:
        """One attack's stats over consecutive parts: counters summed, ``params`` of the first,
        ``meta`` updated in order (as one run over the parts one after another would)."""
        out = cls(parts[0].attack, params=dict(parts[0].params))
        for p in parts:
            for k in COUNTERS:
                setattr(out, k, getattr(out, k) + getattr(p, k))
            out.meta.update(p.meta)
        return out

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
    seconds:         wall-clock of the evaluation: one ``evaluate_attacks`` call from start to end; a
                     join (``concat``) sums its parts (the time one process running them one after
                     the other would take), and the sharded front (``robustkit.app.sharded_eval``)
                     sets the wall-clock of its own call (all ranks, waiting included).
    clean_seconds:   time of the clean pass (summed over parts).
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
            **per_class(self.y, self.clean_correct, self.robust),
            # per-point (N,) tensors / lists on CPU
            "clean_correct": self.clean_correct, "success": s, "robust": self.robust,
            "broken_by": [self.attacks[i] if i >= 0 else None for i in self.broken_by.tolist()],
            "l2": l2, "linf": linf, "queries": self.queries, "queries_to_success": self.queries_to_success,
            "y": self.y, "pred_clean": self.pred_clean,
        }
        if self.x is not None:
            out["x"], out["x_adv"] = self.x, self.x_adv
        return out


    # -- record form (progress files) and joins ------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        """A flat dict of JSON-able values and CPU tensors (what ``UnitStore.save`` takes);
        ``from_record`` inverts it exactly."""
        rec: dict[str, Any] = {"mode": self.mode, "attacks": list(self.attacks),
                               "sub_attacks": [list(s) for s in self.sub_attacks],
                               "stats": [asdict(st) for st in self.stats], "seconds": self.seconds,
                               "clean_seconds": self.clean_seconds, "clean_forward": self.clean_forward,
                               "verify_forward": self.verify_forward}
        for k in (*POINT_FIELDS, *ATTACK_FIELDS, "x", "x_adv"):
            v = getattr(self, k)
            if v is not None:
                rec[k] = v.detach().cpu()
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Evaluation:
        """The ``Evaluation`` of ``to_record``'s dict (tensors as saved, on CPU)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in rec.items() if k in names and k != "stats"}
        kw["stats"] = [AttackStats(**st) for st in rec["stats"]]
        kw["sub_attacks"] = [list(s) for s in rec["sub_attacks"]]
        return cls(**kw)

    @classmethod
    def concat(cls, parts: Sequence[Evaluation]) -> Evaluation:
        """Consecutive parts (points ``0..N1-1``, then ``N1..``) as one evaluation: per-point
        columns joined, ``stats`` and pass counts summed, ``seconds`` summed (see the class
        docstring). The parts must share mode and attacks."""
        if not parts:
            raise ValueError("Evaluation.concat: no parts (a bug in the caller)")
        first = parts[0]
        for p in parts:
            if p.mode != first.mode or p.attacks != first.attacks:
                raise ValueError(f"Evaluation.concat: parts of different evaluations ({p.mode} {p.attacks} vs "
                                 f"{first.mode} {first.attacks}; a bug in the caller)")
        kw: dict[str, Any] = {k: torch.cat([getattr(p, k) for p in parts]) for k in POINT_FIELDS}
        kw.update({k: torch.cat([getattr(p, k) for p in parts], 1) for k in ATTACK_FIELDS})
        kept = all(p.x is not None for p in parts)
        for k in ("x", "x_adv"):
            kw[k] = torch.cat([getattr(p, k) for p in parts]) if kept else None
        kw["sub_attacks"] = [[s for p in parts for s in p.sub_attacks[i]] for i in range(len(first.attacks))]
        kw["stats"] = [AttackStats.total([p.stats[i] for p in parts]) for i in range(len(first.attacks))]
        for k in ("seconds", "clean_seconds", "clean_forward", "verify_forward"):
            kw[k] = sum(getattr(p, k) for p in parts)
        return cls(mode=first.mode, attacks=list(first.attacks), **kw)


def per_class(y: torch.Tensor, clean_correct: torch.Tensor, robust: torch.Tensor) -> dict[str, Any]:
    """Clean and robust accuracy per class present in ``y (N,)`` (masks ``(N,)`` bool), exact integer
    ratios: ``{per_class: [{class, n, clean_accuracy, robust_accuracy}], worst_class_robust_accuracy,
    worst_class}``; the worst class is the one of lowest robust accuracy among classes with at least
    one point (ties: the lowest class id; ``None`` and ``0.0`` when there are no points). The metric
    fairness-aware training reports (DAFA, Lee et al., ICLR 2024)."""
    y = y.detach().cpu().long()
    rows = []
    for c in torch.unique(y).tolist():                                   # sorted ascending
        m = y == c
        n = int(m.sum())
        rows.append({"class": int(c), "n": n, "clean_accuracy": int((clean_correct.cpu() & m).sum()) / n,
                     "robust_accuracy": int((robust.cpu() & m).sum()) / n})
    worst = min(rows, key=lambda r: (r["robust_accuracy"], r["class"])) if rows else None
    return {"per_class": rows, "worst_class_robust_accuracy": worst["robust_accuracy"] if worst else 0.0,
            "worst_class": worst["class"] if worst else None}


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
